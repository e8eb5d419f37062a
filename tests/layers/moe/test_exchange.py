"""Ragged expert-parallel exchange of dropless MoE (CPU, 8 simulated devices).

XLA:CPU cannot run ``ragged_all_to_all`` (``UNIMPLEMENTED``), so the numbers here come
from :func:`dispatch.ragged_exchange_emulated` (checked first against a numpy model of
the collective's semantics), which runs every offset and reorder of the ragged path;
the real collective is traced and lowered (not compiled), which checks its shapes and
offset dtypes. Shapes: T=64 tokens, D=16, F=32, E=8, K=2.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import functools  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from routezoo.configs import base  # noqa: E402
from routezoo.layers.moe.gmm import EXPERT_PARAM_NAMES  # noqa: E402
from routezoo.layers.moe.dropless import dropless_moe  # noqa: E402
from routezoo.layers.moe.exchange import ragged_exchange_emulated, resolve_ep_exchange  # noqa: E402
from routezoo.layers import moe as moe_lib  # noqa: E402
from routezoo.layers import sharding  # noqa: E402

T, D, F, E, K = 64, 16, 32, 8, 2
MESHES = [{"expert": 8}, {"data": 2, "expert": 4}]
TOL = dict(rtol=2e-5, atol=2e-5)


def mesh_id(mesh_shape):
    return "x".join(f"{k}{v}" for k, v in mesh_shape.items())


# ------------------------------------------------------------------ the exchange


def np_ragged_all_to_all(operands, outputs, input_offsets, send_sizes, output_offsets, per_peer):
    """numpy model of ``ragged_all_to_all``: shard ``p``'s slice ``j`` (rows
    ``input_offsets[p, j] + [0, send_sizes[p, j])`` of its operand) lands in shard
    ``j // per_peer``'s result at ``output_offsets[p, j]``; other rows keep ``output``."""
    result = outputs.copy()
    for p in range(operands.shape[0]):
        for j in range(input_offsets.shape[1]):
            a, o, s = input_offsets[p, j], output_offsets[p, j], send_sizes[p, j]
            result[j // per_peer, o:o + s] = operands[p, a:a + s]
    return result


def random_exchange(rng, n, per_peer, m_in, m_out, max_size):
    """Consistent random arguments for ``n`` shards: sizes in ``[0, max_size]`` (a third
    forced to 0), input slices anywhere (they may overlap), each receiver's slices in a
    random order with random gaps. Returns ``[n, K]`` int32 arrays."""
    k = n * per_peer
    send = rng.integers(0, max_size + 1, (n, k))
    send[rng.random((n, k)) < 0.3] = 0
    inp = rng.integers(0, m_in - send + 1)
    out = np.zeros((n, k), np.int64)
    recv = np.zeros((n, k), np.int64)
    for q in range(n):
        slices = [(p, j) for p in range(n) for j in range(q * per_peer, (q + 1) * per_peer)]
        sizes = [send[p, j] for p, j in slices]
        assert sum(sizes) <= m_out
        gaps = np.diff(np.sort(np.r_[0, rng.integers(0, m_out - sum(sizes) + 1, len(slices))]))
        at = 0
        for idx, gap in zip(rng.permutation(len(slices)), gaps):
            p, j = slices[idx]
            at += gap
            out[p, j] = at
            at += send[p, j]
            recv[q, p * per_peer + j % per_peer] = send[p, j]   # i-th slice received, from i // per_peer
    return [a.astype(np.int32) for a in (inp, send, out, recv)]


@pytest.mark.parametrize("axis,mesh_shape,per_peer", [
    ("expert", {"expert": 8}, 1),
    ("expert", {"expert": 8}, 2),
    (("data", "expert"), {"data": 2, "expert": 4}, 1),
])
def test_emulated_exchange_matches_ragged_all_to_all_semantics(axis, mesh_shape, per_peer):
    """Values and the gradient (the transpose: the cotangent goes back along the same
    slices; ``output`` keeps it on the rows nothing wrote) against the numpy model."""
    rng = np.random.default_rng(per_peer)
    n, m_in, m_out, d = 8, 12, 64, 3
    args = random_exchange(rng, n, per_peer, m_in, m_out, max_size=4 if per_peer == 1 else 2)
    operand = rng.normal(size=(n, m_in, d)).astype(np.float32)
    output = rng.normal(size=(n, m_out, d)).astype(np.float32)
    cot = rng.normal(size=(n, m_out, d)).astype(np.float32)
    mesh = sharding.make_mesh(mesh_shape)
    spec = P(axis)
    fn = jax.shard_map(lambda *a: ragged_exchange_emulated(*a, axis), mesh=mesh,
                       in_specs=(spec,) * 6, out_specs=spec)

    def loss(operand, output, *offsets):
        y = fn(operand, output, *offsets)
        return jnp.sum(y * cot.reshape(-1, d)), y

    put = lambda a: jax.device_put(a.reshape(-1, *a.shape[2:]), NamedSharding(mesh, spec))  # noqa: E731
    (_, y), (g_op, g_out) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        put(operand), put(output), *map(put, args))

    inp, send, out, _ = args
    want = np_ragged_all_to_all(operand, output, inp, send, out, per_peer)
    np.testing.assert_array_equal(np.asarray(y).reshape(n, m_out, d), want)
    want_op = np.zeros_like(operand)
    written = np.zeros((n, m_out), bool)
    for p in range(n):
        for j in range(n * per_peer):
            a, o, s = inp[p, j], out[p, j], send[p, j]
            want_op[p, a:a + s] += cot[j // per_peer, o:o + s]
            written[j // per_peer, o:o + s] = True
    np.testing.assert_allclose(np.asarray(g_op).reshape(n, m_in, d), want_op, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(g_out).reshape(n, m_out, d), np.where(written[..., None], 0, cot))
    assert (send == 0).any() and written.any() and not written.all()   # zero sizes and gaps occurred


# ------------------------------------------------------------------ the dropless block


def make_params(seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    shapes = {"wi": (E, D, F), "wi_gate": (E, D, F), "wo": (E, F, D)}
    return {name: 0.3 * jax.random.normal(k, s, jnp.float32) for k, (name, s) in zip(ks, shapes.items())}


def make_routing(case):
    t = np.arange(T)
    if case == "balanced":            # every expert (and every shard) gets the same number of copies
        idx = np.stack([t % E, (t + 1) % E], 1)
    elif case == "one_expert":        # every token's one copy to expert 5; second slot empty
        idx = np.stack([np.full(T, 5), np.full(T, -1)], 1)
    elif case == "one_shard":         # experts 0 and 1: with 4 expert shards shard 0 gets every copy
        idx = np.stack([np.zeros(T), np.ones(T)], 1)
    elif case == "empty_experts":     # experts 0, 3, 4, 5, 7 get nothing
        rng = np.random.default_rng(3)
        idx = np.stack([rng.choice([1, 2, 6], 2, replace=False) for _ in t])
    else:
        raise ValueError(case)
    w = jax.random.uniform(jax.random.key(5), (T, K), jnp.float32)
    return jnp.asarray(idx, jnp.int32), w


def _loss_fn(exchange, gmm_backend="blocked"):
    cot = jax.random.normal(jax.random.key(7), (T, D), jnp.float32)

    def loss(x, params, w, idx):
        y = dropless_moe(x, idx, w, params, expert_type="swiglu", gmm_backend=gmm_backend,
                                      exchange=exchange)
        return jnp.sum(y * cot), y
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


@functools.lru_cache(maxsize=None)
def _reference(case):
    x = jax.random.normal(jax.random.key(1), (T, D), jnp.float32)
    idx, w = make_routing(case)
    params = make_params()
    (_, y), grads = jax.jit(_loss_fn("padded"))(x, params, w, idx)   # no mesh: the single-device path
    return (x, params, w, idx), y, grads


def _sharded_args(mesh, x, params, w, idx):
    tok = sharding.logical_sharding(mesh, ("batch", None))
    params = {k: jax.device_put(v, sharding.logical_sharding(mesh, EXPERT_PARAM_NAMES[k]))
              for k, v in params.items()}
    return jax.device_put(x, tok), params, jax.device_put(w, tok), jax.device_put(idx, tok)


@pytest.mark.parametrize("case", ["balanced", "one_expert", "one_shard", "empty_experts"])
@pytest.mark.parametrize("mesh_shape", MESHES, ids=mesh_id)
def test_ragged_dropless_matches_single_device(mesh_shape, case):
    """Output and gradients (x, expert weights, combine weights) of the ragged path
    (emulated exchange) equal the single-device dropless result. ``{'expert': 8}`` has
    one expert per shard (no receive reorder), ``{'data': 2, 'expert': 4}`` two (the
    counting-sort reorder runs); ``one_shard`` fills a receive buffer to its worst case."""
    args, y_ref, g_ref = _reference(case)
    mesh = sharding.make_mesh(mesh_shape)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        (_, y), g = jax.jit(_loss_fn("ragged_emulated"))(*_sharded_args(mesh, *args))
    np.testing.assert_allclose(y, y_ref, **TOL)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, **TOL, err_msg=jax.tree_util.keystr(path))
    assert float(jnp.max(jnp.abs(y))) > 0


def _custom_calls(text):
    """Operand types of every ``ragged_all_to_all`` custom call in StableHLO text."""
    return [re.findall(r"tensor<([^>]*)>", m) for m in
            re.findall(r"custom_call @ragged_all_to_all\(.*\) \{.*\} : \(([^)]*)\)", text)]


@pytest.mark.parametrize("mesh_shape", MESHES, ids=mesh_id)
def test_real_ragged_all_to_all_traces_and_lowers(mesh_shape):
    """value_and_grad of the ``exchange='ragged'`` path lowers with four collectives
    (two forward, their two transposes) whose operands have the documented shapes:
    rows ``[M, D]`` out to an ``[N·M, D]`` buffer and back, int32 offsets ``[N]``."""
    args, _, _ = _reference("balanced")
    mesh = sharding.make_mesh(mesh_shape)
    n = mesh_shape["expert"]
    m = T // 8 * K            # tokens split over all 8 devices (batch: data, expert)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        text = jax.jit(_loss_fn("ragged")).lower(*_sharded_args(mesh, *args)).as_text()
    calls = _custom_calls(text)
    assert len(calls) == 4, calls
    shapes = sorted(tuple(c[:2]) for c in calls)
    small, big = f"{m}x{D}xf32", f"{n * m}x{D}xf32"
    assert shapes == sorted([(small, big), (big, small)] * 2), shapes
    assert all(c[2:] == [f"{n}xi32"] * 4 for c in calls), calls


# ------------------------------------------------------------------ the MoE block and its config


def make_cfg(**overrides):
    cfg = base.get_config().model.moe
    cfg.update(dict(num_experts=E, k=K, expert_dim=F, dispatch="dropless", jitter=0.0))
    cfg.update(overrides)
    return cfg


def test_moe_block_ep_exchange_from_config():
    """``moe.ep_exchange`` reaches the dispatcher: ``ragged_emulated`` under a mesh gives
    the single-device output and gradients, and ``ragged`` lowers to the collective."""
    x = jax.random.normal(jax.random.key(0), (8, 8, D), jnp.float32)
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    rules = sharding.DEFAULT_RULES

    def run(exchange, lower=False):
        model = moe_lib.moe_from_config(make_cfg(ep_exchange=exchange), d_model=D, dtype=jnp.float32,
                                        param_dtype=jnp.float32)
        boxed = jax.eval_shape(functools.partial(model.init, deterministic=True), jax.random.key(1), x)
        variables = nn.unbox(jax.jit(functools.partial(model.init, deterministic=True))(jax.random.key(1), x))

        def loss(v, x):
            y, aux = model.apply(v, x, deterministic=True)
            return jnp.sum(y * jnp.cos(x)) + sum(aux["losses"].values()), y
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        if exchange == "padded":
            return step(variables, x)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            v = jax.device_put(variables, nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules))
            xs = jax.device_put(x, sharding.logical_sharding(mesh, ("batch", "length", "act_embed"), rules))
            return step.lower(v, xs).as_text() if lower else step(v, xs)

    (_, y_ref), g_ref = run("padded")
    (_, y), g = run("ragged_emulated")
    np.testing.assert_allclose(y, y_ref, **TOL)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, **TOL, err_msg=jax.tree_util.keystr(path))
    assert len(_custom_calls(run("ragged", lower=True))) == 4


def test_unknown_ep_exchange_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^moe.ep_exchange='nccl' is unknown; known: "
                                         r"\['auto', 'padded', 'ragged', 'ragged_emulated'\]$") as err:
        moe_lib.validate_moe_config(make_cfg(ep_exchange="nccl"), causal=True, mesh_shape={"expert": 4})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^unknown ep_exchange 'nccl'; known: \['auto', 'padded', 'ragged', "
                                         r"'ragged_emulated'\]$"):
        resolve_ep_exchange("nccl")
    moe_lib.validate_moe_config(make_cfg(), causal=True, mesh_shape={"expert": 4})   # the default passes
    assert base.get_config().model.moe.ep_exchange == "auto"
    assert resolve_ep_exchange("auto") == "padded"                     # CPU: no ragged-all-to-all
