"""Sharded loading on 4 virtual CPU devices equals unsharded loading.

The device count is fixed when jax initialises, so the check runs in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=4`.
"""
from __future__ import annotations

import textwrap

import pytest

from conftest import run_on_virtual_devices

SCRIPT = textwrap.dedent(r"""
    import os, sys
    sys.path.insert(0, TESTS_DIR)
    import jax
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P

    assert len(jax.devices()) == 4, jax.devices()

    import lh_jax
    from lh_jax.convert import convert, default_param_specs
    from conftest import build_hf_model, random_ids, save_hf_model

    def check(name, arch, kw, mesh_shape, expect_kv_sharded):
        model = build_hf_model(arch, seed=1, **kw)
        path = save_hf_model(model, os.path.join(WORK, name))
        config, ref = lh_jax.load(path, progress=False)
        mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), ("data", "model"))
        n = mesh.shape["model"]
        cfg2, params = lh_jax.load(path, mesh=mesh, progress=False)
        assert cfg2 == config

        q = params["layers"]["q_proj"]["kernel"]
        assert q.sharding.spec == P(None, None, "model"), q.sharding.spec
        assert len(q.sharding.device_set) == 4
        assert q.addressable_shards[0].data.shape == (config.num_layers, config.hidden_size,
                                                       config.num_heads * config.head_dim // n)
        assert params["layers"]["down_proj"]["kernel"].sharding.spec == P(None, "model", None)
        assert params["layers"]["gate_proj"]["kernel"].sharding.spec == P(None, None, "model")
        assert params["embed"]["embedding"].sharding.spec == P("model", None)
        k_spec = params["layers"]["k_proj"]["kernel"].sharding.spec
        assert (k_spec == P(None, None, "model")) == expect_kv_sharded, k_spec
        if "lm_head" in params:
            assert params["lm_head"].sharding.spec == P(None, "model")
        specs = default_param_specs(config, mesh)
        for (path_, x), s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(
                specs, is_leaf=lambda v: isinstance(v, P))):
            assert x.sharding.spec == s, (path_, x.sharding.spec, s)
        # same values
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

        ids = random_ids((2, 96), seed=5)
        mask = np.ones_like(ids)
        mask[1, :30] = 0
        want = np.asarray(lh_jax.forward(ref, config, ids, attention_mask=mask))
        got = np.asarray(lh_jax.forward(params, config, ids, attention_mask=mask))
        err = float(np.abs(want - got).max())
        assert err <= 1e-5, (name, "forward", err)

        gw = np.asarray(lh_jax.generate(ref, config, ids, 16, attention_mask=mask))
        gg = np.asarray(lh_jax.generate(params, config, ids, 16, attention_mask=mask))
        np.testing.assert_array_equal(gw, gg)

        # orbax checkpoints restore straight into the sharding
        dst = os.path.join(WORK, name + "_orbax")
        convert(path, dst, progress=False)
        _, restored = lh_jax.load(dst, mesh=mesh)
        assert restored["layers"]["q_proj"]["kernel"].sharding.spec == P(None, None, "model")
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(restored)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        got = np.asarray(lh_jax.forward(restored, config, ids, attention_mask=mask))
        assert float(np.abs(want - got).max()) <= 1e-5
        print(name, "ok", err)

    base = dict(vocab_size=384, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=1024)
    check("gqa_untied", "LlamaForCausalLM",
          dict(base, hidden_size=128, num_attention_heads=8, num_key_value_heads=4), (1, 4), True)
    check("mqa_tied", "Qwen2ForCausalLM",
          dict(base, hidden_size=64, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
          (2, 2), False)
    print("ALL OK")
""")


@pytest.mark.slow
def test_sharded_load_equals_unsharded(tmp_path):
    run_on_virtual_devices(SCRIPT, tmp_path, timeout=400)
