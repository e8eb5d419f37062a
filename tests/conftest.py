"""Test setup: 8 simulated CPU devices so every sharding path runs in CI (compiled with
XLA:CPU flags chosen for compile time), and shared fixtures (one stdlib dataset per
session, a tiny config)."""

import os

# Compiling dominates most tests' time, and every test checks behaviour, none its speed:
# XLA:CPU compiles at backend (LLVM) optimisation level 0 (about a quarter faster) and
# with its classic fusion emitters (the MLIR fusion emitters take about 2.5 times as long
# to compile these small programs). A flag already in XLA_FLAGS is kept as it is; a
# subprocess that sets its own XLA_FLAGS adds COMPILE_FLAGS.
COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_flags, "--xla_force_host_platform_device_count=8"] + [
    f for f in COMPILE_FLAGS.split() if f.split("=")[0] not in _flags]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A data dir holding the stdlib dataset, built once for the whole test session."""
    from routezoo.configs import base
    from routezoo.training import data

    path = str(tmp_path_factory.mktemp("tfds"))
    c = base.get_config()
    c.data.data_dir = path
    data.ensure_dataset(c.data)
    return path


def tiny_config(data_dir: str, **overrides):
    """A small dense LM config that trains a step in well under a second on CPU."""
    from routezoo.configs import base

    c = base.get_config()
    c.data.data_dir = data_dir
    c.data.seq_len = 32
    m = c.model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 2, 32, 2, 1, 16, 64
    m.moe.expert_dim = 32
    c.train.steps, c.train.batch_size, c.train.eval_every, c.train.eval_steps = 8, 16, 4, 2
    c.train.log_every, c.train.progress = 1, False
    c.checkpoint.every = 4
    c.optimizer.warmup_steps = 2
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def per_layer_config(data_dir: str, **overrides):
    """:func:`tiny_config` with the layers unscanned (``model.scan_layers=False``): the
    layout adapters address (``layer0/attn/q``), which adapter runs also switch to."""
    return tiny_config(data_dir, **{"model.scan_layers": False, **overrides})


def random_adapter(method, params, seed: int = 1, scale: float = 0.3, **sources):
    """Adapter parameters of ``method``'s shapes (for base ``params``, boxed) with random,
    non-zero numpy values; no device computation (eager JAX ops each compile once: slow
    on CPU)."""
    import jax
    import numpy as np
    from flax import linen as nn

    rng = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(lambda: method.init(jax.random.PRNGKey(0), params, **sources)))
    return jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32), shapes)


def assert_cli_usage_error(tmp_path, capsys, flags, needle: str) -> None:
    """``routezoo train`` with ``flags`` exits 2 with one stderr line containing ``needle``
    and creates no workdir."""
    import sys

    from routezoo.training import cli

    wd = tmp_path / "wd"
    with pytest.raises(SystemExit) as e:
        sys.exit(cli.main(["train", "--workdir", str(wd), *flags]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not wd.exists()


def packed_ids(lengths, length: int):
    """``(segment_ids, positions)`` int32 numpy ``[B, length]`` of packed rows: row ``b``
    holds documents of ``lengths[b]`` tokens in order (ids 1, 2, ...; positions restarting
    at 0), then padding (id 0, position 0)."""
    import numpy as np
    seg = np.zeros((len(lengths), length), np.int32)
    pos = np.zeros((len(lengths), length), np.int32)
    for b, row in enumerate(lengths):
        start = 0
        for s, n in enumerate(row, 1):
            seg[b, start:start + n], pos[b, start:start + n] = s, np.arange(n)
            start += n
    return seg, pos


def packed_documents(lengths):
    """``(row, start, n)`` of every document of :func:`packed_ids`' rows."""
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            yield b, start, n
            start += n
