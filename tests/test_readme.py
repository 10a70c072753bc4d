"""README.md is the user's contract: at most 15k characters, its Python quick start runs as written
(on the embedded model), and every `lh-jax ...` command line in it parses with the real CLI."""
from __future__ import annotations

import os
import re
import shlex

import pytest

import lh_jax.cli
from conftest import default_model_path

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def text() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def test_readme_is_short():
    assert len(text().encode()) <= 15000, len(text().encode())  # bytes: the stricter count


def commands() -> list[list[str]]:
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text(), flags=re.S):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("lh-jax "):
                out.append(shlex.split(line)[1:])
    return out


def test_every_cli_line_parses():
    lines = commands()
    assert len(lines) >= 5
    for argv in lines:
        command = next((a for a in argv if not a.startswith("-")), None)
        lh_jax.cli.build_parser(command).parse_args(argv)  # SystemExit on an unknown flag or bad method


@pytest.mark.slow
def test_quick_start_runs_as_written(capsys):
    default_model_path()
    blocks = re.findall(r"```python\n(.*?)```", text(), flags=re.S)
    assert blocks, "no python block in README"
    exec(compile(blocks[0], "README quick start", "exec"), {})
    printed = capsys.readouterr().out
    assert "Paris" in printed and "48151" in printed, printed
