"""The MoE LM through the training loop: meshes, checkpoints, statistics, config errors."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from routezoo.training import cli
from routezoo.training.metrics import read_metrics
from routezoo.training.train import train_and_evaluate

MOE = {"model.ffn": "moe", "model.moe.num_experts": 8, "model.moe.k": 2, "model.moe.expert_dim": 32}


def moe_config(data_dir, **kw):
    return tiny_config(data_dir, **{**MOE, **kw})


def _losses(wd):
    return {r["step"]: r["loss"] for r in read_metrics(wd) if "loss" in r}


# 8 steps (the tiny config's), evaluated and saved every 4.
@pytest.fixture(scope="module")
def expert8_run(data_dir, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("e8"))
    train_and_evaluate(moe_config(data_dir, **{"mesh.data": 1, "mesh.expert": 8}), wd)
    return wd


def test_same_loss_curve_on_data8_and_expert8(expert8_run, data_dir, tmp_path):
    wd = str(tmp_path)
    train_and_evaluate(moe_config(data_dir), wd)
    a, b = _losses(wd), _losses(expert8_run)
    assert sorted(a) == list(range(1, 9))
    rel = max(abs(a[s] - b[s]) / abs(b[s]) for s in a)
    assert rel < 1e-4, rel
    assert a[8] < a[1]


def test_checkpoint_expert8_to_expert2_and_back(expert8_run, data_dir, tmp_path):
    wd = str(tmp_path)
    train_and_evaluate(moe_config(data_dir, **{"mesh.data": 1, "mesh.expert": 8}), wd, stop_after=4)
    train_and_evaluate(moe_config(data_dir, **{"mesh.data": 4, "mesh.expert": 2}), wd, stop_after=2)
    train_and_evaluate(moe_config(data_dir, **{"mesh.data": 1, "mesh.expert": 8}), wd)
    got, want = _losses(wd), _losses(expert8_run)
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in range(5, 9)], [want[s] for s in range(5, 9)], rtol=1e-4)


def test_moe_statistics_logged_and_plotted(expert8_run):
    records = [r for r in read_metrics(expert8_run) if "loss" in r]
    last = records[-1]
    for layer in (0, 1):
        load = np.asarray(last[f"moe/layer{layer}/load"])
        assert load.shape == (8,) and load.sum() == pytest.approx(1.0, abs=1e-5)
        assert last[f"moe/layer{layer}/dropped_fraction"] == 0.0        # dropless
        assert last[f"moe/layer{layer}/experts_per_token"] == pytest.approx(2.0)
        assert 0 < last[f"moe/layer{layer}/router_entropy"] <= np.log(8) + 1e-5
    assert last["load_balance"] > 0 and last["z_loss"] > 0
    # the total loss is the cross-entropy plus the auxiliary terms
    assert last["loss"] == pytest.approx(last["ce"] + last["load_balance"] + last["z_loss"], rel=1e-5)
    assert os.path.getsize(os.path.join(expert8_run, "plots", "expert_load.png")) > 1000
    info = read_metrics(expert8_run)[0]
    assert info["params_active"] < info["params_total"]


def test_active_params_count_k_of_e_experts(data_dir):
    from routezoo import zoo
    c = moe_config(data_dir)
    m = c.model
    v = jax.eval_shape(lambda: zoo.build(m).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    total, active = zoo.count_params(v["params"], m)
    expert = m.num_layers * m.moe.num_experts * 3 * m.d_model * m.moe.expert_dim
    assert total - active == expert * (m.moe.num_experts - m.moe.k) // m.moe.num_experts


@pytest.mark.parametrize("flags,needle", [
    (["--config.model.moe.k=9"], "k"),
    (["--config.mesh.expert=8", "--config.mesh.data=1", "--config.model.moe.num_experts=12"], "divisible"),
    (["--config.model.moe.dispatch=capacity", "--config.model.moe.capacity_factor=0"], "capacity_factor"),
    (["--config.model.moe.router=expert_choice"], "causal"),
    (["--config.model.moe.router=nope"], "top_k"),
    (["--config.model.moe.dispatch=nope"], "dropless"),
])
def test_bad_moe_config_is_one_line_before_compiling(tmp_path, capsys, flags, needle):
    wd = tmp_path / "wd"
    with pytest.raises(SystemExit) as e:
        sys.exit(cli.main(["train", "--workdir", str(wd), "--config.model.ffn=moe", *flags]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not wd.exists()
