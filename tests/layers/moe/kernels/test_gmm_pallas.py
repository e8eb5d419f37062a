"""Pallas grouped matmul (``routezoo.layers.moe.kernels.gmm_pallas``) in interpret mode on CPU,
against a per-row float64 reference: forward, both gradients, empty groups, one group
holding every row, rows past ``sum(group_sizes)``, group sizes that are not multiples of
the row tile, dimensions that need a smaller tile or padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from routezoo.layers.moe.kernels import gmm_pallas as gp

RTOL = 1e-5  # float32, relative to the largest reference magnitude


def _row_groups(group_sizes, m):
    ends = np.cumsum(group_sizes)
    return np.searchsorted(ends, np.arange(m), side="right")  # G = past the end


def ref_gmm(x, w, group_sizes):
    g = _row_groups(group_sizes, x.shape[0])
    out = np.zeros((x.shape[0], w.shape[2]))
    for i, gi in enumerate(g):
        if gi < w.shape[0]:
            out[i] = x[i].astype(np.float64) @ w[gi].astype(np.float64)
    return out


def ref_grads(x, w, group_sizes, ct):
    """Gradients of ``sum(gmm(x, w) * ct)``."""
    g = _row_groups(group_sizes, x.shape[0])
    dx = np.zeros(x.shape)
    dw = np.zeros(w.shape)
    for i, gi in enumerate(g):
        if gi < w.shape[0]:
            dx[i] = w[gi].astype(np.float64) @ ct[i].astype(np.float64)
            dw[gi] += np.outer(x[i], ct[i])
    return dx, dw


def assert_close(actual, expected, rtol=RTOL):
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape
    scale = max(np.abs(expected).max(), 1e-30)
    err = np.abs(actual - expected).max()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} * {scale:.3g}"


def _data(m, k, n, group_sizes, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((len(group_sizes), k, n)).astype(np.float32)
    ct = rng.standard_normal((m, n)).astype(np.float32)
    return x, w, np.asarray(group_sizes, np.int32), ct


def _fwd_and_grads(x, w, gs, ct, config):
    def loss(a, b):
        out = gp.gmm(a, b, gs, config=config)
        return jnp.sum(out * ct), out

    (_, out), (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        jnp.asarray(x), jnp.asarray(w))
    return out, dx, dw


CASES = {
    # M, K, N, group sizes, tiling (bm, bk, bn), tgmm tiling
    "empty_groups_and_tail": (100, 32, 64, [30, 0, 41, 20, 0], (16, 16, 32), (16, 16, 32)),
    "one_group_all_rows": (96, 32, 32, [0, 96, 0], (32, 16, 32), (32, 32, 16)),
    "unaligned_sizes": (200, 64, 32, [7, 50, 0, 33, 61, 49], (32, 32, 16), (16, 32, 32)),
}


@pytest.mark.parametrize("half_tiles", [True, False], ids=["half_tiles", "full_tiles"])
@pytest.mark.parametrize("reverse", [False, True], ids=["order", "reversed"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_backward(case, reverse, half_tiles):
    """The interpreter runs programs one after another: in one order a row written by two
    programs shows only the last write, so both orders are run. ``unaligned_sizes`` has
    last tiles of <= bm/2 rows (7, 33 -> 1) and of more (50 -> 18, 61 -> 29), so both
    heights of ``half_tiles`` run."""
    m, k, n, sizes, tiling, tgmm_tiling = CASES[case]
    x, w, gs, ct = _data(m, k, n, sizes)
    config = gp.GmmConfig(tiling=tiling, tgmm_tiling=tgmm_tiling, interpret=True,
                          reverse_program_order=reverse, half_tiles=half_tiles)
    out, dx, dw = _fwd_and_grads(x, w, gs, ct, config)
    assert out.dtype == jnp.float32
    assert_close(out, ref_gmm(x, w, gs))
    ref_dx, ref_dw = ref_grads(x, w, gs, ct)
    assert_close(dx, ref_dx)
    assert_close(dw, ref_dw)
    total = int(gs.sum())
    assert np.all(np.asarray(out)[total:] == 0), "rows past sum(group_sizes) must be 0"
    assert np.all(np.asarray(dx)[total:] == 0)
    for g in np.flatnonzero(gs == 0):
        assert np.all(np.asarray(dw)[g] == 0), f"empty group {g} must get exactly 0"


def test_tgmm_direct_and_odd_dims():
    """tgmm alone, and K, N that force a smaller tile (48 -> 16) or padding (40 -> 48)."""
    m, k, n = 72, 40, 48
    x, w, gs, ct = _data(m, k, n, [0, 20, 35, 0], seed=1)
    d = gp.tgmm(jnp.asarray(x), jnp.asarray(ct), jnp.asarray(gs), tiling=(16, 32, 32),
                interpret=True)
    _, ref_dw = ref_grads(x, w, gs, ct)
    assert d.shape == (4, k, n)
    assert_close(d, ref_dw)
    assert np.all(np.asarray(d)[[0, 3]] == 0)
    y = gp.gmm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(gs), tiling=(16, 32, 32),
               interpret=True)
    assert_close(y, ref_gmm(x, w, gs))


@pytest.mark.parametrize("seed", range(4))
def test_metadata_covers_every_row_once(seed):
    """Every row in [0, M) is owned by exactly one work item (its group's, or the tail's
    for rows past the end); items start at group starts and span at most bm rows."""
    rng = np.random.default_rng(seed)
    m, g, bm = int(rng.integers(1, 300)), int(rng.integers(1, 9)), int(rng.choice([16, 32, 64]))
    sizes = rng.multinomial(int(rng.integers(0, m + 1)), np.ones(g) / g)
    sizes[rng.random(g) < 0.3] = 0
    meta, num_items = jax.jit(gp.make_group_metadata, static_argnums=(1, 2))(
        jnp.asarray(sizes, jnp.int32), m, bm)
    meta = np.asarray(meta)
    assert meta.shape == (3, num_items) and num_items == gp.num_work_items(m, g, bm)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    owner = np.full(m, -1)
    row_group = _row_groups(sizes, m)
    for group, start, end in meta.T:
        if group > g:          # unused item
            assert start == end
            continue
        assert start < end <= min(start + bm, m)
        assert (start - starts[group]) % bm == 0
        assert np.all(owner[start:end] == -1)
        owner[start:end] = group
    assert np.all(owner == np.minimum(row_group, g))
    n_used = int((meta[0] <= g).sum())
    assert n_used == sum(-(-s // bm) for s in sizes) + -(-(m - sizes.sum()) // bm)


def test_backend_matches_dense_reference():
    """``gmm_backend`` (the GMM_BACKENDS signature) against gmm_dense, under jit."""
    from routezoo.layers.moe.gmm import gmm_dense

    x, w, gs, _ = _data(64, 32, 32, [10, 0, 40], seed=2)
    args = jnp.asarray(x), jnp.asarray(w), jnp.asarray(gs)
    got = jax.jit(gp.gmm_backend)(*args)
    want = gmm_dense(*args)
    assert_close(got, np.asarray(want, np.float64))
    assert np.all(np.asarray(got)[50:] == 0)


@pytest.mark.parametrize("shape", [(16384, 128, 1024, 4096), (32768, 128, 4096, 1024),
                                   (98304, 64, 2048, 1408), (32768, 8, 4096, 14336)])
def test_config_for_fits_shared_memory_in_float32_and_16_bit(shape):
    """The pipelines' shared memory stays within what ran on an H200 (192 KiB: the 16-bit
    small-group tiles with 4 stages) for 16-bit and float32 inputs; the 16-bit tiles in
    float32 asked for 352 KiB (288 KiB of pipeline) and failed to launch."""
    for itemsize in (2, 4):
        cfg = gp.config_for(*shape, itemsize=itemsize)
        assert gp.pipeline_smem_bytes(cfg, itemsize) <= 192 * 1024, (itemsize, cfg)
    wide16 = gp.config_for(32768, 8, 4096, 14336)
    assert gp.pipeline_smem_bytes(wide16, 4) + 64 * 1024 == 360448   # the failed launch's request


def test_config_for_small_groups_forward_and_backward():
    """``config_for`` picks the small-group weight-gradient rule (32-row steps, 4 stages) at
    <= 512 rows per group and the defaults above; the backend's gradients under that
    configuration equal the dense reference (rows 0..99 over 3 groups, one empty)."""
    small = gp.config_for(16384, 128, 1024, 4096)
    assert (small.tgmm_tiling, small.num_stages, small.tgmm_num_stages) == ((32, 128, 128), 4, 4)
    assert small.half_tiles
    assert small.tiling == (128, 64, 256) and small.dlhs_tiling == (128, 64, 128)
    large = gp.config_for(32768, 8, 4096, 14336)
    assert (large.tgmm_tiling, large.num_stages) == (gp.DEFAULT_TGMM_TILING, gp.DEFAULT_NUM_STAGES)
    assert not large.half_tiles
    x, w, gs, ct = _data(112, 64, 48, [60, 0, 40], seed=5)
    out, dx, dw = _fwd_and_grads(x, w, gs, ct, gp.config_for(112, 3, 64, 48, interpret=True))
    assert_close(out, ref_gmm(x, w, gs))
    ref_dx, ref_dw = ref_grads(x, w, gs, ct)
    assert_close(dx, ref_dx)
    assert_close(dw, ref_dw)
    assert np.all(np.asarray(dw)[1] == 0)


def test_bfloat16_output_dtype_and_accuracy():
    x, w, gs, _ = _data(48, 32, 32, [20, 28], seed=3)
    y = gp.gmm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), jnp.asarray(gs),
               tiling=(16, 16, 16), interpret=True)
    assert y.dtype == jnp.bfloat16
    ref = ref_gmm(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32),
                  np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32), gs)
    assert_close(y, ref, rtol=1e-2)


def test_rejects_bad_tiling():
    x, w, gs, _ = _data(16, 16, 16, [16])
    with pytest.raises(ValueError, match="powers of two"):
        gp.gmm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(gs), tiling=(24, 16, 16),
               interpret=True)


# ------------------------------------------------------------------ GPU lowering, shard_map


def _lower_for_gpu(fn, *args):
    """Lowers ``fn`` for CUDA on this (CPU) machine: traces the kernels to Triton IR, which
    checks what the interpreter does not (power-of-two blocks, supported primitives).
    jaxlib <= 0.10.2 stops at Triton IR; later ones compile it at lowering time, which
    may need a GPU toolchain: skipped if that is what fails."""
    from jax._src.lib import version as jaxlib_version
    try:
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except Exception as exc:  # noqa: BLE001
        if jaxlib_version > (0, 10, 2) and jax.default_backend() == "cpu":
            pytest.skip(f"cannot lower Pallas Triton for CUDA here: {exc!r}"[:300])
        raise


def _sharded_case():
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((4,), ("data",))
    x, w, gs, ct = _data(4 * 64, 64, 128, [20, 0, 30, 10])
    put = lambda a, spec: jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec))  # noqa: E731
    gs4 = np.tile(gs, (4, 1))
    return mesh, P, put(x, P("data")), put(w, P()), put(gs4, P("data")), put(ct, P("data"))


def _sharded_loss(mesh, P, interpret):
    def local(x, w, gs, ct):   # weights replicated over "data": d_w needs a psum
        return jnp.sum(gp.gmm(x, w, gs[0], tiling=(32, 32, 64), interpret=interpret) * ct)[None]

    f = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P(), P("data"), P("data")),
                      out_specs=P("data"))
    return jax.grad(lambda x, w, gs, ct: jnp.sum(f(x, w, gs, ct)), argnums=(0, 1))


def test_lowers_to_triton_for_gpu():
    m, k, n = 1000, 256, 384   # M not a multiple of any tile
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((8, k, n), jnp.bfloat16)
    gs = jax.ShapeDtypeStruct((8,), jnp.int32)

    def fwd_bwd(x, w, gs):
        y, vjp = jax.vjp(lambda a, b: gp.gmm(a, b, gs, tiling=(64, 64, 128)), x, w)
        return y, vjp(y)
    text = _lower_for_gpu(fwd_bwd, x, w, gs)
    assert text.count("triton") >= 3    # gmm, gmm^T, tgmm


def test_shard_map_replicated_weights():
    """Compiled kernels under shard_map(check_vma=True) with weights replicated over the
    token axis: the kernels' outputs vary over it and the weight gradient is summed. The
    interpreter cannot run there (a jax limitation): it refuses with a clear error."""
    mesh, P, x, w, gs, ct = _sharded_case()
    with jax.set_mesh(mesh):
        text = _lower_for_gpu(_sharded_loss(mesh, P, interpret=False), x, w, gs, ct)
        assert "all_reduce" in text     # the weight gradient, summed over "data"
        with pytest.raises(NotImplementedError, match="shard_map"):
            jax.jit(_sharded_loss(mesh, P, interpret=True))(x, w, gs, ct)
