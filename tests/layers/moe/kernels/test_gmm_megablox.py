"""The megablox backend (jax's TPU grouped-matmul kernels, in Pallas interpret mode here)
under routezoo's contract: against a dense masked reference, forward and both gradients,
with shapes megablox cannot take directly (padded by the wrapper), empty groups, and rows
past ``sum(group_sizes)`` that must be exactly 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from routezoo.layers.moe.gmm import gmm_dense
from routezoo.layers.moe.kernels import gmm_megablox as gm


@pytest.mark.parametrize("m,k,n,sizes", [
    (200, 96, 80, [50, 0, 70, 20]),       # no dimension a multiple of 128; 60 tail rows
    (130, 128, 256, [0, 130, 0]),         # one group holds every row
    (64, 32, 48, [0, 0, 0]),              # no rows in any group
])
def test_matches_dense_reference(m, k, n, sizes):
    kx, kw, kc = jax.random.split(jax.random.key(m), 3)
    x = jax.random.normal(kx, (m, k))
    w = jax.random.normal(kw, (len(sizes), k, n))
    ct = jax.random.normal(kc, (m, n))
    gs = jnp.asarray(sizes, jnp.int32)

    def run(f):
        loss = lambda x, w: jnp.sum(f(x, w) * ct)   # noqa: E731
        return f(x, w), *jax.grad(loss, argnums=(0, 1))(x, w)

    got = jax.jit(lambda: run(lambda x, w: gm.gmm(x, w, gs, tiling=(64, 128, 128))))()
    want = run(lambda x, w: gmm_dense(x, w, gs))
    for name, a, b in zip(("out", "d_lhs", "d_rhs"), got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)
    total = sum(sizes)
    assert np.all(np.asarray(got[0])[total:] == 0) and np.all(np.asarray(got[1])[total:] == 0)
    for g in np.flatnonzero(np.asarray(sizes) == 0):
        assert np.all(np.asarray(got[2])[g] == 0), f"empty group {g}"


def test_tiling_pads_to_tile_multiples():
    assert gm.tiling_for(200, 96, 80) == ((208, 128, 128), (208, 128, 128))
    assert gm.tiling_for(4096, 2048, 1408) == ((512, 1024, 768), (4096, 2048, 1536))   # not 2048
    assert gm.tiling_for(32768, 4096, 14336) == ((512, 1024, 1024), (32768, 4096, 14336))


def test_bfloat16_inputs():
    x = jax.random.normal(jax.random.key(0), (96, 64), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (3, 64, 32), jnp.bfloat16)
    gs = jnp.asarray([40, 0, 50], jnp.int32)
    got = gm.gmm(x, w, gs, tiling=(32, 128, 128))
    want = gmm_dense(x.astype(jnp.float32), w.astype(jnp.float32), gs)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)
