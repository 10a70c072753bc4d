"""LongHeads (Lu et al. 2024, arXiv 2402.10685) as a swappable attention function.

    settings.py         LongHeads (what to compute), Dispatch (kernel knobs), the cache layout
    representations.py  how a chunk is summarised and scored
    selection.py        selectors, position schemes, and the selection step prefill and decode share
    prefill.py          the prompt: dense prefix + selective part
    dispatch.py         the selective prefill kernel, as a plan and a run
    decode.py           one token per step
    reread.py           generate's re-read of a long prompt (chunks voted for by early heads)
"""
from lh_jax.longheads.representations import (AttnPooled, KeyBounds, MeanKeys, SubChunks, representation_from_name)
from lh_jax.longheads.selection import (POSITION_SCHEMES, SELECTORS, Selection, original_positions, remap_positions,
                                        select_chunks, select_recent)
from lh_jax.longheads.reread import Reread
from lh_jax.longheads.settings import Dispatch, LongHeads, sliding_window

__all__ = ["LongHeads", "Dispatch", "Reread", "sliding_window", "AttnPooled", "MeanKeys", "KeyBounds", "SubChunks",
           "representation_from_name", "Selection", "select_chunks", "select_recent", "remap_positions",
           "original_positions", "SELECTORS", "POSITION_SCHEMES"]
