"""An lm-evaluation-harness model (`pip install -e ".[lm-eval]"`): its tasks run on lh-jax models
with any attention method of the grammar in `lh_jax.methods` (full, ntk, sliding:128x32,
longheads:recommended, ...).

    python -m lh_jax.lm_eval --model lh-jax \
        --model_args pretrained=default,attention=longheads:recommended --tasks TASK

or, in Python, `lm_eval.simple_evaluate(model=LhJaxLM("default", attention="longheads:128x32"), ...)`.
Importing this module registers the model under the name "lh-jax".

The harness does the request bookkeeping (splitting context from continuation, rolling windows,
caching); this class only scores and generates: `loglikelihood` with one forward pass per request
(the continuation's log-probabilities and whether greedy decoding would produce it),
`loglikelihood_rolling` over the whole text (no windowing: long inputs are the point), and
`generate_until` with greedy decoding cut at the first stop string.
"""
from __future__ import annotations

import numpy as np

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("lh_jax.lm_eval needs lm-evaluation-harness: pip install -e '.[lm-eval]'") from e

import jax
import jax.numpy as jnp

import lh_jax
from lh_jax import runtime
from lh_jax.methods import MethodSpec

LENGTH_BUCKET = 64  # prompts are left-padded to a multiple of this: one compile serves a range


@register_model("lh-jax")
class LhJaxLM(TemplateLM):
    """pretrained: a path, hub id or "default"; attention: a method name ("full",
    "longheads:recommended", "ntk", ...) or an attention object; dtype: the weights' dtype;
    max_gen_toks: the default generation length."""

    def __init__(self, pretrained: str = "default", attention="full", dtype: str = "float32",
                 max_gen_toks: int = 256, revision: str | None = None, **unused):
        super().__init__()
        if not str(max_gen_toks).isdigit() or int(max_gen_toks) < 1:
            raise ValueError(f"max_gen_toks must be a positive integer, got {max_gen_toks!r}")
        self.max_gen_toks = int(max_gen_toks)
        spec = MethodSpec.parse(attention) if isinstance(attention, str) else None  # errors before loading
        self.config, self.params = lh_jax.load(pretrained, dtype=dtype, revision=revision)
        self.tokenizer = lh_jax.load_tokenizer(pretrained)
        if spec is not None:
            self.config, self.attention = spec.build(self.config, self.config.max_position_embeddings)
        else:
            self.attention = attention
        self.attention = runtime.resolve_attention(self.attention)
        self.attention.validate(self.config)

    # --- what TemplateLM needs --------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = self.config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return int(eos[0] if isinstance(eos, (tuple, list)) else eos)

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- scoring ----------------------------------------------------------------------------------

    def _continuation_scores(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(sum of log p(continuation | context), every continuation token the argmax)."""
        ids = list(context) + list(continuation)
        n = len(continuation)
        T = len(ids)
        T_pad = -(-T // LENGTH_BUCKET) * LENGTH_BUCKET
        row = np.zeros((1, T_pad), np.int32)
        mask = np.zeros((1, T_pad), bool)
        row[0, T_pad - T:], mask[0, T_pad - T:] = ids, True
        keep = min(T_pad, -(-(n + 1) // 16) * 16)  # the last n + 1 positions, rounded to bound compiles
        logits = lh_jax.forward(self.params, self.config, row, attention=self.attention, attention_mask=mask,
                                logits_to_keep=keep)[0]
        logp = jax.nn.log_softmax(logits[keep - n - 1:keep - 1].astype(jnp.float32), axis=-1)  # predicts ids[-n:]
        target = jnp.asarray(continuation, jnp.int32)
        total = float(jnp.sum(jnp.take_along_axis(logp, target[:, None], axis=-1)))
        greedy = bool(jnp.all(jnp.argmax(logp, axis=-1) == target))
        return total, greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        out = []
        for key, context, continuation in requests:
            result = self._continuation_scores(context, continuation)
            self.cache_hook.add_partial("loglikelihood", key, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            (text,) = request.args
            ids = self.tok_encode(text)
            if not ids:
                raise ValueError("loglikelihood_rolling: the text encodes to no tokens")
            total, _ = self._continuation_scores([self.prefix_token_id], ids)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # --- generation -------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
            if gen_kwargs.pop("do_sample", False) is False:
                temperature = 0.0
            ids = np.asarray([self.tok_encode(context)], np.int32)
            new = lh_jax.generate(self.params, self.config, ids, max_new_tokens=max_new, attention=self.attention,
                                  temperature=temperature, top_p=float(gen_kwargs.pop("top_p", 1.0) or 1.0),
                                  seed=int(gen_kwargs.pop("seed", 0) or 0), stop_at_eos=True)
            text = self.tok_decode(runtime.cut_at_eos(np.asarray(new[0, ids.shape[1]:]), self.config.eos_token_id))
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
            out.append(text)
        return out


def main(argv=None) -> None:
    """`lm_eval`'s own command line with "lh-jax" registered (`python -m lh_jax.lm_eval ...`)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
