"""The ``mosaic`` backend (jax's Mosaic GPU grouped-matmul kernels, run here in jax's Mosaic
GPU interpreter) under routezoo's contract: against a dense reference, forward and both
gradients, with dimensions the kernels cannot take directly (padded by the wrapper), empty
groups and rows past ``sum(group_sizes)`` that must be exactly 0; the per-shape choice of
kernel for each pass; and a MoE block on it against the dense backend.

Not covered on CPU: the Mosaic weight-gradient kernel (``transposed_ragged_dot``), which
the interpreter of jax 0.10-0.11 cannot run (no ``layout_cast``), and the forward kernel
with transposed weights (no transposed ``wgmma`` operand there; interpreted runs use a
transposed copy). Both are checked on an H200 by ``benchmarks/gmm_kernel.py``'s
correctness check (BENCHMARKS.md).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from routezoo.layers.moe.gmm import gmm_dense
from routezoo.layers.moe.kernels import gmm_mosaic as gm

pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params",
                    reason="this jax has no Mosaic GPU interpreter")

TILES = gm.MosaicTiles(block_m=64, block_n=64, block_k=64, steps=2, grid_block_n=1)
# Forward and backward data on the Mosaic kernel, weight gradient on the Triton kernel.
MOSAIC_FWD_DLHS = gm.MosaicConfig(fwd=TILES, dlhs=TILES, tgmm=None)


@pytest.mark.parametrize("m,k,n,sizes", [
    (256, 96, 80, [70, 0, 100, 50]),   # K, N padded to the tiles; 36 rows past the groups
    (130, 64, 128, [0, 130, 0]),       # one group holds every row; M not a multiple of 64
])
def test_matches_dense_reference(m, k, n, sizes):
    kx, kw, kc = jax.random.split(jax.random.key(m), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (len(sizes), k, n), jnp.bfloat16)
    ct = jax.random.normal(kc, (m, n), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)

    def run(f, x, w):
        loss = lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * ct)   # noqa: E731
        return f(x, w), *jax.grad(loss, argnums=(0, 1))(x, w)

    got = jax.jit(lambda x, w: run(lambda a, b: gm.gmm(a, b, gs, config=MOSAIC_FWD_DLHS),
                                   x, w))(x, w)
    want = run(lambda a, b: gmm_dense(a, b, gs),
               x.astype(jnp.float32), w.astype(jnp.float32))
    for name, a, b in zip(("out", "d_lhs", "d_rhs"), got, want):
        assert a.dtype == jnp.bfloat16, name
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err < 1e-2, (name, err)   # bf16 outputs: ~2^-8 relative rounding
    total = sum(sizes)
    assert np.all(np.asarray(got[0], np.float32)[total:] == 0)
    assert np.all(np.asarray(got[1], np.float32)[total:] == 0)
    for g in np.flatnonzero(np.asarray(sizes) == 0):
        assert np.all(np.asarray(got[2], np.float32)[g] == 0), f"empty group {g}"


def test_config_for_runs_each_pass_where_it_measured_faster():
    small = gm.config_for(32768, 128, 1024, 4096)      # 256 rows per group
    assert (small.fwd, small.dlhs, small.tgmm) == (None, None, None)
    large = gm.config_for(98304, 64, 2048, 1408)       # 1,536 rows per group
    assert (large.fwd, large.dlhs) == (None, None)
    assert large.tgmm == gm.MosaicTiles(128, 128, 64, 5, 1)


def test_moe_block_on_mosaic_matches_dense_backend(monkeypatch):
    """The dropless block with every forward and backward-data matmul on the Mosaic kernel
    gives the dense backend's output and gradients."""
    from routezoo.configs import base
    from routezoo.layers.moe import moe_from_config

    monkeypatch.setattr(gm, "config_for", lambda *a, **kw: MOSAIC_FWD_DLHS)
    cfg = base.get_config().model.moe
    cfg.num_experts, cfg.k, cfg.expert_dim, cfg.jitter = 4, 2, 64, 0.0
    x = jax.random.normal(jax.random.key(1), (2, 16, 64), jnp.bfloat16)
    outs = {}
    for backend in ("mosaic", "dense"):
        cfg.gmm_backend = backend
        model = moe_from_config(cfg, d_model=64, dtype=jnp.bfloat16, param_dtype=jnp.float32)
        variables = model.init(jax.random.key(0), x, deterministic=True)

        def loss(v, x):
            y, _ = model.apply(v, x, deterministic=True)
            return jnp.sum(y.astype(jnp.float32) ** 2)

        outs[backend] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x)
    (l_m, (gv_m, gx_m)), (l_d, (gv_d, gx_d)) = outs["mosaic"], outs["dense"]
    np.testing.assert_allclose(l_m, l_d, rtol=2e-2)
    np.testing.assert_allclose(np.asarray(gx_m, np.float32), np.asarray(gx_d, np.float32),
                               rtol=5e-2, atol=5e-2 * float(np.abs(np.asarray(gx_d, np.float32)).max()))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gv_m), jax.tree.leaves(gv_d)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 5e-2 * max(np.abs(b).max(), 1e-6), jax.tree_util.keystr(path)

