"""What the remat policies keep (``model.remat``, routezoo/zoo/stack.py ``REMAT_POLICIES``):
the saved residuals of a block's gradient, read from the jaxpr (nothing is compiled).

``save_moe_dispatch`` keeps what the MoE layers name with ``checkpoint_name``: the
dispatch's indices (``moe_perm``) and the experts' input (``moe_gmm_in``: dropless
``[T·K, D]`` sorted rows, capacity ``[G, E, C, D]`` buffers), never the hidden
``[T·K, F]``; the dispatch's sort (and, with expert parallelism, its exchange to the
experts) is not run again in the backward pass. ``save_moe_dispatch_attn`` also keeps
every attention layer's output before its projection (``attn_out``).

Shapes: B=2, L=7, D=16, F=40, E=4, K=2 (T=14, T·K=28), chosen so that no two of these
shapes coincide; the grouped matmul is ``ragged_dot`` (rows ``[T·K, F]``; ``blocked`` pads them).
"""

from __future__ import annotations

import contextlib
import functools
import io
import re

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from jax.ad_checkpoint import print_saved_residuals

from routezoo.configs import base
from routezoo.layers import moe as moe_lib
from routezoo.layers import sharding
from routezoo.layers.attention import ATTN_OUT, Attention
from routezoo.layers.mla import MLAttention
from routezoo.layers.moe.uoe import SelectiveAttention
from routezoo.layers.t5 import T5Attention
from routezoo.zoo import stack

B, L, D, F, E, K, H, A = 2, 7, 16, 40, 4, 2, 2, 8
T = B * L


def moe_cfg(**overrides):
    cfg = base.get_config().model.moe
    cfg.update(dict(num_experts=E, k=K, expert_dim=F, gmm_backend="ragged_dot", jitter=0.0))
    cfg.update(overrides)
    return cfg


class MoELayer(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, x):
        y, _ = moe_lib.moe_from_config(self.cfg, d_model=D, dtype=jnp.float32, param_dtype=jnp.float32,
                                       name="moe")(x, deterministic=True)
        return y


class AttnLayer(nn.Module):
    kind: str

    @nn.compact
    def __call__(self, x):
        if self.kind == "mha":
            return Attention(num_heads=H, num_kv_heads=1, head_dim=A, name="attn")(x)
        if self.kind == "mla":
            return MLAttention(num_heads=H, kv_lora_rank=6, qk_nope_head_dim=A, qk_rope_head_dim=4,
                               v_head_dim=10, name="attn")(x)
        if self.kind == "t5":
            return T5Attention(num_heads=H, head_dim=A, name="attn")(x)
        return SelectiveAttention(num_heads=H, head_dim=A, k=1, name="attn")(x)[0]


def _x(shape=(B, L, D)):
    return jax.random.normal(jax.random.key(0), shape, jnp.float32)


def _loss(layer_cls, policy, *args, concrete=False):
    """``(loss(params, x), params, x)`` of ``layer_cls(*args)`` under ``policy``; the
    parameters are shapes unless ``concrete``."""
    model = stack.remat_block(layer_cls, policy, (), in_scan=False)(*args)
    x = _x()
    init = jax.jit(model.init) if concrete else functools.partial(jax.eval_shape, model.init)
    params = nn.unbox(init(jax.random.key(1), x))
    return (lambda p, x: jnp.sum(model.apply(p, x) ** 2)), params, x


def residuals(f, *args):
    """``[(dtype, shape, name or None)]`` of the residuals ``jax.vjp(f)`` saves, as
    ``jax.ad_checkpoint.print_saved_residuals`` lists them."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, *args)
    found = []
    for line in out.getvalue().splitlines():
        m = re.match(r"(\w+)\[([\d,]*)\]( named '(\w+)')?", line)
        assert m, line
        shape = tuple(int(n) for n in m.group(2).split(",") if n)
        found.append((m.group(1), shape, m.group(4)))
    return found


def shapes(found, dtype=None):
    return {shape for dt, shape, _ in found if dtype is None or dt == dtype}


def test_save_moe_dispatch_keeps_the_sorted_rows_not_the_hidden():
    """Dropless: ``save_moe_dispatch`` keeps ``[T·K, D]`` and the permutation ``[T·K]``, no
    ``[T·K, F]``; ``none`` keeps the hidden (the check can see it), ``full`` neither."""
    got = {p: residuals(*_loss(MoELayer, p, moe_cfg())) for p in stack.REMAT_POLICIES}
    assert (T * K, F) in shapes(got["none"], "f32")
    for policy in ("save_moe_dispatch", "save_moe_dispatch_attn"):
        res = got[policy]
        assert (T * K, F) not in shapes(res)
        assert ("f32", (T * K, D), "moe_gmm_in") in res
        assert ("i32", (T * K,), "moe_perm") in res
        assert shapes(res) != shapes(got["full"])
    assert (T * K, D) not in shapes(got["full"]) and (T * K, F) not in shapes(got["full"])
    assert all(name is None for _, _, name in got["full"])


def test_save_moe_dispatch_keeps_the_capacity_buffers():
    """Capacity dispatch: the ``[G, E, C, D]`` buffers are kept, the ``[G, E, C, F]``
    hidden is not."""
    cfg = moe_cfg(dispatch="capacity", capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=1)
    c = moe_lib.expert_capacity(L, E, K, 1.0, 1)
    res = residuals(*_loss(MoELayer, "save_moe_dispatch", cfg))
    assert ("f32", (B, E, c, D), "moe_gmm_in") in res
    assert (B, E, c, F) not in shapes(res)
    assert (B, E, c, F) in shapes(residuals(*_loss(MoELayer, "none", cfg)))


def _count(jaxpr, pred) -> int:
    """Equations of ``jaxpr`` and every jaxpr nested in their parameters where ``pred(eqn)``."""
    n = 0
    for eqn in jaxpr.eqns:
        n += bool(pred(eqn))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    n += _count(sub, pred)
    return n


def _grad_jaxpr(policy, cfg, x=None):
    f, params, x0 = _loss(MoELayer, policy, cfg)
    return jax.make_jaxpr(jax.grad(f))(params, x0 if x is None else x).jaxpr


def test_the_dispatch_sort_is_not_recomputed():
    """The argsort of the ``T·K`` copies runs once with ``none`` and ``save_moe_dispatch``
    (its permutation is kept), twice with ``full`` (forward and recompute)."""
    def dispatch_sorts(policy):
        return _count(_grad_jaxpr(policy, moe_cfg()),
                      lambda e: e.primitive.name == "sort" and e.outvars[0].aval.shape == (T * K,))
    assert [dispatch_sorts(p) for p in ("none", "save_moe_dispatch", "full")] == [1, 1, 2]


def test_expert_parallel_dispatch_exchange_is_not_recomputed():
    """Padded expert parallelism on 4 expert shards: the forward pass has 3 ``all_to_all``
    (rows, expert ids, rows back); ``full`` runs the 3 again in the backward pass,
    ``save_moe_dispatch`` only the exchange back (the combine's gradient needs the experts'
    outputs), not the exchange to the experts."""
    mesh = sharding.make_mesh({"expert": 4, "data": 2})
    cfg = moe_cfg(ep_exchange="padded")
    x = jnp.zeros((8, 4, D), jnp.float32)   # T = 32 splits over the 8 token shards
    counts = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        x = jax.device_put(x, sharding.logical_sharding(mesh, ("batch", "length", "act_embed")))
        for policy in ("none", "save_moe_dispatch", "full"):
            f, params, _ = _loss(MoELayer, policy, cfg, concrete=True)
            jaxpr = jax.make_jaxpr(jax.grad(f))(params, x).jaxpr
            counts[policy] = _count(jaxpr, lambda e: e.primitive.name == "all_to_all")
    assert counts["full"] - counts["none"] == 3
    assert counts["save_moe_dispatch"] - counts["none"] == 1


@pytest.mark.parametrize("kind", ["mha", "mla", "t5", "uoe"])
def test_save_moe_dispatch_attn_keeps_the_attention_output(kind):
    """Every attention layer names its output before the output projection ``attn_out``:
    ``save_moe_dispatch_attn`` keeps it (``[B, L, H, A]``; latent attention ``[B, L, H, v]``),
    ``save_moe_dispatch`` keeps nothing of an attention-only block."""
    width = 10 if kind == "mla" else A
    res = residuals(*_loss(AttnLayer, "save_moe_dispatch_attn", kind))
    assert [(dt, s) for dt, s, name in res if name == ATTN_OUT] == [("f32", (B, L, H, width))]
    assert all(name is None for _, _, name in residuals(*_loss(AttnLayer, "save_moe_dispatch", kind)))
