"""Runs that survive divergence and faults: non-finite steps (stop / skip), strict
metrics.jsonl, the workdir lock, a full disk during a save, corrupt checkpoints, a
rerun with another config, broken init sources, and a resume after a crash."""

import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_cli_usage_error, tiny_config
from routezoo.training import checkpoint as ckpt_lib
from routezoo.training import cli
from routezoo.training import metrics as metrics_lib
from routezoo.training.workdir import LOCK_FILE, WorkdirLock, load_trained

# A tiny MoE LM through the CLI, exportable to Hugging Face (plain tied logits).
FLAGS = ["--config.data.seq_len=32", "--config.model.num_layers=1", "--config.model.d_model=32",
         "--config.model.num_heads=2", "--config.model.num_kv_heads=1", "--config.model.head_dim=16",
         "--config.model.mlp_dim=64", "--config.model.ffn=moe", "--config.model.moe.num_experts=4",
         "--config.model.moe.expert_dim=32", "--config.model.scale_tied_logits=false",
         "--config.train.steps=4", "--config.train.batch_size=16", "--config.train.eval_every=100",
         "--config.train.eval_steps=1", "--config.train.log_every=1", "--config.train.progress=false",
         "--config.checkpoint.every=2", "--config.optimizer.warmup_steps=2"]


def _train(capsys, workdir, data_dir, *extra):
    """``routezoo train`` in this process: (exit code, stdout, stderr); ``capsys`` or ``capfd``."""
    capsys.readouterr()
    code = cli.main(["train", "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", *FLAGS, *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def _strict_records(workdir):
    def refuse(name):
        raise ValueError(f"bare {name} in metrics.jsonl")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=refuse) for line in f if line.strip()]


def _params(step_dir):
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ck:
        return ck.restore(os.path.join(step_dir, "state"))["params"]


def _corrupt(step_dir):
    victim = max((p for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
                  if os.path.isfile(p)), key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    return victim


def _snapshot(path, lock=True):
    """Size and mtime of every file; ``lock=False``: without run.lock (whoever holds the
    lock writes its pid into it)."""
    return {p: (os.path.getsize(p), os.path.getmtime(p))
            for p in glob.glob(os.path.join(path, "**"), recursive=True)
            if os.path.isfile(p) and (lock or os.path.basename(p) != LOCK_FILE)}


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    """A finished 4-step run: checkpoints 2 and 4 (do not change it; copy it)."""
    wd = tmp_path_factory.mktemp("faults") / "run"
    code = cli.main(["train", "--workdir", str(wd), f"--config.data.data_dir={data_dir}", *FLAGS])
    assert code == 0
    assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4"]
    return str(wd)


@pytest.fixture(scope="module")
def hf_dir(run_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf") / "hf")
    assert cli.main(["convert", "--workdir", run_dir, "--to-hf", out]) == 0
    return out


# --------------------------------------------------------------------------- divergence

def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, capsys):
    wd = tmp_path / "run"
    code, out, err = _train(capsys, wd, data_dir, "--config.optimizer.learning_rate=1e6", "--config.model.ffn=mlp",
                            "--config.train.steps=8", "--config.checkpoint.keep=1")
    # warm-up: step 1 has learning rate 0, step 2 blows the weights up, step 3's gradient is NaN
    assert code == 3, err
    assert len(err.strip().splitlines()) == 1 and "diverged at step 3" in err and "step 2" in err, err
    assert sorted(os.listdir(wd / "checkpoints")) == ["2"]     # keep=1 did not rotate it out
    ckpt_lib.verify_manifest(str(wd / "checkpoints" / "2"))
    _, _, state = load_trained(str(wd))
    assert int(state.step) == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    records = _strict_records(wd)                               # no bare NaN
    assert any(r.get("grad_norm", 0) is None for r in records if r["step"] == 3)


def test_skip_drops_the_update_bit_for_bit(data_dir, tmp_path, monkeypatch):
    """Step 3's batch has NaN weights: its update is dropped, the run goes on."""
    from routezoo.training import data as data_lib
    from routezoo.training.train import train_and_evaluate

    real = data_lib.make_train_iterator

    class Poisoned:   # the real iterator; the 3rd batch poisoned; checkpointable as bytes
        def __init__(self, it):
            self.it, self.n = it, 0

        def __iter__(self):
            return self

        def __next__(self):
            batch, self.n = next(self.it), self.n + 1
            if self.n == 3:
                batch = {**batch, "weights": np.full_like(batch["weights"], np.nan)}
            return batch

        def get_state(self):
            return json.dumps(self.it.get_state()).encode()

        def set_state(self, state):
            self.it.set_state(json.loads(state))

        def start_prefetch(self):
            getattr(self.it, "start_prefetch", lambda: None)()

    monkeypatch.setattr(data_lib, "make_train_iterator", lambda config: Poisoned(real(config)))
    c = tiny_config(data_dir, **{"model.num_layers": 1, "train.steps": 5, "train.eval_every": 100,
                                 "train.eval_steps": 1,
                                 "checkpoint.every": 1, "checkpoint.keep": 10, "train.on_nonfinite": "skip"})
    wd = str(tmp_path / "run")
    out = train_and_evaluate(c, wd)
    assert out["step"] == 5 and out["skipped_steps"] == 1
    by_step = {r["step"]: r for r in _strict_records(wd) if "loss" in r}
    assert by_step[3]["loss"] is None and by_step[3]["skipped_steps"] == 1
    assert by_step[2]["skipped_steps"] == 0 and np.isfinite(by_step[4]["loss"])
    ck = os.path.join(wd, "checkpoints")
    p2, p3, p4 = (_params(os.path.join(ck, str(s))) for s in (2, 3, 4))
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p3)):
        np.testing.assert_array_equal(a, b)                    # skipped: unchanged bit for bit
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p3), jax.tree.leaves(p4)))
    guard = json.load(open(glob.glob(os.path.join(ck, "5", "guard", "*metadata*"))[0]))
    assert guard["skipped"] == 1


def test_step_flags_nonfinite_and_spikes_inside_jit(data_dir):
    """The guarded step: a NaN batch and a loss spike are skipped (state unchanged but
    ``step``), a normal step is applied; the flags come back in the guard."""
    from flax import linen as nn

    from routezoo import zoo
    from routezoo.training.optim import make_optimizer
    from routezoo.training.state import create_state, mesh_and_rules, state_shardings
    from routezoo.training.step import init_guard, make_train_step

    # no warm-up: a skipped step leaves the optimizer's own step count (and so its schedule) behind
    c = tiny_config(data_dir, **{"mesh.data": 1, "model.num_layers": 1, "train.on_nonfinite": "skip",
                                 "train.spike_factor": 2.0,
                                 "optimizer.warmup_steps": 0})
    mesh, rules = mesh_and_rules(tiny_config(data_dir, **{"mesh.data": 8}))
    model = zoo.build(c.model)
    tx, sched = make_optimizer(c.optimizer, c.train.steps)
    tokens = np.random.default_rng(0).integers(2, 258, size=(8, 33)).astype(np.int32)
    good = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((8, 32), np.float32)}
    nan = {**good, "weights": np.full((8, 32), np.nan, np.float32)}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, shardings, _ = state_shardings(model, tx, c, mesh, rules)
        state = create_state(model, tx, c, shardings)
        step = jax.jit(make_train_step(model, tx, c, sched, guarded=True))
        before = jax.device_get(state)
        state, guard, m = step(state, init_guard(), nan)
        after = jax.device_get(state)
        assert int(after.step) == 1 and int(guard["skipped"]) == 1 and int(guard["first_bad"]) == 1
        for a, b in zip(jax.tree.leaves((before.params, before.opt_state)),
                        jax.tree.leaves((after.params, after.opt_state))):
            np.testing.assert_array_equal(a, b)
        state, guard, m = step(state, guard, good)             # finite; too few steps for the spike check
        assert int(guard["skipped"]) == 1 and int(guard["count"]) == 1
        assert float(guard["loss_mean"]) == pytest.approx(float(m["loss"]))
        applied = jax.device_get(state.params)
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(applied)))
        spiky = init_guard(loss_mean=0.5, count=100)           # the loss (~5.5) is > 2 x 0.5
        state, guard, m = step(state, spiky, good)
        assert int(guard["skipped"]) == 1 and int(guard["first_spike"]) == 1 and int(guard["first_bad"]) == 3
        for a, b in zip(jax.tree.leaves(applied), jax.tree.leaves(jax.device_get(state.params))):
            np.testing.assert_array_equal(a, b)


def test_metric_writer_writes_null_for_nonfinite(tmp_path):
    w = metrics_lib.MetricWriter(str(tmp_path))
    w.write(1, {"loss": np.float32(np.nan), "grad_norm": np.inf, "load": np.array([0.5, np.nan])})
    w.close()
    (record,) = _strict_records(tmp_path)
    assert record == {"step": 1, "loss": None, "grad_norm": None, "load": [0.5, None]}


@pytest.mark.parametrize("flags,needle", [
    (["--config.optimizer.learning_rate=nan"], "'optimizer.learning_rate' must be a finite number, got nan"),
    (["--config.optimizer.b2=inf"], "'optimizer.b2' must be a finite number"),
    (["--config.train.on_nonfinite=ignore"], "unknown train.on_nonfinite 'ignore'; allowed: stop, skip"),
    (["--config.checkpoint.on_corrupt=x"], "unknown checkpoint.on_corrupt 'x'; allowed: stop, restart"),
    (["--config.train.spike_factor=0.5"], "'train.spike_factor' must be 0 (off) or > 1"),
    (["--config.model.remat=bogus"], "unknown model.remat 'bogus'; allowed: none, full, dots_saveable"),
    (["--config.init.from=/nonexistent/run"], "'/nonexistent/run' is not a directory"),
])
def test_bad_new_keys_one_line_exit_2(tmp_path, capsys, flags, needle):
    assert_cli_usage_error(tmp_path, capsys, flags, needle)


# --------------------------------------------------------------------------- the workdir lock

def test_second_process_on_held_workdir_is_refused(run_dir, data_dir, tmp_path, capsys):
    wd = str(tmp_path / "run")
    shutil.copytree(run_dir, wd)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom routezoo.training.workdir import WorkdirLock\n"
         "WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)", wd],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(wd)
        code, out, err = _train(capsys, wd, data_dir, "--config.train.steps=6")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "is in use by another run" in err and f"pid {holder.pid}" in err
        assert _snapshot(wd) == before and out == ""           # nothing written, nothing printed
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with WorkdirLock(wd):   # the OS dropped the dead holder's lock
        pass
    other = WorkdirLock(wd)
    with WorkdirLock(wd):   # and a second holder in this process is refused too
        with pytest.raises(ckpt_lib.RunError, match="in use by another run"):
            other.acquire()


def test_failed_start_leaves_no_workdir(tmp_path):
    wd = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with WorkdirLock(str(wd)):
            assert os.listdir(wd) == [LOCK_FILE]
            raise RuntimeError("failed before writing anything")
    assert not wd.exists()


# --------------------------------------------------------------------------- a full disk

def test_full_disk_in_background_save_keeps_older_checkpoints(tmp_path, monkeypatch):
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    d = str(tmp_path / "ck")
    ck = ckpt_lib.Checkpointer(d, keep=1, async_save=True, verify=True, log=lambda m: None)
    state = {"w": jnp.arange(8.0)}
    assert ck.save(1, state, None)
    ck.wait()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(async_checkpointer, "_on_commit_callback", full)
    assert ck.save(2, {"w": jnp.ones(8)}, None)   # returns; the write fails in the background
    with pytest.raises(ckpt_lib.CheckpointWriteFailed) as e:
        ck.save(3, {"w": jnp.ones(8)}, None)       # noticed at the next save
    msg = str(e.value)
    assert "\n" not in msg and "writing step 2" in msg and "No space left on device" in msg
    assert "newest: step 1" in msg and e.value.exit_code == 4
    monkeypatch.undo()
    assert sorted(os.listdir(d)) == ["1"]          # keep=1 did not delete step 1, no temporary dir left
    ckpt_lib.verify_manifest(os.path.join(d, "1"))
    np.testing.assert_array_equal(_params_free(os.path.join(d, "1"))["w"], np.arange(8.0))
    ck.manager.close()


def _params_free(step_dir):
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as c:
        return c.restore(os.path.join(step_dir, "state"))


def test_full_disk_stops_the_run_in_one_line(run_dir, data_dir, tmp_path, capfd, monkeypatch):
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    wd = str(tmp_path / "run")
    shutil.copytree(run_dir, wd)
    real = async_checkpointer._on_commit_callback

    def full_after_step_6(tmpdir, *args, **kwargs):   # steps 6 commits, 8 hits a full disk
        if os.path.basename(str(tmpdir.get_final())) == "8":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tmpdir, *args, **kwargs)
    monkeypatch.setattr(async_checkpointer, "_on_commit_callback", full_after_step_6)
    code, out, err = _train(capfd, wd, data_dir, "--config.train.steps=8", "--config.checkpoint.keep=2")
    assert code == 4 and len(err.strip().splitlines()) == 1 and "writing step 8" in err, err
    assert "Traceback" not in err
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["4", "6"]   # no 8.orbax-checkpoint-tmp
    for s in ("4", "6"):
        ckpt_lib.verify_manifest(os.path.join(wd, "checkpoints", s))


# --------------------------------------------------------------------------- corrupt checkpoints

def test_every_checkpoint_corrupt_stops_unless_told_to_restart(run_dir, data_dir, tmp_path, capsys):
    wd = str(tmp_path / "run")
    shutil.copytree(run_dir, wd)
    for s in ("2", "4"):
        _corrupt(os.path.join(wd, "checkpoints", s))
    before = _snapshot(wd, lock=False)
    code, out, err = _train(capsys, wd, data_dir)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "every checkpoint" in err and "checkpoint.on_corrupt=restart" in err
    assert _snapshot(wd, lock=False) == before                  # nothing moved, nothing written
    ck = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), keep=3, async_save=False, verify=True,
                               log=lambda m: None, on_corrupt="restart")
    assert ck.restore_latest({"x": jax.ShapeDtypeStruct((1,), jnp.float32)}, None) is None
    ck.close()
    assert sorted(os.listdir(os.path.join(wd, "checkpoints", "corrupt"))) == ["2", "4"]


def test_quarantining_a_step_twice_keeps_both_copies(run_dir, tmp_path):
    d = str(tmp_path / "ck")
    for attempt in range(2):
        shutil.copytree(os.path.join(run_dir, "checkpoints", "4"), os.path.join(d, "4"))
        ck = ckpt_lib.Checkpointer(d, keep=3, async_save=False, verify=True, log=lambda m: None)
        ck._quarantine(4)
        ck.close()
    assert sorted(os.listdir(os.path.join(d, "corrupt"))) == ["4", "4.2"]


def test_convert_and_analyze_fall_back_to_the_newest_intact_step(run_dir, hf_dir, tmp_path, capsys):
    wd = str(tmp_path / "run")
    shutil.copytree(run_dir, wd)
    victim = _corrupt(os.path.join(wd, "checkpoints", "4"))
    capsys.readouterr()
    assert cli.main(["convert", "--workdir", wd, "--to-hf", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "step 4" in out and os.path.basename(victim) in out
    assert os.path.exists(tmp_path / "hf" / "model.safetensors")
    assert cli.main(["analyze", "--workdir", wd, "--steps", "1"]) == 0
    assert "at step 2" in capsys.readouterr().out
    assert os.path.isdir(os.path.join(wd, "checkpoints", "4"))  # read-only: nothing moved


def test_unparsable_config_json_is_named(run_dir, tmp_path, capsys):
    wd = str(tmp_path / "run")
    shutil.copytree(run_dir, wd)
    with open(os.path.join(wd, "config.json"), "w") as f:
        f.write("{broken")
    for argv in (["convert", "--workdir", wd, "--to-hf", str(tmp_path / "hf")], ["analyze", "--workdir", wd]):
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and os.path.join(wd, "config.json") in err and "not valid JSON" in err


def test_adapter_rank_beyond_the_weight_is_one_line_and_writes_nothing(run_dir, data_dir, tmp_path, capsys):
    # PiSSA's rank is checked against the base's weights once the model is built: still a
    # config error (exit 2, one line), with nothing of the run written.
    wd = tmp_path / "pissa"
    code, out, err = _train(capsys, wd, data_dir, f"--config.init.from_workdir={run_dir}",
                            "--config.adapter.method=pissa", "--config.adapter.targets=attn/q",
                            "--config.adapter.rank=1000")
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "rank" in err and "1000" in err, err
    assert not os.path.exists(wd / "config.json") and not os.path.exists(wd / "checkpoints")


# --------------------------------------------------------------------------- reruns and sources

def test_rerun_with_another_config_changes_nothing(run_dir, data_dir, tmp_path, capsys):
    wd = str(tmp_path / "run")
    shutil.copytree(run_dir, wd)
    before = _snapshot(wd, lock=False)
    code, out, err = _train(capsys, wd, data_dir, "--config.model.d_model=64")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "model.d_model: 32" in err and "64 here" in err
    assert _snapshot(wd, lock=False) == before                              # config.json untouched
    assert cli.main(["convert", "--workdir", wd, "--to-hf", str(tmp_path / "hf")]) == 0


def test_broken_init_sources_one_line_exit_2_no_workdir(run_dir, hf_dir, tmp_path, capsys):
    truncated = str(tmp_path / "truncated")
    shutil.copytree(hf_dir, truncated)
    path = os.path.join(truncated, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    empty = str(tmp_path / "no_tensors")
    os.makedirs(empty)
    shutil.copy(os.path.join(hf_dir, "config.json"), empty)
    bad_json = str(tmp_path / "bad_json")
    shutil.copytree(hf_dir, bad_json)
    with open(os.path.join(bad_json, "config.json"), "w") as f:
        f.write("{not json")
    no_ckpt = str(tmp_path / "no_ckpt")
    os.makedirs(no_ckpt)
    shutil.copy(os.path.join(run_dir, "config.json"), no_ckpt)
    for flags, needle in [
        ([f"--config.init.from_hf={truncated}"], f"{path} "),
        ([f"--config.init.from_hf={truncated}"], "not a readable safetensors file"),
        ([f"--config.init.from_hf={empty}"], "no model.safetensors or model.safetensors.index.json"),
        ([f"--config.init.from_hf={bad_json}"], f"{os.path.join(bad_json, 'config.json')} is not valid JSON"),
        ([f"--config.init.from={no_ckpt}"], "holds no checkpoint"),
        ([f"--config.init.from={hf_dir}"], "for a Hugging Face checkpoint use init.from_hf"),
    ]:
        assert_cli_usage_error(tmp_path, capsys, flags, needle)


def test_resume_after_a_crash_writes_each_step_once(run_dir, data_dir, tmp_path, capsys):
    """A crash after step 4 was logged but before its checkpoint: the resume from step 2
    drops the records of steps 3-4 and writes them again, once."""
    wd = str(tmp_path / "run")
    shutil.copytree(run_dir, wd)
    shutil.rmtree(os.path.join(wd, "checkpoints", "4"))
    with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "loss": 1.0')                     # cut short by the crash
    code, out, err = _train(capsys, wd, data_dir)
    assert code == 0, err
    assert "resumed from step 2" in out and "dropped 3 record(s) of steps >= 3" in out
    steps = [r["step"] for r in _strict_records(wd) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    restarts = [e.step for p in sorted(glob.glob(os.path.join(wd, "tensorboard", "events.out.tfevents.*")))
                for e in EventFileLoader(p).Load() if e.HasField("session_log") and e.session_log.status == 1]
    assert restarts == [3]
