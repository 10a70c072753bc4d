"""The lm-evaluation-harness model "lh-jax" (lh_jax/lm_eval.py), run by the harness itself on local
tasks (JSON files and task YAMLs written here, no network): its log-likelihoods, rolling
log-likelihoods and generations equal transformers' PyTorch model on the same tokens."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import missing_asset, save_tiny_with_tokenizer, torch_greedy, torch_logits

try:
    import lm_eval
    from lm_eval.tasks import TaskManager
except ImportError:  # the [lm-eval] extra is not installed
    lm_eval = None

TASKS = {
    "lh_mc": """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
""",
    "lh_gen": """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
""",
    "lh_roll": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
""",
}
DOCS = {
    "lh_mc": [{"question": "The sky is", "choices": [" blue", " green tea", " made of cheese"], "answer": 0},
              {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0}],
    "lh_gen": [{"prompt": "Once upon a time", "target": " there"},
               {"prompt": "The capital of France is", "target": " Paris"}],
    "lh_roll": [{"text": "It was the best of times, it was the worst of times."}],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if lm_eval is None:
        missing_asset("lm-evaluation-harness is not installed (pip install -e '.[lm-eval]')")
    import lh_jax.lm_eval  # noqa: F401  (registers "lh-jax")
    root = tmp_path_factory.mktemp("lm_eval")
    model = save_tiny_with_tokenizer(root / "model", seed=5)
    tasks = root / "tasks"
    tasks.mkdir()
    for name, body in TASKS.items():
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in DOCS[name]))
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")
    return model, str(tasks)


def evaluate(model, tasks, attention="full"):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return lm_eval.simple_evaluate(model="lh-jax", model_args=f"pretrained={model},attention={attention}",
                                   tasks=list(TASKS), task_manager=TaskManager(include_path=tasks),
                                   log_samples=True, bootstrap_iters=0)


def torch_continuation_logprob(model, context_ids, continuation_ids) -> tuple[float, bool]:
    ids = np.asarray([list(context_ids) + list(continuation_ids)])
    logits = torch.log_softmax(torch.as_tensor(torch_logits(model, ids)[0]), -1).numpy()
    n = len(continuation_ids)
    rows = logits[len(context_ids) - 1:len(context_ids) - 1 + n]
    return float(rows[np.arange(n), continuation_ids].sum()), bool((rows.argmax(-1) == continuation_ids).all())


def test_harness_runs_lh_jax_equal_to_transformers(setup):
    model, tasks = setup
    out = evaluate(model, tasks)
    lm = lm_eval.api.registry.get_model("lh-jax")  # the class; its tokenizer rules are the harness's
    from lh_jax import load_tokenizer
    tok = load_tokenizer(model)
    encode = lambda s: tok.encode(s, add_special_tokens=False)
    assert lm.__name__ == "LhJaxLM"

    samples = out["samples"]
    assert [len(samples[t]) for t in TASKS] == [len(DOCS[t]) for t in TASKS]
    for s in samples["lh_mc"]:
        for (context, continuation), (resp,) in zip([a for a in s["arguments"]], s["resps"]):
            whole, ctx = encode(context + continuation), encode(context)
            ll, greedy = torch_continuation_logprob(model, ctx, whole[len(ctx):])
            assert resp[0] == pytest.approx(ll, abs=2e-3) and resp[1] == greedy
    for s in samples["lh_gen"]:
        ctx = encode(s["arguments"][0][0])
        ref = torch_greedy(model, np.asarray([ctx]), 6)[0, len(ctx):]
        text = tok.decode(ref, skip_special_tokens=True).split(".")[0]
        assert s["resps"][0][0] == text
    (s,) = samples["lh_roll"]
    ids = encode(DOCS["lh_roll"][0]["text"])
    ll, _ = torch_continuation_logprob(model, [2], ids)  # the model's EOS (2) as the prefix token
    assert s["resps"][0][0] == pytest.approx(ll, abs=2e-3)
    assert out["results"]["lh_mc"]["acc,none"] in (0.0, 0.5, 1.0)


def test_attention_argument_reaches_the_model(setup):
    """With a LongHeads window shorter than the rolling text, its log-likelihood differs from full
    attention's (the setting is used), and it stays finite."""
    model, tasks = setup
    import lh_jax.lm_eval as adapter
    long_text = " ".join(f"line {i} of the story goes on." for i in range(20))  # > 64 tokens
    full = adapter.LhJaxLM(model, attention="full")
    lh = adapter.LhJaxLM(model, attention="longheads:8x4")
    request = type("R", (), {"args": (long_text,)})()
    a, b = full.loglikelihood_rolling([request])[0], lh.loglikelihood_rolling([request])[0]
    assert np.isfinite(b) and abs(a - b) > 1e-3


def test_bad_attention_fails_before_loading(setup, tmp_path):
    import lh_jax.lm_eval as adapter
    with pytest.raises(ValueError, match="unknown method 'warp'"):
        adapter.LhJaxLM(str(tmp_path / "nothing here"), attention="warp")
    for bad in (0, "0", "x", -3):
        with pytest.raises(ValueError, match="max_gen_toks must be a positive integer"):
            adapter.LhJaxLM(str(tmp_path / "nothing here"), max_gen_toks=bad)


def test_command_line(setup, tmp_path):
    model, tasks = setup
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "lh_jax.lm_eval", "--model", "lh-jax", "--model_args",
                        f"pretrained={model},attention=full", "--tasks", "lh_mc", "--include_path", tasks,
                        "--output_path", str(tmp_path / "res")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lh_mc" in r.stdout and "acc" in r.stdout, r.stdout[-2000:]
