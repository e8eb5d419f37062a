"""The router and adapter registries, and the config keys each router declares.

* Importing any one of ``routezoo.layers.routers``, ``routezoo.layers.adapters`` or
  ``routezoo.layers.moe`` in a fresh interpreter fills both registries completely.
* Every ``model.moe`` key a router reads (building it, checking its config, building its
  block and its model-level pieces) is one of the keys common to all MoE blocks or one it
  declares in ``config_keys``; ``configs/base.py`` holds exactly those keys and defaults.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from routezoo.configs import base
from routezoo.layers.routers import ROUTERS, router_config_keys

ALL_ROUTERS = {"top_k", "expert_choice", "deepseek_v3", "deepseek_v2", "hash", "thor", "smoe_dropout",
               "top_p", "null_experts", "recurrent", "pregate", "soft", "uoe", "duo"}
ALL_METHODS = {"lora", "dora", "pissa", "mos", "hydra", "poly", "mhr", "mhr_z", "mhr_mu", "scalearn", "phatgoose_gate",
               "phatgoose", "glider", "multi_lora", "rps"}

_LISTS = """
import json
from routezoo.layers.routers import ROUTERS
from routezoo.layers.adapters import METHODS
print(json.dumps({"routers": sorted(ROUTERS), "methods": sorted(METHODS)}))
"""


@pytest.mark.parametrize("first", ["routezoo.layers.routers", "routezoo.layers.adapters", "routezoo.layers.moe"])
def test_registries_complete_after_any_first_import(first):
    # a fresh interpreter: the registries must not depend on what the test session imported
    probe = f"import {first}\nimport sys\nassert {first!r} in sys.modules\n" + _LISTS
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    lists = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(lists["routers"]) == ALL_ROUTERS
    assert set(lists["methods"]) == ALL_METHODS


def test_this_session_registry():
    assert set(ROUTERS) == ALL_ROUTERS
    for name, cls in ROUTERS.items():
        assert cls.router_name == name


def _common_moe() -> dict:
    """The ``model.moe`` keys common to all MoE blocks: the schema minus the routers' own."""
    own = router_config_keys()
    return {k: v for k, v in base.get_config().model.moe.to_dict().items() if k not in own}


def test_schema_is_common_keys_plus_router_keys():
    moe = base.get_config().model.moe.to_dict()
    keys = router_config_keys()
    for key, default in keys.items():
        assert key in moe and moe[key] == default and type(moe[key]) is type(default), key
    # a key of one router never doubles as a common key
    assert not set(keys) & set(_common_moe())


def _restricted_moe(name: str, **overrides) -> ml_collections.ConfigDict:
    """``model.moe`` with only the common keys and the ones ``name`` declares."""
    moe = {**_common_moe(), **ROUTERS[name].config_keys, "router": name, **overrides}
    return ml_collections.ConfigDict(moe)


@pytest.mark.parametrize("name", sorted(ALL_ROUTERS))
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_router_reads_only_common_and_declared_keys(name, dispatch):
    cls = ROUTERS[name]
    moe = _restricted_moe(name, dispatch=dispatch)
    # a missing key raises KeyError / AttributeError, which the test reports; ValueError is a
    # legitimate refusal of the settings
    for causal in (False, True):
        try:
            cls.check_config(moe, causal=causal)
        except ValueError:
            pass
    cls.from_config(moe, parent=None)
    cls.eval_variants(moe)
    cls.active_expert_fraction(moe, 32)
    block = cls.build_block(moe, d_model=32, dtype=jnp.float32, param_dtype=jnp.float32, name="moe")
    assert block is not None


def _model_cfg(name: str) -> ml_collections.ConfigDict:
    m = base.get_config().model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 2, 32, 2, 2, 16, 64
    m.ffn, m.vocab_size = "moe", 64
    d = m.to_dict()
    d["moe"] = _restricted_moe(name, expert_dim=32, num_experts=4, k=1).to_dict()
    return ml_collections.ConfigDict(d)


@pytest.mark.parametrize("name", ["recurrent", "pregate", "uoe", "duo", "thor", "hash"])
def test_model_level_hooks_read_only_declared_keys(name):
    from routezoo.zoo.lm import DecoderLM
    model = DecoderLM(ml_collections.FrozenConfigDict(_model_cfg(name)))
    tokens = jnp.ones((2, 8), jnp.int32)
    key = jax.random.key(0)
    rngs = {"params": key, "router": key, "dropout": key}
    variables = jax.eval_shape(lambda: model.init(rngs, tokens))
    logits, aux = jax.eval_shape(lambda v: model.apply(v, tokens, deterministic=False, rngs=rngs), variables)
    assert logits.shape == (2, 8, 64)
    if name == "thor":
        assert "thor_consistency" in aux["losses"]


def test_router_config_keys_refuses_conflicting_defaults():
    from routezoo.layers.routers import base as routers_base

    class A(routers_base.Router):
        config_keys = {"clash_key": 1}

    class B(routers_base.Router):
        config_keys = {"clash_key": 2}

    saved = dict(ROUTERS)
    try:
        ROUTERS["_a"], ROUTERS["_b"] = A, B
        with pytest.raises(ValueError, match=r"moe.clash_key: routers '_a' and '_b' declare different defaults"):
            router_config_keys()
    finally:
        ROUTERS.clear()
        ROUTERS.update(saved)
