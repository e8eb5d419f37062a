"""Randomized parameter sharing (layers/adapters/rps.py): parameter count, exact uint32 hashing
against Python integers, STABLE-RPS folding (a permutation at c = 1 that represents the
dense weights exactly; every slot used floor or ceil(n/m) times), ROAST tiles as
contiguous slices of M, merge shapes and dtypes, the gradient scaler against a numpy
reference, a short training run through train.train_and_evaluate, and the errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import per_layer_config, tiny_config
from routezoo import zoo
from routezoo.layers import adapters
from routezoo.layers.adapters import rps
from routezoo.training import config_check
from routezoo.training import train as train_lib


# --------------------------------------------------------------------------- references

def ref_hash(x: int, coeffs, m: int) -> int:
    a, b, c = coeffs
    return ((a * x + b * x * x + c) % rps.P) % m


def ref_stable(n: int, m: int, seed: int) -> np.ndarray:
    """h(i) = (hash(floor(i/m)) + i mod m) mod m, in Python integers."""
    coeffs = rps._seeds(seed)["fold"]
    table = np.array([ref_hash(f, coeffs, m) for f in range(-(-n // m))], np.int64)
    i = np.arange(n, dtype=np.int64)
    return (table[i // m] + i % m) % m


def ref_roast_start(p: int, q: int, m: int, tile: int, seed: int) -> int:
    r1, r2, r3 = rps._seeds(seed)["roast"]
    return ((p * r3 + q * r2 + r1) % rps.P) % (m - tile * tile)


def _all_indices(r: rps.RPS, params):
    slabs, n, m = r.layout(params)
    hs = [np.asarray(r.indices(s, n, m)[0]) for s in slabs]
    return np.concatenate(hs), slabs, n, m


def _toy_base(seed=0):
    """Two targets (60 weights each, one 3-axis) and a dense leftover."""
    rng = np.random.default_rng(seed)
    return {"a": {"w": rng.normal(0, 0.3, (6, 10)).astype(np.float32)},
            "b": {"w": rng.normal(0, 0.1, (3, 4, 5)).astype(np.float32)},
            "n": {"scale": np.ones((10,), np.float32)}}


def _boxed_model_params(c):
    model = zoo.build(c.model)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]


# --------------------------------------------------------------------------- counts, hashing

def test_count_equals_formula(data_dir):
    c = per_layer_config(data_dir)
    m_ = c.model
    params = _boxed_model_params(c)
    d, h, g, k, f, layers = m_.d_model, m_.num_heads, m_.num_kv_heads, m_.head_dim, m_.mlp_dim, m_.num_layers
    n = layers * (2 * d * h * k + 2 * d * g * k + 3 * d * f)          # q o, k v, wi wg wo
    total = adapters.num_params(params)
    for mapping in rps.MAPPINGS:
        r = rps.RPS("attn/.*|mlp/.*", compression=0.1, mapping=mapping, tile=4)
        want = math.ceil(0.1 * n) + (total - n)                       # m + dense leftovers
        init = jax.eval_shape(lambda: r.init(jax.random.PRNGKey(0), params))
        assert r.count(params) == want == adapters.num_params(init)
        assert nn.unbox(init)["rps"]["M"].shape == (math.ceil(0.1 * n),)
        assert "attn" not in nn.unbox(init)["layer0"]     # targets live in M only
        assert nn.unbox(init)["embed"]["embedding"].shape == (m_.vocab_size, d)


def test_uint32_hash_is_exact():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(0, 2**32, 500, dtype=np.uint64), [0, 1, rps.P - 1, rps.P, 2**32 - 1]])
    coeffs, m = (rps.P - 2, 1234567891, 987654321), 100003
    got = np.asarray(rps.uhash(jnp.asarray(x.astype(np.uint32)), coeffs, m))
    want = [ref_hash(int(v), coeffs, m) for v in x]
    np.testing.assert_array_equal(got, want)
    y = rng.integers(0, rps.P, 200)
    np.testing.assert_array_equal(np.asarray(rps.mulmod(jnp.asarray(x[:200] % rps.P, jnp.uint32),
                                                        jnp.asarray(y, jnp.uint32))),
                                  [(int(a) % rps.P) * int(b) % rps.P for a, b in zip(x[:200], y)])


# --------------------------------------------------------------------------- STABLE-RPS

def test_stable_compression_one_is_a_permutation_and_represents_dense_exactly():
    base = _toy_base()
    r = rps.RPS("w", compression=1.0, mapping="stable", init_std=0.5 * math.sqrt(3.0), grad_scaler=False)
    h, slabs, n, m = _all_indices(r, base)
    assert n == m == 120
    np.testing.assert_array_equal(np.sort(h), np.arange(n))
    np.testing.assert_array_equal(h, ref_stable(n, m, r.seed))
    # A template whose std is exactly 1 (so lambda = 1 / (init_std / sqrt 3) = 2), and
    # arbitrary dense weights to represent: M[h(i)] = g(i) w_i / lambda, then recover.
    template = {k: ({"w": np.resize(np.array([1.0, -1.0], np.float32), v["w"].shape)} if "w" in v else v)
                for k, v in base.items()}
    dense = _toy_base(seed=7)
    shared = np.zeros(m, np.float32)
    for s in slabs:
        hs, gs = (np.asarray(a) for a in r.indices(s, n, m))
        w = dense[s.path.split("/")[0]]["w"].reshape(-1)
        shared[hs] = gs * w / np.float32(2.0)
    ad = nn.unbox(r.init(jax.random.PRNGKey(0), template))
    ad["rps"]["M"] = jnp.asarray(shared)
    merged = r.merge(template, ad)
    for name in ("a", "b"):
        np.testing.assert_array_equal(np.asarray(merged[name]["w"]), dense[name]["w"])
    np.testing.assert_array_equal(np.asarray(merged["n"]["scale"]), base["n"]["scale"])   # base + 0


@pytest.mark.parametrize("compression", [0.1, 0.37])
def test_stable_slots_used_floor_or_ceil_times(compression):
    base = _toy_base()
    r = rps.RPS("w", compression=compression, mapping="stable", seed=3)
    h, _, n, m = _all_indices(r, base)
    np.testing.assert_array_equal(h, ref_stable(n, m, 3))
    counts = np.bincount(h, minlength=m)
    assert set(counts) <= {n // m, -(-n // m)} and counts.sum() == n


@pytest.mark.parametrize("mapping", rps.MAPPINGS)
def test_recovered_weights_start_with_the_dense_init_std(mapping):
    rng = np.random.default_rng(4)
    base = {"a": {"w": rng.normal(0, 0.05, (64, 64)).astype(np.float32)},
            "b": {"w": rng.normal(0, 0.2, (32, 48)).astype(np.float32)}}
    r = rps.RPS("w", compression=0.5, mapping=mapping, init_std=0.01)
    merged = jax.jit(r.merge)(base, nn.unbox(r.init(jax.random.PRNGKey(0), base)))
    for name in base:
        np.testing.assert_allclose(np.std(np.asarray(merged[name]["w"])), np.std(base[name]["w"]), rtol=0.1)


# --------------------------------------------------------------------------- ROAST

def test_roast_tiles_are_contiguous_slices_of_m():
    base = {"a": {"w": np.random.default_rng(0).normal(0, 0.2, (20, 13)).astype(np.float32)},
            "b": {"w": np.random.default_rng(1).normal(0, 0.05, (2, 8, 16)).astype(np.float32)}}
    tile = 4
    r = rps.RPS("w", compression=0.3, mapping="roast", tile=tile, seed=5, grad_scaler=False)
    slabs, n, m = r.layout(base)
    ad = nn.unbox(r.init(jax.random.PRNGKey(1), base))
    shared = np.asarray(ad["rps"]["M"])
    merged = jax.jit(r.merge)(base, ad)
    for s in slabs:
        name = s.path.split("/")[0]
        lam = np.std(base[name]["w"]) / (r.init_std / math.sqrt(3.0))
        w = np.asarray(merged[name]["w"]).reshape(s.rows, s.cols)            # (K, N) view
        g = np.asarray(rps.sign_hash(s.offset + jnp.arange(s.size, dtype=jnp.uint32),
                                     rps._seeds(5)["sign"])).reshape(s.rows, s.cols)
        for p in range(-(-s.rows // tile)):
            for q in range(-(-s.cols // tile)):
                start = ref_roast_start(s.row_tile_offset + p, q, m, tile, 5)
                rows = slice(p * tile, min((p + 1) * tile, s.rows))
                cols = slice(q * tile, min((q + 1) * tile, s.cols))
                tile_m = shared[start:start + tile * tile].reshape(tile, tile)
                kr, kc = rows.stop - rows.start, cols.stop - cols.start   # edge tiles: leading part
                np.testing.assert_allclose(w[rows, cols], lam * g[rows, cols] * tile_m[:kr, :kc], rtol=1e-5)


# --------------------------------------------------------------------------- merge, scaler

@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_merge_recovers_base_shapes_and_dtypes(data_dir, param_dtype):
    c = per_layer_config(data_dir, **{"model.param_dtype": param_dtype, "model.ffn": "mlp,moe"})
    boxed = _boxed_model_params(c)
    base = nn.unbox(boxed)
    r = rps.RPS("attn/.*|mlp/.*|experts/.*", compression=0.05, mapping="roast", tile=4)
    ad = jax.eval_shape(lambda: nn.unbox(r.init(jax.random.PRNGKey(0), boxed)))
    merged = jax.eval_shape(r.merge, base, ad)
    shape_dtype = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
    assert shape_dtype(merged) == shape_dtype(base)
    assert "layer1/moe/experts/wi" in r.select(boxed)                 # stacked experts are targets


def test_gradient_scaler_against_numpy_reference():
    base = _toy_base()
    r = rps.RPS("w", compression=0.3, mapping="stable", seed=2, init_std=0.02)
    h, slabs, n, m = _all_indices(r, base)
    lam = {s.path: np.std(base[s.path.split("/")[0]]["w"]) * math.sqrt(3.0) / 0.02 for s in slabs}
    lam_i = np.concatenate([np.full(s.size, lam[s.path]) for s in slabs])
    sums, counts = np.zeros(m), np.zeros(m)
    np.add.at(sums, h, lam_i)
    np.add.at(counts, h, 1)
    s_ref = np.where(counts > 0, sums ** 2 / np.maximum(counts, 1), 1.0)
    np.testing.assert_allclose(np.asarray(r.slot_scale(base)), s_ref, rtol=1e-5)

    ad = nn.unbox(r.init(jax.random.PRNGKey(0), base))
    cot = {k: np.random.default_rng(3).normal(size=base[k]["w"].shape).astype(np.float32) for k in ("a", "b")}

    def loss(shared, rr):
        merged = rr.merge(base, {**ad, "rps": {"M": shared}})
        return sum(jnp.sum(merged[k]["w"] * cot[k]) for k in cot)
    g_scaled = jax.grad(loss)(ad["rps"]["M"], r)
    g_plain = jax.grad(loss)(ad["rps"]["M"], rps.RPS("w", compression=0.3, mapping="stable", seed=2,
                                                      init_std=0.02, grad_scaler=False))
    np.testing.assert_allclose(np.asarray(g_scaled), np.asarray(g_plain) / s_ref, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- training

def test_train_and_evaluate_trains_m_and_dense_leftovers(data_dir, tmp_path):
    c = per_layer_config(data_dir, **{"adapter.method": "rps", "adapter.targets": "attn/.*|mlp/.*",
                                 "adapter.rps_compression": 0.25, "train.steps": 2, "train.eval_every": 2,
                                 "train.eval_steps": 1, "checkpoint.every": 2})
    config_check.validate(c)
    workdir = str(tmp_path / "rps")
    out = train_lib.train_and_evaluate(c, workdir)
    params, meta = train_lib.read_adapter_dir(workdir + "/adapter")
    assert out["step"] == 2 and np.isfinite(out["loss"]) and np.isfinite(out["eval_loss"])
    boxed = _boxed_model_params(c)
    r = adapters.from_config(c.adapter)
    assert meta["params_trainable"] == meta["params_adapter"] == r.count(boxed)
    assert "attn" not in params["layer0"] and "mlp" not in params["layer0"]     # targets live in M only
    # M moved by about one Adam step from its init (the train loop's init key, reproduced;
    # warmup: lr 0 at step 0, the peak at step 1), and the dense leftovers moved
    # away from their zero deltas.
    _, init_rng = jax.random.split(jax.random.PRNGKey(c.seed))
    m0 = np.asarray(nn.unbox(r.init(jax.random.fold_in(init_rng, 0xAD), boxed))["rps"]["M"])
    step = np.abs(params["rps"]["M"] - m0)
    lr = c.optimizer.learning_rate
    assert step.max() <= 1.5 * lr and step.mean() > 0.1 * lr
    assert np.abs(params["embed"]["embedding"]).max() > 0.1 * lr
    assert np.abs(params["layer0"]["attn_norm"]["scale"]).max() > 0.1 * lr


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("key,value,match", [
    ("rps_compression", 0.0, r"rps_compression=0.0 must be in \(0, 1\]"),
    ("rps_compression", 1.5, r"rps_compression=1.5 must be in \(0, 1\]"),
    ("rps_mapping", "hashednet", "allowed: roast, stable"),
    ("rps_tile", 0, "rps_tile=0 must be >= 1"),
])
def test_config_errors(data_dir, key, value, match):
    c = per_layer_config(data_dir, **{"adapter.method": "rps", "adapter.targets": "attn/.*", f"adapter.{key}": value})
    with pytest.raises(config_check.ConfigError, match=match):
        config_check.validate(c)


def test_roast_needs_more_slots_than_one_tile():
    with pytest.raises(ValueError, match="not more than one adapter.rps_tile=8 tile"):
        rps.RPS("w", compression=0.5, mapping="roast", tile=8).layout(_toy_base())
