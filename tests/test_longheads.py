"""LongHeads attention (lh_jax.longheads.LongHeads) on tiny random LLaMA models and on the
reference outputs of the authors' released code.

What is checked, and against what:
- the dense phase and "every chunk selected" reduce to full causal attention (FullAttention);
- reference mode reproduces the released code's goldens (logits, every selected chunk set,
  greedy ids, teacher-forced decode logits); the default mode's self-key fix changes them;
- decode after prefill equals one forward pass over the whole sequence, across chunk boundaries
  and across dense_length; generation is self-consistent with forward;
- causality (token perturbation and jax.grad), left-padded batches, bfloat16, one decode trace;
- ablations (chunk representations, original positions, per-group selection);
- bad settings fail before compiling, naming the parameter;
- sharded (4 virtual CPU devices) prefill/decode equal the unsharded ones (subprocess).

The tiny models have q/k weights at std 0.2 (so chunk scores are far from ties), other weights at
0.1 and an lm_head at std 0.03 (logits of O(0.3): float32 RoPE rounding at positions of a few
hundred then stays well below the 1e-5 tolerance of the "identical to full attention" checks).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import lh_jax
from lh_jax import runtime
from lh_jax.longheads import Dispatch, LongHeads
from lh_jax.longheads import dispatch as dispatch_kernel
from lh_jax.models.rope import Rope

from conftest import missing_asset, nothing_compiles, run_on_virtual_devices

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB = 256
EXACT = 1e-5  # "identical to full attention" in float32
TOL = 1e-4  # two different computations of the same LongHeads result

# shared/ lies beside the checkout (developers and CI alike); LH_GOLDEN_DIR overrides
_HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN_DIR = os.environ.get("LH_GOLDEN_DIR") or next(
    (d for d in (os.path.join(_HERE, "..", "..", "shared", "golden", "longheads_ref"),
                 os.path.join(_HERE, "..", "shared", "golden", "longheads_ref"),
                 "/work/shared/golden/longheads_ref") if os.path.isdir(d)),
    os.path.join(_HERE, "..", "..", "shared", "golden", "longheads_ref"))


# --- tiny models ---------------------------------------------------------------------------------

def build_llama(path, num_heads=4, num_kv_heads=2, seed=0, max_position_embeddings=1024):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * z)
            elif "q_proj" in name or "k_proj" in name:
                p.copy_(0.2 * z)
            elif "lm_head" in name:
                p.copy_(0.03 * z)
            else:
                p.copy_(0.1 * z)
    model.save_pretrained(str(path))
    return str(path)


class Tiny:
    def __init__(self, path):
        self.path = path
        self.config, self.params = lh_jax.load(path, progress=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lh_models")
    return {"gqa": Tiny(build_llama(root / "gqa", 4, 2, seed=1)),
            "mha": Tiny(build_llama(root / "mha", 4, 4, seed=2))}


@pytest.fixture(scope="module")
def gqa(models):
    return models["gqa"]


def rand_ids(shape, seed):
    return np.random.RandomState(seed).randint(0, VOCAB, size=shape).astype(np.int32)


def max_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def fwd(m, ids, attention=None, **kw):
    return np.asarray(lh_jax.forward(m.params, m.config, ids, attention=attention, **kw))


# Most tests share one 300-token sequence (10 chunks of 32, the last one partial) and a handful of
# attention settings, so that compilations and forward passes are shared (memoised) between tests.
T_LONG = 300
IDS = rand_ids((1, T_LONG), seed=3)
CAPACITY = 320  # every single-row decode uses this cache size (one decode compilation per setting)
_memo: dict = {}


def run_forward(m, attention=None):
    """(logits [1, 300, V], selected [L, 1, H, T', N] or None) of IDS; memoised."""
    key = (m.path, attention)
    if key not in _memo:
        if attention is not None and attention.record_selection:
            logits, aux = lh_jax.forward(m.params, m.config, IDS, attention=attention, return_aux=True)
            _memo[key] = (np.asarray(logits), np.asarray(aux["selected"]))
        else:
            _memo[key] = (fwd(m, IDS, attention), None)
    return _memo[key]


def forced_decode(m, ids, T, attention, capacity=CAPACITY):
    """Prefill ids[:, :T], then feed ids[:, T:] one by one; returns the logits rows [B, n+1, V]:
    row 0 from the prefill (position T-1), row j from the decode step at position T+j-1.
    Also checks that the decode step is traced at most once (on its first call)."""
    B, S = ids.shape
    cache = lh_jax.init_cache(m.config, B, capacity, attention, jnp.float32)
    logits, cache = lh_jax.prefill(m.params, m.config, ids[:, :T], cache, attention)
    rows = [np.asarray(logits)]
    traces = None
    for p in range(T, S):
        logits, cache = lh_jax.decode_step(m.params, m.config, ids[:, p], cache, attention)
        rows.append(np.asarray(logits))
        if traces is None:
            traces = runtime.TRACE_COUNTS["decode_step"]
    assert runtime.TRACE_COUNTS["decode_step"] == traces, "decode_step was retraced"
    return np.stack(rows, axis=1)


def lh(**kw):
    """The workhorse setting: 32-token chunks, 4 attended (window 128), dense up to 64 tokens,
    selections recorded."""
    return LongHeads(**{"chunk_size": 32, "num_chunks": 4, "dense_length": 64, "record_selection": True, **kw})


LH = lh()


def label(a):
    return (f"N{a.num_chunks}-D{a.dense_length}-{a.chunk_repr}-{a.positions}-{a.selection}"
            + ("-ref" if a.reference else ""))


# --- 1. up to dense_length LongHeads is the base model -----------------------------------------

LH128 = LongHeads(chunk_size=32, num_chunks=4)  # dense_length defaults to the window, 128


@pytest.mark.parametrize("name,T,attention", [
    ("gqa", 37, LH),  # shorter than dense_length=64, not a multiple of the chunk size
    ("mha", 64, LH),  # exactly dense_length
    ("gqa", 128, LH128),
], ids=["gqa-37", "mha-64", "gqa-128-default-dense"])
def test_up_to_dense_length_equals_full_attention(models, name, T, attention):
    m = models[name]
    assert attention.dense_length >= T
    ids = rand_ids((2, T), seed=T)
    assert max_err(fwd(m, ids, attention), fwd(m, ids)) <= EXACT


@pytest.mark.parametrize("attention", [LH128, LongHeads(chunk_size=32, num_chunks=4, dense_length=176)],
                         ids=["dense-eq-window", "dense-past-window"])
def test_decode_within_and_past_dense_length(gqa, attention):
    """Decoding from a 40-token prompt is full attention up to dense_length and selective from
    there on, where 4 of 5 or more chunks are chosen (so the switch point matters), equal to
    forward() there. dense_length = window = 128: dense rows take the selective path with every
    chunk selected; 176 > window: they need more chunks than a selection holds (own branch)."""
    Dn = attention.dense_length
    full, _ = run_forward(gqa)
    lh, _ = run_forward(gqa, attention)
    rows = forced_decode(gqa, IDS, 40, attention)  # positions 39..299
    assert max_err(lh[:, :Dn], full[:, :Dn]) <= EXACT
    assert max_err(rows[:, :Dn - 39], full[:, 39:Dn]) <= EXACT
    errs = np.abs(rows[0] - lh[0, 39:]).max(-1)
    assert errs.max() <= TOL, f"max error {errs.max():.3g} at position {39 + errs.argmax()}"
    assert np.abs(lh[0, Dn:] - full[0, Dn:]).max(-1)[0] > 1e-3  # position dense_length is selective


# --- 2. every chunk selected: LongHeads is full attention --------------------------------------

ALL_CHUNKS = [
    lh(num_chunks=10, positions="original"),
    lh(num_chunks=13),  # remap (contiguous = true positions here); k larger than the available chunks
    lh(num_chunks=10, dense_length=0),  # no dense phase at all
]


@pytest.mark.parametrize("attention", ALL_CHUNKS, ids=label)
def test_all_chunks_selected_equals_full_attention(gqa, attention):
    logits, sel = run_forward(gqa, attention)
    full, _ = run_forward(gqa)
    assert max_err(logits, full) <= EXACT
    # every query holds all chunks up to its own
    first = (attention.dense_length // 32) * 32
    cur = (first + np.arange(sel.shape[3])) // 32
    assert np.all((sel < 10).sum(-1) == np.minimum(cur + 1, 10)[None, None, None])


def test_all_chunks_selected_decode_equals_full_attention(gqa):
    attention = lh(num_chunks=13)
    rows = forced_decode(gqa, IDS, 150, attention)  # decode across chunk boundaries 160, 192, ...
    full, _ = run_forward(gqa)
    assert max_err(rows, full[:, 149:]) <= EXACT


def test_fewer_chunks_is_not_full_attention(gqa):
    """The tests above are not vacuous: with 4 of 10 chunks the outputs do change."""
    logits, _ = run_forward(gqa, LH)
    full, _ = run_forward(gqa)
    assert max_err(logits[:, :64], full[:, :64]) <= EXACT
    assert max_err(logits[:, 160:], full[:, 160:]) > 1e-2


def direct_selective_attention(attention, config, q, k, v, selected):
    """LongHeads' selective attention by its definition, one (head, query) at a time in float64:
    the query attends to the keys of its selected chunks (its own chunk up to itself), the chunks
    laid out in order at contiguous positions 0.. (slot s holds positions s·l .. s·l + l - 1) and
    the query at position (slots used - 1)·l + its offset; q, k rotated there by RoPE directly.
    q [T, H, D], k / v [T, K, D] un-rotated; selected [H, T', N] for queries T - T'..T-1."""
    T, H, D = q.shape
    K = k.shape[1]
    l = attention.chunk_size
    inv = 1.0 / config.rope.theta ** (np.arange(0, D, 2) / D)

    def rot(x, p):
        a = np.concatenate([p * inv, p * inv])
        return x * np.cos(a) + np.concatenate([-x[D // 2:], x[:D // 2]]) * np.sin(a)

    first = T - selected.shape[1]
    out = np.zeros((T - first, H, D))
    for h in range(H):
        kv = h // (H // K)
        for i, t in enumerate(range(first, T)):
            chunks = [c for c in selected[h, i] if c < -(-T // l)]
            keys, values = [], []
            for s, c in enumerate(chunks):
                for o in range(l):
                    j = c * l + o
                    if j <= t:
                        keys.append(rot(k[j, kv].astype(np.float64), s * l + o))
                        values.append(v[j, kv])
            qr = rot(q[t, h].astype(np.float64), (len(chunks) - 1) * l + t % l)
            logits = np.array(keys) @ qr / np.sqrt(D)
            p = np.exp(logits - logits.max())
            out[i, h] = p @ np.array(values, np.float64) / p.sum()
    return out


@pytest.mark.parametrize("kernel", [Dispatch(), Dispatch(tile_rows=7), Dispatch(tile_rows=1),
                                    Dispatch(selection_segments=3, tile_rows=64)],
                         ids=["default", "rows7", "rows1", "seg3-rows64"])
def test_dispatch_kernel_equals_the_direct_definition(kernel):
    """One layer on random q/k/v (250 tokens, chunks of 32, 4 attended, dense prefix 64, GQA 4:2):
    the dispatch kernel's output at every selective query equals the direct definition over the
    chunks the kernel selected; the knobs only change the tiling (also many partial tiles: 7 rows,
    one row per tile; selection in 3 uneven segments)."""
    config = dataclasses.replace(models_config_for_layer(), num_heads=4, num_kv_heads=2, head_dim=16)
    attention = lh(kernel=kernel)
    T, H, K, D = 250, 4, 2, 16
    rng = np.random.RandomState(5)
    q, k, v = (rng.normal(size=(1, T, n, D)).astype(np.float32) for n in (H, K, K))
    ctx = runtime.context(jnp.ones((1, T), bool), 0)
    out, _, aux = jax.jit(lambda q, k, v: attention(q, k, v, config=config, rope=Rope.from_config(config),
                                                    ctx=ctx, cache=None))(q, k, v)
    selected = np.asarray(aux["selected"])[0]  # H, T' (padded to whole chunks), N
    first = (attention.dense_length // 32) * 32
    want = direct_selective_attention(attention, config, q[0], k[0], v[0], selected[:, :T - first])
    got = np.asarray(out)[0, first:]
    assert got.shape == (T - first, H, D)
    assert max_err(got, want) <= EXACT


def models_config_for_layer():
    from lh_jax.models.config import RopeConfig
    return lh_jax.ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                              num_kv_heads=2, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-6,
                              rope=RopeConfig(theta=10000.0))


@pytest.mark.parametrize("blocks_per_step", [1, 2])
def test_selection_pass_in_several_steps(gqa, monkeypatch, blocks_per_step):
    """The dispatch kernel's selection pass scores a few query blocks per lax.map step (a divisor
    of the blocks, from a budget of scored (query, chunk) pairs). The budget only changes how the
    blocks are batched: with one or two blocks per step, the selections and logits are those of
    the default (all blocks of this short sequence in one step)."""
    C = -(-T_LONG // LH.chunk_size)  # chunks after padding: the selection width
    monkeypatch.setattr(dispatch_kernel, "SELECT_PAIRS", blocks_per_step * LH.chunk_size * C)
    # the kernel knob makes this configuration distinct, so it is traced anew under the patched budget
    attention = lh(kernel=Dispatch(tile_rows=2048 + blocks_per_step))
    base_logits, base_sel = run_forward(gqa, LH)
    logits, sel = run_forward(gqa, attention)
    np.testing.assert_array_equal(sel, base_sel)
    assert max_err(logits, base_logits) <= EXACT


@pytest.mark.parametrize("per_step", ["all", "one"])
def test_tile_loop_kv_heads_per_step(gqa, monkeypatch, per_step):
    """The dispatch kernel's tile loop takes one kv head per step on the CPU and all of them
    elsewhere; both groupings give the selections and logits of the other (this runs the
    non-default one on whatever backend runs the tests)."""
    base_logits, base_sel = run_forward(gqa, LH)
    monkeypatch.setattr(dispatch_kernel, "kv_heads_per_step", (lambda K: K) if per_step == "all" else (lambda K: 1))
    attention = lh(kernel=Dispatch(tile_rows=2050 if per_step == "all" else 2051))  # distinct: traced anew
    logits, sel = run_forward(gqa, attention)
    np.testing.assert_array_equal(sel, base_sel)
    assert max_err(logits, base_logits) <= EXACT


# --- 3. the released code's goldens ---------------------------------------------------------------

REF = LongHeads(chunk_size=64, num_chunks=4, dense_length=256, reference=True, record_selection=True)
REF_DEFAULT = LongHeads(chunk_size=64, num_chunks=4, dense_length=256, record_selection=True)


@pytest.fixture(scope="module")
def golden():
    if not os.path.isfile(os.path.join(GOLDEN_DIR, "model.safetensors")):
        missing_asset(f"LongHeads goldens not found at {GOLDEN_DIR} (set LH_GOLDEN_DIR)")
    config, params = lh_jax.load(GOLDEN_DIR, progress=False)
    a = dict(np.load(os.path.join(GOLDEN_DIR, "case_a_prefill_1000.npz")))
    c = dict(np.load(os.path.join(GOLDEN_DIR, "case_c_greedy_1000_plus24.npz")))
    ids = a["input_ids"].astype(np.int32)[None]
    logits, aux = lh_jax.forward(params, config, ids, attention=REF, return_aux=True)
    return {"config": config, "params": params, "path": GOLDEN_DIR, "a": a, "c": c, "ids": ids,
            "logits": np.asarray(logits)[0], "selected": np.asarray(aux["selected"])}


def test_golden_prefill_logits(golden):
    a = golden["a"]
    assert golden["logits"].shape == a["logits"].shape
    assert max_err(golden["logits"], a["logits"]) <= TOL


def test_golden_prefill_selected_chunks(golden):
    a = golden["a"]
    sel = golden["selected"]  # [L, B, H, T', N] for positions 256.. (the padded tail included)
    L, H, S, N = a["selected_chunks"].shape
    assert sel.shape[:3] == (L, 1, H) and sel.shape[-1] == N and sel.shape[3] >= S
    got = sel[:, 0, :, :S]
    bad = np.argwhere(np.any(got != a["selected_chunks"], axis=-1))
    assert bad.size == 0, (f"{len(bad)} (layer, head, token) selections differ; first {bad[0]}: got "
                           f"{got[tuple(bad[0])]}, want {a['selected_chunks'][tuple(bad[0])]}")


def test_golden_dense_part_is_full_causal(golden):
    a = golden["a"]
    assert max_err(golden["logits"][:256], a["hf_full_causal_logits"][:256]) <= EXACT
    assert max_err(golden["logits"][256:], a["hf_full_causal_logits"][256:]) > 0.1  # LongHeads acts there


def test_default_mode_differs_from_reference(golden):
    """The self-key fix is not cosmetic; the first layer's selections do not depend on it."""
    a = golden["a"]
    logits, aux = lh_jax.forward(golden["params"], golden["config"], golden["ids"], attention=REF_DEFAULT,
                                 return_aux=True)
    logits, sel = np.asarray(logits)[0], np.asarray(aux["selected"])
    assert max_err(logits[:256], a["logits"][:256]) <= EXACT
    assert max_err(logits, a["logits"]) > 0.05
    S = a["selected_chunks"].shape[2]
    np.testing.assert_array_equal(sel[0, 0, :, :S], a["selected_chunks"][0])


def test_golden_greedy_generation(golden):
    c = golden["c"]
    prompt = c["input_ids"].astype(np.int32)[None]
    out = np.asarray(lh_jax.generate(golden["params"], golden["config"], prompt, len(c["generated_ids"]),
                                     attention=REF))
    np.testing.assert_array_equal(out[0, :prompt.shape[1]], prompt[0])
    np.testing.assert_array_equal(out[0, prompt.shape[1]:], c["generated_ids"])


def test_golden_decode_step_logits(golden):
    """Teacher forcing: prefill the prompt, then feed the golden generated ids one at a time."""
    c = golden["c"]
    prompt, gen = c["input_ids"].astype(np.int32), c["generated_ids"].astype(np.int32)
    ids = np.concatenate([prompt, gen[:-1]])[None]
    m = Tiny.__new__(Tiny)
    m.config, m.params = golden["config"], golden["params"]
    rows = forced_decode(m, ids, len(prompt), REF, capacity=len(prompt) + len(gen))[0]
    assert rows.shape == c["step_logits"].shape
    errs = np.abs(rows - c["step_logits"]).max(axis=-1)
    assert errs.max() <= TOL, f"per-step errors {errs}"
    np.testing.assert_array_equal(rows.argmax(-1), gen)


def test_reference_mode_rejects_what_the_released_code_cannot_do(golden):
    """Defect 2 of the released code: a prompt between chunk_size and dense_length, continued past
    dense_length, raises there; reference mode raises too (before compiling). The default mode
    handles it (test_decode_crosses_dense_length)."""
    with nothing_compiles(), pytest.raises(ValueError, match="dense_length"):
        lh_jax.generate(golden["params"], golden["config"], golden["ids"][:, :100], 200, attention=REF)


# --- 4. selections recorded by the model ----------------------------------------------------------

# the ablations (shared by several tests, so that their forward passes compile once)
MEAN = lh(chunk_repr="mean")
BOUNDS = lh(num_chunks=5, dense_length=80, chunk_repr="bounds")  # dense_length not a chunk multiple
ORIGINAL = lh(positions="original")
GROUP = lh(selection="group")
PARTS = lh(chunk_repr="attn-parts")  # 8 sub-chunks of 4 tokens
BEST_KEY = lh(chunk_repr="best-key")  # one key per part (mean-parts:32 here): a chunk scores its best key
SHORTLIST = lh(num_chunks=5, chunk_repr="shortlist:3")  # 3 of the 2..7 candidates re-scored by their best key
DISTINCT = lh(chunk_repr="distinct-keys:4")  # the 4 keys farthest from their chunk's mean


@pytest.mark.parametrize("attention", [LH, BOUNDS, SHORTLIST, DISTINCT, lh(num_chunks=13)], ids=label)
def test_model_selections_are_well_formed(gqa, attention):
    """T=300 (last chunk partial), 10 chunks: forced chunks present, nothing in the future, sorted,
    exactly min(N, cur+1) distinct chunks, unused slots hold the sentinel (= number of chunks)."""
    _, sel = run_forward(gqa, attention)
    l, C, N = 32, 10, attention.num_chunks
    first = (attention.dense_length // l) * l
    assert sel.shape == (2, 1, 4, C * l - first, N)
    sel = sel[:, 0, :, :T_LONG - first]  # L H T N
    cur = ((first + np.arange(T_LONG - first)) // l)[None, None, :, None]
    valid = sel < C
    assert np.all(sel[~valid] == C)
    assert np.all(np.where(valid, sel, 0) <= cur)  # no future chunk
    assert np.all(np.diff(sel, axis=-1) >= 0)
    assert np.all(np.diff(sel, axis=-1)[valid[..., 1:]] > 0)  # the valid chunks are distinct
    assert np.all(valid.sum(-1) == np.minimum(N, cur[..., 0] + 1))
    for forced in (0 * cur, cur, np.maximum(cur - 1, 0)):
        assert np.all(np.any(sel == forced, axis=-1))
    if N < C:  # heads, layers and tokens do choose differently
        late = sel[:, :, 160 - first:].reshape(-1, N)
        assert len({tuple(x) for x in late}) > 10


# --- 5. decode after prefill equals one forward pass -------------------------------------------

@pytest.mark.parametrize("attention", [LH, BOUNDS, ORIGINAL, GROUP, PARTS, BEST_KEY, SHORTLIST, DISTINCT], ids=label)
def test_decode_after_prefill_equals_forward(gqa, attention):
    """Prompt 150 (past dense_length, not a chunk multiple), then 150 teacher-forced decode steps
    across the chunk boundaries 160, 192, ..., 288; each step's logits equal forward()'s."""
    full, _ = run_forward(gqa, attention)
    rows = forced_decode(gqa, IDS, 150, attention)
    errs = np.abs(rows[0] - full[0, 149:]).max(-1)
    assert errs.max() <= TOL, f"max error {errs.max():.3g} at position {149 + errs.argmax()}"


def test_decode_crosses_dense_length(gqa):
    """A prompt shorter than dense_length; decoding crosses dense_length and then chunk boundaries
    (the released code raises here; the default mode keeps chunk summaries up to date)."""
    full, _ = run_forward(gqa, LH)
    rows = forced_decode(gqa, IDS, 40, LH)
    errs = np.abs(rows[0] - full[0, 39:]).max(-1)
    assert errs.max() <= TOL, f"max error {errs.max():.3g} at position {39 + errs.argmax()}"
    assert max_err(full[0, 160:], run_forward(gqa)[0][0, 160:]) > 1e-2  # selective, not dense


# --- 6. causality -------------------------------------------------------------------------------

@pytest.mark.parametrize("t,attention", [(100, LH), (175, LH), (223, LH), (175, SHORTLIST), (230, SHORTLIST)],
                         ids=["100", "175", "223", "shortlist-175", "shortlist-230"])
def test_future_tokens_do_not_change_past_logits(gqa, t, attention):
    """Including a query whose later chunk-mates (same block of the selection pass) change: a
    shortlist is each query's own, never the block's."""
    a, _ = run_forward(gqa, attention)
    other = IDS.copy()
    other[:, t + 1:] = rand_ids((1, T_LONG - t - 1), seed=t)
    b, _ = lh_jax.forward(gqa.params, gqa.config, other, attention=attention, return_aux=True)
    b = np.asarray(b)
    np.testing.assert_array_equal(a[:, :t + 1], b[:, :t + 1])
    assert max_err(a[:, t + 1:], b[:, t + 1:]) > 1e-3  # the perturbation does reach the model


def test_gradient_causality(gqa):
    """d logits[t] / d embedding: zero on the rows of tokens that occur only after t (the lm_head
    is untied, so the embedding enters through the inputs alone) and non-zero on earlier ones."""
    T, t = 256, 171
    rng = np.random.RandomState(12)
    past_vocab, future_vocab = np.arange(0, 128), np.arange(128, VOCAB)
    ids = np.concatenate([rng.choice(past_vocab, t + 1), rng.choice(future_vocab, T - t - 1)])[None]
    ids = ids.astype(np.int32)
    assert gqa.config.tie_word_embeddings is False
    attention = LongHeads(chunk_size=32, num_chunks=4, dense_length=64)

    def f(emb):
        params = {**gqa.params, "embed": {"embedding": emb}}
        return lh_jax.forward(params, gqa.config, ids, attention=attention)[0, t].sum()

    g = np.abs(np.asarray(jax.grad(f)(gqa.params["embed"]["embedding"]))).max(-1)
    assert np.all(g[future_vocab] == 0), np.nonzero(g[future_vocab])
    assert np.all(g[np.unique(ids[0, :t + 1])] > 0)


# --- 7. one decode compilation ------------------------------------------------------------------

def test_generation_compiles_decode_once(gqa):
    counts = runtime.TRACE_COUNTS
    attention = lh(kernel=Dispatch(tile_rows=2047))  # used by no other test, so the first call must compile
    prompt = IDS[:, :236]
    d0, g0 = counts["decode_step"], counts["generate"]
    first = np.asarray(lh_jax.generate(gqa.params, gqa.config, prompt, 64, attention=attention))
    assert (counts["decode_step"], counts["generate"]) == (d0 + 1, g0 + 1)
    second = np.asarray(lh_jax.generate(gqa.params, gqa.config, prompt[:, 1:], 60, attention=attention))
    assert (counts["decode_step"], counts["generate"]) == (d0 + 1, g0 + 1)  # same buckets
    assert second.shape == (1, 295)
    # greedy tokens are the argmax of forward() (tile_rows, a speed knob, changes nothing)
    logits = fwd(gqa, first, LH)[0, 235:299]
    picked = logits[np.arange(64), first[0, 236:]]
    assert np.all(picked >= logits.max(-1) - TOL)


# --- 8. batches with left padding, bfloat16 -------------------------------------------------------

def left_pad(prompts):
    T = max(len(p) for p in prompts)
    ids = np.full((len(prompts), T), 3, np.int32)
    mask = np.zeros((len(prompts), T), np.int32)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    return ids, mask


_batch_memo: dict = {}


def batch_case(m):
    """Two rows, 300 and 150 tokens, left-padded: LH forward logits, and LH greedy generation of
    150 tokens from the prompts IDS[:150] and a 131-token one (memoised; the sharding test
    compares against these)."""
    if m.path not in _batch_memo:
        rows = [IDS[0], rand_ids((150,), seed=15)]
        ids, mask = left_pad(rows)
        logits = fwd(m, ids, LH, attention_mask=mask)
        prompts = [IDS[0, :150], rand_ids((131,), seed=16)]
        g_ids, g_mask = left_pad(prompts)
        gen = np.asarray(lh_jax.generate(m.params, m.config, g_ids, 150, attention=LH, attention_mask=g_mask))
        _batch_memo[m.path] = dict(rows=rows, ids=ids, mask=mask, logits=logits, prompts=prompts, g_ids=g_ids,
                                   g_mask=g_mask, generated=gen)
    return _batch_memo[m.path]


def test_left_padded_batch_forward(gqa):
    case = batch_case(gqa)
    assert np.isfinite(case["logits"]).all()
    alone = [run_forward(gqa, LH)[0][0], fwd(gqa, case["rows"][1][None], LH)[0]]
    for i, p in enumerate(case["rows"]):
        assert max_err(case["logits"][i, T_LONG - len(p):], alone[i]) <= TOL, f"row {i}"


def assert_batch_equals_rows_alone(m, attention):
    """A left-padded batch of a 300- and a 190-token row: each row's logits equal the row's alone."""
    rows = [IDS[0], rand_ids((190,), seed=17)]
    ids, mask = left_pad(rows)
    batch = fwd(m, ids, attention, attention_mask=mask)
    for i, p in enumerate(rows):
        assert max_err(batch[i, T_LONG - len(p):], fwd(m, p[None], attention)[0]) <= TOL, f"row {i}"


def test_left_padded_shortlist_batch_equals_rows_alone(gqa):
    assert_batch_equals_rows_alone(gqa, SHORTLIST)


def test_left_padded_batch_generate(gqa):
    case = batch_case(gqa)
    batch, n = case["generated"], 150  # across several chunk boundaries
    for i, p in enumerate(case["prompts"]):
        alone = np.asarray(lh_jax.generate(gqa.params, gqa.config, p[None], n, attention=LH))
        np.testing.assert_array_equal(batch[i, 150:], alone[0, len(p):], err_msg=f"row {i}")
        if i == 0:  # and the greedy tokens are forward()'s argmax
            logits = fwd(gqa, alone, LH)[0, 149:299]
            picked = logits[np.arange(n), alone[0, 150:]]
            assert np.all(picked >= logits.max(-1) - TOL)
            assert len(set(alone[0, 150:].tolist())) > 5  # not a degenerate repetition


def test_bfloat16_params(gqa):
    config, params16 = lh_jax.load(gqa.path, dtype="bfloat16", progress=False)
    assert params16["embed"]["embedding"].dtype == jnp.bfloat16
    l16 = np.asarray(lh_jax.forward(params16, config, IDS, attention=LH))
    l32, _ = run_forward(gqa, LH)
    assert np.isfinite(l16).all()
    assert np.corrcoef(l16.ravel(), l32.ravel())[0, 1] > 0.95
    out = np.asarray(lh_jax.generate(params16, config, IDS[:, :150], 40, attention=LH))
    assert out.shape == (1, 190) and (out >= 0).all() and (out < VOCAB).all()
    # on the CPU generation keeps the cache in float32 (XLA:CPU would upcast a bfloat16 cache whole
    # at every decode step); elsewhere in the params' dtype
    want = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    assert runtime.cache_dtype(params16) == want and runtime.cache_dtype(gqa.params) == jnp.float32


# --- 9. ablations -------------------------------------------------------------------------------

ABLATIONS = {"mean": MEAN, "bounds": BOUNDS, "original": ORIGINAL, "group": GROUP, "attn-parts": PARTS}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_runs_and_differs(gqa, name):
    base_logits, base_sel = run_forward(gqa, LH)
    logits, sel = run_forward(gqa, ABLATIONS[name])
    assert np.isfinite(logits).all()
    assert max_err(logits[:, :64], base_logits[:, :64]) <= EXACT  # the dense phase is shared
    assert max_err(logits[:, 160:], base_logits[:, 160:]) > 1e-3  # the selective phase is not
    if name == "original":
        np.testing.assert_array_equal(sel[0], base_sel[0])  # layer 0 picks the same chunks
    elif sel.shape == base_sel.shape:
        assert np.mean(sel != base_sel) > 0.01  # another representation/selection picks others


def test_group_selection_is_shared_within_kv_groups(gqa):
    _, sel = run_forward(gqa, ABLATIONS["group"])  # [L, B, H=4, T', N], kv groups {0, 1}, {2, 3}
    np.testing.assert_array_equal(sel[:, :, 0], sel[:, :, 1])
    np.testing.assert_array_equal(sel[:, :, 2], sel[:, :, 3])
    assert np.any(sel[:, :, 0] != sel[:, :, 2])
    _, head_sel = run_forward(gqa, LH)
    assert np.any(head_sel[:, :, 0] != head_sel[:, :, 1])  # per-head selection does differ


# --- 10. bad settings -----------------------------------------------------------------------------



@pytest.mark.parametrize("kwargs,name", [
    (dict(chunk_size=0, num_chunks=4), "chunk_size"),
    (dict(chunk_size=-32, num_chunks=4), "chunk_size"),
    (dict(chunk_size=32.0, num_chunks=4), "chunk_size"),
    (dict(chunk_size=32, num_chunks=0), "num_chunks"),
    (dict(chunk_size=32, num_chunks=-2), "num_chunks"),
    (dict(chunk_size=32, num_chunks=2), "num_chunks"),
    (dict(chunk_size=32, num_chunks=4, dense_length=-1), "dense_length"),
    (dict(chunk_size=32, num_chunks=4, chunk_repr="median"), "chunk_repr"),
    (dict(chunk_size=32, num_chunks=4, positions="absolute"), "positions"),
    (dict(chunk_size=32, num_chunks=4, selection="layer"), "selection"),
    (dict(chunk_size=32, num_chunks=4, dense_length=100, reference=True), "dense_length=100 must be a multiple"),
    (dict(chunk_size=32, num_chunks=4, kernel="dispatch"), "kernel must be a lh_jax.longheads.Dispatch"),
    (dict(chunk_size=32, num_chunks=4, selector="best"), "selector"),
])
def test_bad_settings_raise_at_construction(kwargs, name):
    with nothing_compiles(), pytest.raises(ValueError, match=name):
        LongHeads(**kwargs)


@pytest.mark.parametrize("kwargs,name", [(dict(tile_rows=0), "tile_rows"), (dict(tile_rows=2.5), "tile_rows"),
                                         (dict(selection_segments=0), "selection_segments")])
def test_bad_kernel_knobs_raise_at_construction(kwargs, name):
    with nothing_compiles(), pytest.raises(ValueError, match=name):
        Dispatch(**kwargs)


def test_window_beyond_trained_length_warns(models):
    m = models["gqa"]  # trained on 1024 tokens
    attention = LongHeads(chunk_size=256, num_chunks=8)  # window 2048
    with pytest.warns(UserWarning, match="trained length"):
        fwd(m, rand_ids((1, 40), seed=22), attention)
    with warnings_as_errors():  # a window inside the trained length does not warn
        LongHeads(chunk_size=256, num_chunks=4).validate(m.config)


@contextlib.contextmanager
def warnings_as_errors():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        yield


# --- 11. sharding ---------------------------------------------------------------------------------

SHARD_SCRIPT = textwrap.dedent(r"""
    import os, sys
    sys.path.insert(0, TESTS_DIR)
    import jax, jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    assert len(jax.devices()) == 4, jax.devices()

    import lh_jax
    from lh_jax import runtime
    from test_longheads import LH, build_llama

    want = np.load(os.path.join(WORK, "want.npz"))
    path = build_llama(os.path.join(WORK, "m"), 4, 2, seed=1)  # the `gqa` model of the main process
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    config, params = lh_jax.load(path, mesh=mesh, progress=False)
    q = params["layers"]["q_proj"]["kernel"]
    assert q.sharding.spec == P(None, None, "model"), q.sharding.spec
    assert len(q.sharding.device_set) == 4
    assert params["layers"]["k_proj"]["kernel"].sharding.spec == P(None, None, "model")
    data = NamedSharding(mesh, P("data"))
    put = lambda x: jax.device_put(jnp.asarray(x), data)

    # prefill (forward) of a left-padded batch, rows on "data", heads on "model"
    logits = runtime._forward(params, put(want["ids"]), put(want["mask"].astype(bool)), config, LH, False)
    err = float(np.abs(np.asarray(logits) - want["logits"]).max())
    assert err <= 1e-5, ("forward", err)

    # prefill + 150 decode steps
    ids, mask = want["g_ids"], want["g_mask"].astype(bool)
    B, T = ids.shape
    T_pad, steps = runtime._round_up(T, runtime.PROMPT_BUCKET), 256  # as lh_jax.generate buckets them
    ids_p, mask_p = np.zeros((B, T_pad), np.int32), np.zeros((B, T_pad), bool)
    ids_p[:, T_pad - T:], mask_p[:, T_pad - T:] = ids, mask
    new = runtime._generate(params, put(ids_p), put(mask_p), jnp.int32(150), config, LH, T_pad + steps, steps)
    np.testing.assert_array_equal(np.asarray(new)[:, :150], want["generated"][:, T:])
    print("ALL OK", err)
""")


def test_sharded_longheads_equals_unsharded(gqa, tmp_path):
    """Heads on "model", rows on "data" (2 x 2 virtual CPU devices): the left-padded batch's
    forward logits and greedy generation (prefill + decode) equal the unsharded ones."""
    case = batch_case(gqa)
    assert case["g_ids"].shape == (2, 150)
    np.savez(tmp_path / "want.npz", **{k: case[k] for k in ("ids", "mask", "logits", "g_ids", "g_mask", "generated")})
    run_on_virtual_devices(SHARD_SCRIPT, tmp_path, timeout=500)
