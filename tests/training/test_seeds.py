"""Several seeds as one vectorised program (training/seeds.py) against one run per seed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding

from conftest import tiny_config
from routezoo import zoo
from routezoo.layers import sharding as shd
from routezoo.training.optim import make_optimizer
from routezoo.training.seeds import create_stacked_state, stack, stacked_shardings, stacked_step, unstack
from routezoo.training.train import create_state, make_train_step, mesh_and_rules, state_shardings

SEEDS = (0, 3, 7)
STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same MoE config trained STEPS steps per seed, once stacked and once seed by seed,
    each seed on its own batches; router jitter on, so the per-seed RNG streams matter."""
    c = tiny_config(str(tmp_path_factory.mktemp("data")), **{
        "model.ffn": "moe", "model.moe.router": "top_k", "model.moe.k": 2, "model.moe.num_experts": 4,
        "model.moe.jitter": 0.1, "model.dtype": "float32", "model.scan_layers": False})
    mesh, rules = mesh_and_rules(c)
    model = zoo.build(c.model)
    tx, schedule = make_optimizer(c.optimizer, STEPS)
    rng = np.random.default_rng(0)
    b, L = c.train.batch_size, c.data.seq_len
    tokens = rng.integers(1, c.model.vocab_size, (STEPS, len(SEEDS), b, L + 1)).astype(np.int32)

    def batch(i, j=None):
        r = tokens[i] if j is None else tokens[i, j]
        return {"inputs": r[..., :-1], "targets": r[..., 1:], "weights": np.ones(r[..., 1:].shape, np.float32)}

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, shardings, _ = state_shardings(model, tx, c, mesh, rules)
        bs = NamedSharding(mesh, shd.batch_spec(2))
        step = make_train_step(model, tx, c, schedule)
        one = jax.jit(step, in_shardings=(shardings, bs), out_shardings=(shardings, None))
        many = jax.jit(stacked_step(step), in_shardings=(stacked_shardings(shardings), stacked_shardings(bs)),
                       out_shardings=(stacked_shardings(shardings), None))
        stacked0 = create_stacked_state(model, tx, c, shardings, SEEDS)
        singles0 = []
        for s in SEEDS:
            c.seed = s
            singles0.append(create_state(model, tx, c, shardings))
        stacked, singles, m_stacked, m_singles = stacked0, list(singles0), [], []
        for i in range(STEPS):
            stacked, m = many(stacked, batch(i))
            m_stacked.append(jax.device_get(m))
            ms = []
            for j in range(len(SEEDS)):
                singles[j], mj = one(singles[j], batch(i, j))
                ms.append(jax.device_get(mj))
            m_singles.append(ms)
    return dict(stacked0=stacked0, singles0=singles0, stacked=stacked, singles=singles,
                m_stacked=m_stacked, m_singles=m_singles, shardings=shardings, c=c, model=model, tx=tx)


def test_stacked_init_equals_each_seeds_create_state_bit_for_bit(runs):
    for j in range(len(SEEDS)):
        got, want = jax.device_get(unstack(runs["stacked0"], j)), jax.device_get(runs["singles0"][j])
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(g, w)
    # the seeds really differ
    p = jax.tree.leaves(jax.device_get(runs["stacked0"].params))[0]
    assert not np.array_equal(p[0], p[1])


def test_stacked_steps_match_one_run_per_seed(runs):
    for i in range(STEPS):
        for j in range(len(SEEDS)):
            np.testing.assert_allclose(runs["m_stacked"][i]["loss"][j], runs["m_singles"][i][j]["loss"], rtol=1e-5)
    for j in range(len(SEEDS)):
        got, want = jax.device_get(unstack(runs["stacked"], j)), jax.device_get(runs["singles"][j])
        assert int(got.step) == int(want.step) == STEPS
        for g, w in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    # three different trajectories, not one copied three times
    losses = runs["m_stacked"][-1]["loss"]
    assert len(set(np.round(losses, 6).tolist())) == len(SEEDS)


def test_stacked_shardings_leave_the_seed_axis_unsharded(runs):
    flat = jax.tree.leaves(runs["shardings"], is_leaf=lambda s: isinstance(s, NamedSharding))
    st = jax.tree.leaves(stacked_shardings(runs["shardings"]), is_leaf=lambda s: isinstance(s, NamedSharding))
    assert len(flat) == len(st)
    for a, b in zip(flat, st):
        assert tuple(b.spec) == (None, *a.spec) and b.mesh == a.mesh
    leaf = jax.tree.leaves(runs["stacked"].params)[0]
    assert leaf.shape[0] == len(SEEDS)


def test_stack_unstack_round_trip(runs):
    trees = [jax.device_get(s) for s in runs["singles0"]]
    back = unstack(stack(trees), 1)
    for g, w in zip(jax.tree.leaves(back), jax.tree.leaves(trees[1])):
        np.testing.assert_array_equal(g, w)


def test_refuses_loaded_init_and_no_seeds(runs):
    c = runs["c"].copy_and_resolve_references()
    c.init.from_workdir = "/nonexistent"
    with pytest.raises(ValueError, match="random init"):
        create_stacked_state(runs["model"], runs["tx"], c, runs["shardings"], [0, 1])
    with pytest.raises(ValueError, match="at least one seed"):
        create_stacked_state(runs["model"], runs["tx"], runs["c"], runs["shardings"], [])
