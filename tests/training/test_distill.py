"""Distillation from a frozen teacher through the one train step (training/distill.py)."""

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import tiny_config
from routezoo import zoo
from routezoo.training import config_check
from routezoo.training.distill import Distill, distill_kl
from routezoo.training.optim import make_optimizer
from routezoo.training.step import make_train_step
from routezoo.training.train import create_state, mesh_and_rules, state_shardings


def _batch(seed=0, b=8, l=16):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, 258, size=(b, l + 1)).astype(np.int32)
    w = (rng.random((b, l)) > 0.2).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": w}


def _np_kl(s, t, w, temp):
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    ls, lt = log_softmax(s / temp), log_softmax(t / temp)
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    return temp * temp * (kl * w).sum() / max(w.sum(), 1.0)


@pytest.fixture(scope="module")
def setup(data_dir):
    """A student and a teacher (another width and seed) of the same vocabulary."""
    c = tiny_config(data_dir)
    tc = tiny_config(data_dir, **{"model.mlp_dim": 96, "seed": 7})
    mesh, rules = mesh_and_rules(c)
    model, tmodel = zoo.build(c.model), zoo.build(tc.model)
    tx, sched = make_optimizer(c.optimizer, c.train.steps)
    ttx, _ = make_optimizer(tc.optimizer, tc.train.steps)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, shardings, _ = state_shardings(model, tx, c, mesh, rules)
        _, tshard, _ = state_shardings(tmodel, ttx, tc, mesh, rules)
        state = create_state(model, tx, c, shardings)
        tstate = create_state(tmodel, ttx, tc, tshard)
    tvars = {"params": tstate.params, **tstate.model_state}
    out = dict(c=c, mesh=mesh, rules=rules, model=model, tmodel=tmodel, tx=tx, sched=sched, state=state,
               tvars=tvars)
    out["plain"] = _run(out, None)   # the plain step on _batch()
    return out


def _run(s, teacher, *args, batch=None):
    with jax.set_mesh(s["mesh"]), nn.logical_axis_rules(s["rules"]):
        step = jax.jit(make_train_step(s["model"], s["tx"], s["c"], s["sched"], teacher=teacher))
        return jax.device_get(step(s["state"], _batch() if batch is None else batch, *args))


def test_weight_zero_is_the_plain_step_bit_for_bit(setup):
    plain_state, plain_m = setup["plain"]
    zero_state, zero_m = _run(setup, Distill(setup["tmodel"], 0.0, 2.0))
    for a, b in zip(jax.tree.leaves(plain_state), jax.tree.leaves(zero_state)):
        np.testing.assert_array_equal(a, b)
    assert set(plain_m) == set(zero_m)
    for k in plain_m:
        np.testing.assert_array_equal(plain_m[k], zero_m[k])


def test_distill_kl_matches_numpy():
    rng = np.random.default_rng(3)
    s = rng.normal(size=(2, 3, 5)).astype(np.float32)
    t = rng.normal(size=(2, 3, 5)).astype(np.float32) * 2
    w = np.array([[1, 0, 1], [1, 1, 0]], np.float32)
    for temp in (1.0, 2.5):
        got = float(distill_kl(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w), temp))
        assert got == pytest.approx(_np_kl(s.astype(np.float64), t.astype(np.float64), w, temp), rel=1e-5)
    # KL of a distribution from itself is 0; the term is >= 0
    assert float(distill_kl(jnp.asarray(s), jnp.asarray(s), jnp.asarray(w))) == pytest.approx(0.0, abs=1e-6)


def test_step_adds_the_hand_computed_kl_and_leaves_the_teacher(setup):
    s, weight, temp = setup, 0.7, 2.0
    batch = _batch()
    before = jax.device_get(s["tvars"])
    _, plain_m = s["plain"]
    _, m = _run(s, Distill(s["tmodel"], weight, temp), s["tvars"], batch=batch)
    # the student's and the teacher's logits on the step's inputs, by hand
    with jax.set_mesh(s["mesh"]), nn.logical_axis_rules(s["rules"]):
        t_logits, _ = jax.jit(s["tmodel"].apply)(s["tvars"], batch["inputs"])
        s_logits, _ = jax.jit(s["model"].apply)({"params": s["state"].params, **s["state"].model_state},
                                                batch["inputs"])
    want = _np_kl(np.asarray(s_logits, np.float64), np.asarray(t_logits, np.float64), batch["weights"], temp)
    assert float(m["distill_kl"]) == pytest.approx(want, rel=1e-4)
    assert float(m["distill"]) == pytest.approx(weight * want, rel=1e-4)
    assert float(m["loss"]) == pytest.approx(float(plain_m["loss"]) + weight * want, rel=1e-5)
    assert float(m["ce"]) == pytest.approx(float(plain_m["ce"]), rel=1e-6)
    # the teacher's variables are an argument only: unchanged, bit for bit
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(s["tvars"]))):
        np.testing.assert_array_equal(a, b)


def test_gradient_pulls_the_student_towards_the_teacher(setup):
    """Steps with only the KL term (plain SGD, no loss-free noise) lower the KL."""
    import optax
    s = dict(setup)
    s["tx"] = optax.sgd(0.5)
    s["state"] = s["state"].replace(opt_state=s["tx"].init(s["state"].params))
    batch = _batch(1)
    teacher = Distill(s["tmodel"], 1.0, 1.0)
    with jax.set_mesh(s["mesh"]), nn.logical_axis_rules(s["rules"]):
        step = jax.jit(make_train_step(s["model"], s["tx"], s["c"], s["sched"], teacher=teacher))
        state, kls = s["state"], []
        for _ in range(3):   # each step's metrics are those before its update
            state, m = step(state, batch, s["tvars"])
            kls.append(float(m["distill_kl"]))
    assert kls[2] < kls[1] < kls[0]


def _files_digest(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_loop_distils_from_a_workdir_and_checks_the_teacher(data_dir, tmp_path):
    from routezoo.training.train import train_and_evaluate
    teacher = str(tmp_path / "teacher")
    short = {"train.steps": 1, "checkpoint.every": 1, "train.eval_every": 1, "train.eval_steps": 1}
    train_and_evaluate(tiny_config(data_dir, **short), teacher)
    digest = _files_digest(os.path.join(teacher, "checkpoints"))
    c = tiny_config(data_dir, **{**short, "model.mlp_dim": 96, "distill.teacher_workdir": teacher, "distill.weight": 0.5})
    config_check.validate(c)
    out = train_and_evaluate(c, str(tmp_path / "student"))
    assert out["distill"] == pytest.approx(0.5 * out["distill_kl"], rel=1e-5) and out["distill_kl"] > 0
    assert _files_digest(os.path.join(teacher, "checkpoints")) == digest   # the teacher is only read

    bad = tiny_config(data_dir, **{"model.vocab_size": 300, "distill.teacher_workdir": teacher})
    with pytest.raises(config_check.ConfigError, match="vocab_size is 258.*300"):
        config_check.validate(bad)
    with pytest.raises(config_check.ConfigError, match="not a directory"):
        config_check.validate(tiny_config(data_dir, **{"distill.teacher_workdir": str(tmp_path / "none")}))
    with pytest.raises(config_check.ConfigError, match="distill.temperature"):
        config_check.validate(tiny_config(data_dir, **{"distill.temperature": 0.0}))
    # weight 0 with a teacher: nothing is loaded, nothing checked beyond the numbers
    config_check.validate(tiny_config(data_dir, **{"distill.teacher_workdir": str(tmp_path / "none"),
                                                   "distill.weight": 0.0}))
