"""Two CPU processes on localhost under jax.distributed train like one process."""

import os
import socket
import subprocess
import sys

import numpy as np

from conftest import COMPILE_FLAGS, tiny_config
from routezoo.training.metrics import read_metrics
from routezoo.training.train import train_and_evaluate

# The same tiny MoE LM on both sides (the CLI starts from configs/default.py).
MOE = {"model.ffn": "moe", "model.moe.num_experts": 8, "model.moe.k": 2, "model.moe.expert_dim": 32}
FLAGS = [f"--config.{k}={v}" for k, v in MOE.items()] + [
         "--config.data.seq_len=32", "--config.model.num_layers=2", "--config.model.d_model=32",
         "--config.model.num_heads=2", "--config.model.num_kv_heads=1", "--config.model.head_dim=16",
         "--config.model.mlp_dim=64", "--config.train.steps=8", "--config.train.batch_size=16",
         "--config.train.eval_every=4", "--config.train.eval_steps=2", "--config.train.log_every=1",
         "--config.train.progress=false", "--config.checkpoint.every=4", "--config.optimizer.warmup_steps=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(workdir: str, data_dir: str, *extra: str) -> None:
    port = _free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "routezoo")
    procs = []
    for pid in range(2):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {COMPILE_FLAGS}", "JAX_PLATFORMS": "cpu",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen(
            [exe, "train", "--workdir", workdir, f"--config.data.data_dir={data_dir}", *FLAGS, *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]


def test_two_processes_match_one_and_resume(data_dir, tmp_path):
    ref = str(tmp_path / "one")
    train_and_evaluate(tiny_config(data_dir, **MOE), ref)   # one process, 8 devices, data=8
    two = str(tmp_path / "two")
    _launch_two(two, data_dir, "--stop_after=4")            # 2 processes x 4 devices, save at 4
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(os.path.join(two, "checkpoints", "4", "data")))
    _launch_two(two, data_dir)                              # restore from all processes, finish
    want = {r["step"]: r for r in read_metrics(ref)}
    got = {r["step"]: r for r in read_metrics(two)}
    assert sorted(got) == sorted(want)
    for key in ("loss", "eval_loss"):
        steps = [s for s in want if key in want[s]]
        np.testing.assert_allclose([got[s][key] for s in steps], [want[s][key] for s in steps], rtol=1e-5)
