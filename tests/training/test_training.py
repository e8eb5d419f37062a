"""The training loop end to end: resume, resharding, corrupt checkpoints, outputs, errors."""

import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import COMPILE_FLAGS, assert_cli_usage_error, tiny_config
from routezoo.training import checkpoint as ckpt_lib
from routezoo.training import config_check
from routezoo.training.metrics import read_metrics
from routezoo.training.train import train_and_evaluate


def _by_step(workdir, key="loss"):
    return {r["step"]: r[key] for r in read_metrics(workdir) if key in r}


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    """8 uninterrupted steps on mesh data=8."""
    wd = str(tmp_path_factory.mktemp("full"))
    train_and_evaluate(tiny_config(data_dir), wd)
    return wd


def test_outputs(full_run):
    records = read_metrics(full_run)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert evals[0]["eval_loss"] > evals[-1]["eval_loss"]
    for r in evals:
        assert math.isfinite(r["eval_loss"]) and r["eval_bits_per_byte"] > 0
    assert records[0]["params_total"] > 0 and records[0]["flops_per_token_train"] > 0
    config = json.load(open(os.path.join(full_run, "config.json")))
    assert config["train"]["steps"] == 8
    assert os.path.getsize(os.path.join(full_run, "plots", "loss.png")) > 1000
    assert glob.glob(os.path.join(full_run, "tensorboard", "events.out.tfevents.*"))
    assert sorted(os.listdir(os.path.join(full_run, "checkpoints"))) == ["4", "8"]
    assert os.path.exists(os.path.join(full_run, "checkpoints", "8", ckpt_lib.MANIFEST))
    # Loss falls over the 8 steps on real data.
    assert train[-1]["loss"] < train[0]["loss"]


def test_stop_and_resume_gives_identical_metrics(full_run, data_dir, tmp_path):
    wd = str(tmp_path)
    train_and_evaluate(tiny_config(data_dir), wd, stop_after=4)
    assert sorted(_by_step(wd)) == [1, 2, 3, 4]
    train_and_evaluate(tiny_config(data_dir), wd)
    for key in ("loss", "grad_norm", "eval_loss", "eval_bits_per_byte"):
        assert _by_step(wd, key) == _by_step(full_run, key), key


def test_restore_onto_other_mesh_continues_with_same_loss(full_run, data_dir, tmp_path):
    wd = str(tmp_path)
    train_and_evaluate(tiny_config(data_dir), wd, stop_after=4)
    train_and_evaluate(tiny_config(data_dir, **{"mesh.data": 2, "mesh.fsdp": 4}), wd)
    got, want = _by_step(wd), _by_step(full_run)
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in range(5, 9)], [want[s] for s in range(5, 9)], rtol=2e-5)


def test_corrupt_latest_checkpoint_falls_back(full_run, data_dir, tmp_path, capsys):
    wd = str(tmp_path / "run")
    shutil.copytree(full_run, wd)
    step8 = os.path.join(wd, "checkpoints", "8")
    victim = max((p for p in glob.glob(os.path.join(step8, "state", "**", "*"), recursive=True)
                  if os.path.isfile(p)), key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    capsys.readouterr()
    train_and_evaluate(tiny_config(data_dir), wd)
    out = capsys.readouterr().out
    assert "step 8 is corrupt" in out and os.path.basename(victim) in out
    assert "resumed from step 4" in out
    # the corrupt step is kept aside, not deleted; training redid steps 5..8 identically
    assert os.path.isdir(os.path.join(wd, "checkpoints", "corrupt", "8"))
    assert os.path.exists(os.path.join(wd, "checkpoints", "8", ckpt_lib.MANIFEST))
    assert _by_step(wd) == _by_step(full_run)


def test_older_state_never_overwrites_newer(full_run, tmp_path):
    wd = str(tmp_path / "ck")
    shutil.copytree(os.path.join(full_run, "checkpoints"), wd)
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(wd, "8", "**"), recursive=True)}
    ck = ckpt_lib.Checkpointer(wd, keep=3, async_save=False, verify=True, log=lambda m: None)
    assert ck.latest_step() == 8
    assert ck.save(6, {"x": jnp.zeros(3)}, None) is False
    ck.close()
    after = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(wd, "8", "**"), recursive=True)}
    assert before == after and sorted(os.listdir(wd)) == ["4", "8"]


def test_verify_manifest_names_file(full_run, tmp_path):
    step = str(tmp_path / "8")
    shutil.copytree(os.path.join(full_run, "checkpoints", "8"), step)
    ckpt_lib.verify_manifest(step)
    victim = os.path.join(step, "_CHECKPOINT_METADATA")
    with open(victim, "ab") as f:
        f.write(b"x")
    with pytest.raises(ckpt_lib.CorruptCheckpoint, match="_CHECKPOINT_METADATA"):
        ckpt_lib.verify_manifest(step)


# --------------------------------------------------------------------------- step math

def test_grad_accumulation_matches_full_batch(data_dir):
    from flax import linen as nn

    from routezoo import zoo
    from routezoo.training.optim import make_optimizer
    from routezoo.training.train import create_state, make_train_step, mesh_and_rules, state_shardings

    results = []
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 258, size=(8, 33)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((8, 32), np.float32)}
    for accum in (1, 4):
        c = tiny_config(data_dir, **{"train.grad_accum": accum, "mesh.data": 1})
        mesh, rules = mesh_and_rules(tiny_config(data_dir, **{"mesh.data": 8}))
        model = zoo.build(c.model)
        tx, sched = make_optimizer(c.optimizer, c.train.steps)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            _, shardings, _ = state_shardings(model, tx, c, mesh, rules)
            state = create_state(model, tx, c, shardings)
            state, metrics = jax.jit(make_train_step(model, tx, c, sched))(state, batch)
        results.append((jax.device_get(state.params), float(metrics["loss"])))
    (p1, l1), (p4, l4) = results
    assert l1 == pytest.approx(l4, rel=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_eval_step_matches_numpy(data_dir):
    from routezoo.training.train import cross_entropy

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5))
    weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
    nll, correct = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights
    np.testing.assert_allclose(nll, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(correct, (logits.argmax(-1) == targets) * weights)


def test_weight_decay_mask_skips_vectors_and_embedding():
    from routezoo.training.optim import decay_mask

    params = {"embed": {"embedding": np.zeros((4, 3))}, "norm": {"scale": np.zeros(3)},
              "mlp": {"wi": np.zeros((3, 5))}}
    assert decay_mask(params, "matrices") == {"embed": {"embedding": False}, "norm": {"scale": False},
                                              "mlp": {"wi": True}}


@pytest.mark.parametrize("name,schedule", [("adafactor", "linear"), ("sgd", "constant")])
def test_other_optimizers_train(data_dir, tmp_path, name, schedule):
    c = tiny_config(data_dir, **{"optimizer.name": name, "optimizer.schedule": schedule,
                                 "train.steps": 4, "optimizer.learning_rate": 0.01 if name == "sgd" else 3e-3})
    out = train_and_evaluate(c, str(tmp_path))
    assert math.isfinite(out["loss"]) and math.isfinite(out["eval_loss"])


# --------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("flags,needle", [
    (["--config.model.nope=1"], "unknown config key 'model.nope'; allowed under model:"),
    (["--config.train.steps=abc"], "--config.train.steps"),
    (["--config.model.name=gpt9"], "allowed: decoder_lm"),
    (["--config.optimizer.name=lion"], "allowed: adamw, adafactor, sgd"),
    (["--config.data.name=no_such_dataset_xyz"], "unknown data.name 'no_such_dataset_xyz'"),
    (["--config.train.batch_size=12"], "not divisible by the data-parallel size 8"),
    (["--config=not_a_config"], "config 'not_a_config' not found"),
])
def test_bad_config_one_line_exit_2_no_workdir(tmp_path, capsys, flags, needle):
    assert_cli_usage_error(tmp_path, capsys, flags, needle)


def test_config_file_with_unknown_key_is_refused(data_dir):
    c = tiny_config(data_dir)
    c.model.unlock()
    c.model.bogus = 3
    with pytest.raises(config_check.ConfigError, match="unknown config key 'model.bogus'"):
        config_check.validate(c)


def _cli(*args, **kw):
    return subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "routezoo"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_cli_exit_code_and_help(tmp_path):
    p = _cli("train", "--workdir", str(tmp_path / "x"), "--config.model.name=nope")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and err.strip().startswith("routezoo: error: unknown model.name")
    p = _cli("--help")
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and "train" in out


def test_sigterm_saves_and_resumes(data_dir, tmp_path):
    wd = str(tmp_path / "run")
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {COMPILE_FLAGS}"}
    p = _cli("train", "--workdir", wd, f"--config.data.data_dir={data_dir}", "--config.data.seq_len=32",
             "--config.model.d_model=32", "--config.model.mlp_dim=64", "--config.model.ffn=mlp",
             "--config.model.num_layers=1", "--config.train.steps=100000",
             "--config.train.log_every=1", "--config.train.progress=false", "--config.checkpoint.every=100000",
             env=env)
    metrics = os.path.join(wd, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 4):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "checkpoint saved" in out + err
    steps = [int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit()]
    assert len(steps) == 1 and steps[0] >= 3


def test_layout_hint_only_for_gpu_runs_scanned_without_remat():
    """The startup note names both ways out; CPU/TPU runs, unscanned stacks (by the config,
    or by a router that keeps the stack unscanned) and any remat policy get none."""
    from routezoo.configs import base
    from routezoo.training.loop import layout_hint
    m = base.get_config().model
    assert m.scan_layers and m.remat == "none"
    line = layout_hint(m, "gpu")
    assert "model.scan_layers=false" in line and "model.remat" in line
    assert layout_hint(m, "cpu") is None and layout_hint(m, "tpu") is None
    m.remat = "full"
    assert layout_hint(m, "gpu") is None
    m.remat = "none"
    m.ffn, m.moe.router = "moe", "pregate"      # Read-ME's pre-gate keeps the stack unscanned
    assert m.scan_layers and layout_hint(m, "gpu") is None
    m.moe.router = "top_k"
    assert layout_hint(m, "gpu") is not None
    m.scan_layers = False
    assert layout_hint(m, "gpu") is None
