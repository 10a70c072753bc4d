"""`LongHeads(reread=Reread(...))`: generate answers a long prompt from a short re-read of it (chunk 0,
the chunks the first layers' heads vote for, the last tokens). Against direct definitions: the
votes (numpy, from the queries and keys the model's layers produce), the re-read prompt's layout,
and generate on that prompt without re-reading."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import jax.numpy as jnp

import lh_jax
from conftest import random_ids
from lh_jax.longheads import LongHeads, Reread
from lh_jax.longheads.reread import chunk_votes, short_prompt
from lh_jax.methods import MethodSpec
from lh_jax.models.rope import Rope
from lh_jax.runtime import context, generate_batch

THETA = 10000.0


def rotate_np(x, pos, theta=THETA):
    """x [T, N, D] rotated by integer positions [T] (half-split RoPE), by its definition."""
    D = x.shape[-1]
    ang = pos[:, None].astype(np.float64) * theta ** (-np.arange(0, D, 2) / D)[None]  # [T, D/2]
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def direct_votes(q, k, length, l, rr: Reread):
    """One unpadded row: q [T, H, D], k [T, K, D] (un-rotated) -> {chunk: vote} for the candidates
    (each head's term summed over heads, or with combine="max" / "layer-best" the largest)."""
    T, H, D = q.shape
    G = H // k.shape[1]
    kr = rotate_np(k, np.arange(T) % l)
    cands = [c for c in range(1, T // l + 1) if (c + 1) * l <= length - rr.recent]
    n = rr.query_tokens + rr.background_tokens
    terms = {c: [] for c in cands}
    for h in range(H):
        p = []
        for j in range(T - n, T):
            best = np.array([max(q[j, h] @ kr[i, h // G] for i in range(c * l, (c + 1) * l)) for c in cands]) / D ** 0.5
            e = np.exp(best - best.max())
            p.append(e / e.sum())
        p = np.array(p)
        p_bg, p_q = p[:rr.background_tokens].mean(0), p[rr.background_tokens:].mean(0)
        for i, c in enumerate(cands):
            terms[c].append(p_q[i] * (np.log(p_q[i] + 1e-6) - np.log(p_bg[i] + 1e-6)))
    return {c: (max(t) if rr.combine in ("max", "layer-best") else sum(t)) for c, t in terms.items()}


@st.composite
def vote_cases(draw):
    l = draw(st.sampled_from([4, 8]))
    K = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 2]))
    rr = Reread(chunks=1, recent=draw(st.integers(8, 16)), query_tokens=draw(st.integers(1, 3)),
                background_tokens=draw(st.integers(1, 5)), combine=draw(st.sampled_from(["sum", "max", "layer-best"])))
    lengths = [draw(st.integers(rr.recent + 2 * l, rr.recent + 6 * l)) for _ in range(2)]
    block = draw(st.sampled_from([5, 16, 4096]))  # keys scored at a time: several blocks, a ragged last one
    return l, K, G, rr, lengths, block, draw(st.integers(0, 2 ** 16))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vote_cases())
def test_votes_equal_the_direct_definition(case):
    """Left-padded rows of different lengths, GQA: each candidate chunk's vote as defined; the other
    chunks (0, those reaching into the last `recent` tokens, padding) get none."""
    l, K, G, rr, lengths, block, seed = case
    rng = np.random.default_rng(seed)
    D, T = 8, max(lengths)
    q = rng.standard_normal((2, T, K * G, D)).astype(np.float32)
    k = rng.standard_normal((2, T, K, D)).astype(np.float32)
    mask = np.zeros((2, T), bool)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = True
    config = lh_jax.ModelConfig(vocab_size=16, hidden_size=K * G * D, intermediate_size=8, num_layers=1,
                                num_heads=K * G, num_kv_heads=K, head_dim=D, max_position_embeddings=4096)
    rope = Rope.from_config(config)
    assert rope.rope.theta == THETA
    got = np.asarray(chunk_votes(jnp.asarray(q), jnp.asarray(k), context(jnp.asarray(mask), 0), rope, rr, l, block))
    for b, n in enumerate(lengths):
        want = direct_votes(q[b, T - n:], k[b, T - n:], n, l, rr)
        assert want, "no candidate chunk: the case is too short"
        for c in range(got.shape[1]):
            if c in want:
                np.testing.assert_allclose(got[b, c], want[c], rtol=2e-4, atol=2e-6, err_msg=f"row {b} chunk {c}")
            else:
                assert got[b, c] == -np.inf, (b, c)


@pytest.mark.parametrize("margin", [0, 3, 9])
def test_short_prompt_layout(margin):
    """Chunk 0, each chunk widened by the margin (overlaps merged, clipped to the prompt), the last
    tokens: each token once, in order."""
    ids = np.arange(1000, 1100)
    chunks, l, recent = [1, 3, 5, 11], 8, 20
    spans = [range(0, l), range(100 - recent, 100)] + [range(c * l - margin, (c + 1) * l + margin) for c in chunks]
    want = [i for i in range(100) if any(i in s for s in spans)]
    assert short_prompt(ids, chunks, l, recent, margin).tolist() == (1000 + np.array(want)).tolist()


# --- generate ------------------------------------------------------------------------------------

RR = Reread(chunks=3, margin=4, recent=24, query_tokens=4, background_tokens=8)
ATTN = LongHeads(chunk_size=8, num_chunks=8, dense_length=64, chunk_repr="mean", reread=RR)


@dataclasses.dataclass(frozen=True)
class Recorder:
    """An attention function that also returns the layer's queries and keys (before RoPE)."""

    inner: object

    def validate(self, config):
        pass

    def __call__(self, q, k, v, *, config, rope, ctx, cache):
        out, writes, _ = self.inner(q, k, v, config=config, rope=rope, ctx=ctx, cache=cache)
        return out, writes, {"q": q, "k": k}


def expected_short_prompt(model, ids, attention):
    """The re-read prompt by definition: the first quarter of the layers (1 of 2 here) vote with the
    queries and keys the model computes (LongHeads without re-reading), `direct_votes` summed."""
    rr, l = attention.reread, attention.chunk_size
    _, aux = lh_jax.forward(model.params, model.config, ids[None], attention=Recorder(
        dataclasses.replace(attention, reread=None)), return_aux=True)
    merge = max if rr.combine == "max" else (lambda a, b: a + b)  # over the voting layers (layer-best: summed)
    total = {}
    for layer in range(rr.voting_layers(model.config.num_layers)):
        q, k = np.asarray(aux["q"][layer, 0]), np.asarray(aux["k"][layer, 0])
        for c, v in direct_votes(q, k, len(ids), l, rr).items():
            total[c] = merge(total[c], v) if c in total else v
    top = sorted(sorted(total, key=lambda c: (-total[c], c))[:rr.chunks])
    return short_prompt(ids, top, l, rr.recent, rr.margin), top


@pytest.mark.parametrize("variant,combine,layers", [("llama_gqa2_tied", "sum", None), ("llama_mha", "sum", None),
                                                    ("llama_gqa2_tied", "max", 2), ("llama_gqa2_tied", "sum", 2),
                                                    ("llama_gqa2_tied", "layer-best", 2)])
def test_generate_answers_from_the_voted_short_prompt(tiny, variant, combine, layers):
    """layers=2: both layers of the tiny model vote, so votes combine over layers too."""
    model = tiny(variant)
    ids = random_ids((200,), seed=3)
    attention = dataclasses.replace(ATTN, reread=dataclasses.replace(RR, combine=combine, layers=layers))
    short, top = expected_short_prompt(model, ids, attention)
    assert len(top) == 3 and 8 + 3 * 8 + 24 <= len(short) <= RR.short_length(8) < 200
    got = np.asarray(lh_jax.generate(model.params, model.config, ids[None], 6, attention=attention))
    want = np.asarray(lh_jax.generate(model.params, model.config, short[None], 6,
                                      attention=dataclasses.replace(ATTN, reread=None)))
    assert got[0, :200].tolist() == ids.tolist()
    assert got[0, 200:].tolist() == want[0, len(short):].tolist()


def test_left_padded_batch_matches_rows_alone(tiny):
    """A batch mixing two long prompts of different lengths and a short one (not re-read)."""
    model = tiny("llama_gqa2_tied")
    prompts = [random_ids((200,), seed=1), random_ids((163,), seed=2), random_ids((40,), seed=3)]
    batch = generate_batch(model.params, model.config, prompts, 5, ATTN)
    for p, row in zip(prompts, batch):
        assert row == generate_batch(model.params, model.config, [p], 5, ATTN)[0]


def test_short_prompts_are_not_reread(tiny):
    """At or below dense_length (exact full attention there) the prompt is read whole."""
    model = tiny("llama_gqa2_tied")
    ids = random_ids((64,), seed=4)
    got = lh_jax.generate(model.params, model.config, ids[None], 4, attention=ATTN)
    want = lh_jax.generate(model.params, model.config, ids[None], 4, attention=dataclasses.replace(ATTN, reread=None))
    assert np.asarray(got).tolist() == np.asarray(want).tolist()


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,names", [
    (dict(chunks=0), "chunks"), (dict(recent=-1), "recent"), (dict(layers=0), "layers"), (dict(margin=-1), "margin"),
    (dict(query_tokens=2.5), "query_tokens"), (dict(recent=16, query_tokens=8, background_tokens=9), "recent"),
    (dict(combine="mean"), "combine"), (dict(combine=["max"]), "combine"),
])
def test_bad_reread_parameters_are_named(kwargs, names):
    with pytest.raises(ValueError, match=names):
        Reread(**kwargs)


def test_bad_reread_settings_fail_before_compiling(tiny):
    with pytest.raises(ValueError, match="reread"):
        LongHeads(reread=4)
    with pytest.raises(ValueError, match="reread"):
        LongHeads(reference=True, reread=Reread())
    model = tiny("llama_gqa2_tied")
    with pytest.raises(ValueError, match="layers=3 but the model has 2"):
        lh_jax.generate(model.params, model.config, random_ids((200,))[None], 2,
                        attention=dataclasses.replace(ATTN, reread=dataclasses.replace(RR, layers=3)))


def test_a_vote_that_cannot_fit_fails_before_any_work(tiny, monkeypatch):
    """The voting pass over the whole prompt is checked against the available memory before it runs."""
    from lh_jax import runtime
    model = tiny("llama_gqa2_tied")
    ids = random_ids((200,), seed=5)[None]
    sub = dataclasses.replace(model.config, num_layers=RR.voting_layers(model.config.num_layers))
    need = runtime.memory_estimate(sub, dataclasses.replace(ATTN, reread=None), 1, 256)
    monkeypatch.setattr(runtime, "available_memory", lambda: sum(need.values()) - 1)
    before = runtime.TRACE_COUNTS["forward"]
    with pytest.raises(runtime.InsufficientMemoryError, match="1 x 256 tokens"):
        lh_jax.generate(model.params, model.config, ids, 2, attention=ATTN)
    assert runtime.TRACE_COUNTS["forward"] == before


def test_method_names():
    assert MethodSpec("longheads:recommended").longheads.reread == Reread()
    assert MethodSpec("longheads:recommended/reread=0").longheads.reread is None
    spec = MethodSpec("longheads:64x8/reread=5")
    assert spec.longheads.reread == Reread(chunks=5) and spec.name == "longheads:64x8/reread=5"
    assert MethodSpec("longheads:recommended").resolved_name.endswith("/reread=8")
    for bad in ("longheads:recommended/reread=x", "sliding:64x8/reread=2"):
        with pytest.raises(ValueError, match="reread"):
            MethodSpec(bad)
