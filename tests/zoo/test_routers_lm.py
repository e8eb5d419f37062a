"""Every router through the zoo LM and the one training loop: on mesh data=2 x expert=4,
training lowers the loss, and a run stopped and resumed from its checkpoint continues."""

import numpy as np
import pytest

from conftest import tiny_config
from routezoo.training.metrics import read_metrics
from routezoo.training.train import train_and_evaluate

ROUTER_SETTINGS = {
    "top_k": {},
    "hash": {"model.moe.k": 1},
    "thor": {"model.moe.k": 1},
    "smoe_dropout": {"model.moe.smoe_k_steps": 8, "model.moe.smoe_eval_sweep": "1,8"},
    "top_p": {},
    "null_experts": {"model.moe.num_null_experts": 4},
    "recurrent": {"model.moe.recurrent_dim": 16, "model.num_layers": 2},   # state passes layer to layer
    "pregate": {"model.moe.pregate_dim": 16, "model.moe.dispatch": "capacity"},
    "uoe": {"model.moe.uoe_capacity_factor": 1.0},   # selective attention drops tokens per head too
    "duo": {"model.moe.duo_eval_sweep": "big,skip"},     # random routing (Duo-LLM stage 1)
}


@pytest.mark.parametrize("router", sorted(ROUTER_SETTINGS))
def test_router_trains_resumes_and_runs_expert_parallel(router, data_dir, tmp_path):
    overrides = {"model.ffn": "moe", "model.moe.router": router, "model.moe.num_experts": 8,
                 "model.moe.k": 2, "model.moe.expert_dim": 32, "mesh.data": 2, "mesh.expert": 4,
                 "train.steps": 8, "optimizer.learning_rate": 1e-2, "model.num_layers": 1,
                 **ROUTER_SETTINGS[router]}
    config = tiny_config(data_dir, **overrides)
    from routezoo.training import config_check
    config_check.validate(config)
    wd = str(tmp_path)
    train_and_evaluate(config, wd, stop_after=4)
    train_and_evaluate(config, wd)                       # restores step 4 and finishes
    records = read_metrics(wd)
    train = {r["step"]: r for r in records if "loss" in r}
    assert sorted(train) == list(range(1, 9))
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals[-1] < evals[0], evals                   # eval loss at step 8 below step 0
    assert all(np.isfinite(r["loss"]) for r in train.values())
    if router == "thor":                                  # the consistency term is trained
        assert all(r["thor_consistency"] > 0 for r in train.values())
    if router == "null_experts":
        assert 0 < train[8]["moe/layer0/real_experts_per_token"] <= 2
    if router == "uoe":                                   # the head gate's statistics are logged
        assert 0 <= train[8]["moe/layer0/attn/dropped_fraction"] < 1
    if router == "smoe_dropout":                          # k grows from 1 to E over 8 steps
        assert train[1]["moe/layer0/k"] < train[8]["moe/layer0/k"]
        # evaluated at every k of the sweep; k=8 is the final k, the plain evaluation's
        ev = [r for r in records if "eval_loss" in r]
        for r in ev:
            assert r["eval_loss@k8"] == pytest.approx(r["eval_loss"], rel=1e-6)
            assert np.isfinite(r["eval_loss@k1"]) and np.isfinite(r["eval_bits_per_byte@k1"])
        assert ev[-1]["eval_loss@k1"] != pytest.approx(ev[-1]["eval_loss"], rel=1e-4)
    if router == "duo":                                   # options drawn with moe.duo_probs (0.5, 0.25, 0.25)
        for name, p in (("big", 0.5), ("small", 0.25), ("skip", 0.25)):
            assert np.mean([r[f"moe/layer0/frac_{name}"] for r in train.values()]) == pytest.approx(p, abs=0.05)
        ev = [r for r in records if "eval_loss" in r]      # evaluation route 'auto' is all big
        assert all(r["eval_loss@big"] == pytest.approx(r["eval_loss"], rel=1e-6) for r in ev)
        assert ev[-1]["eval_loss@skip"] != pytest.approx(ev[-1]["eval_loss"], rel=1e-4)
        _check_duo_stage3_starts_from(wd, config)


def _check_duo_stage3_starts_from(workdir, config):
    """Duo-LLM stage 3: a router-mode run with ``init.from`` the random-routing run starts
    from its trained parameters (the router's included, created in random mode too)."""
    from routezoo.training import train
    config = config.copy_and_resolve_references()
    config.model.moe.duo_mode, config.init.from_workdir = "router", workdir
    model = train.zoo.build(config.model)
    tx, _ = train.make_optimizer(config.optimizer, config.train.steps)
    mesh, rules = train.mesh_and_rules(config)
    with train.jax.set_mesh(mesh), train.nn.logical_axis_rules(rules):
        _, shardings, _ = train.state_shardings(model, tx, config, mesh, rules)
        state = train.create_state(model, tx, config, shardings)
        _, trained = train.restore_params(workdir, mesh, rules)
    assert train.jax.tree.structure(state.params) == train.jax.tree.structure(trained)
    for a, b in zip(train.jax.tree.leaves(state.params), train.jax.tree.leaves(trained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state.step) == 0
