"""``routezoo compile``: the real train step compiled ahead of time for a TPU topology on
the CPU (libtpu describes the topology; no TPU is needed), and the shipped configs.

The compile tests are skipped only where libtpu cannot be imported (the ``test`` extra
installs it). One module-scoped compile of the default model serves the report checks.

Shipped configs: every config in ``routezoo.configs`` is validated here. A config whose
module says ``SIZE = "pod"`` is too large to initialise or train on one machine: it is
only validated against its ``TOPOLOGY``'s chip count and sized from abstract shapes
(``jax.eval_shape``, nothing allocated); no test initialises or trains it.
"""

import contextlib
import importlib
import io
import json
import math
import re

import jax
import pytest

from routezoo.training import cli
from routezoo.training import compile as fit

needs_libtpu = pytest.mark.skipif(
    fit.libtpu_version() is None,
    reason="libtpu cannot be imported (pip install 'routezoo[tpu]'): no TPU compiler to compile with")

TOPOLOGY = "v5e:2x2"   # 4 chips of 16 GiB
# The default model with FSDP over the 4 chips (weights gathered, gradients reduced).
MESH_FLAGS = ["--config.mesh.data=1", "--config.mesh.fsdp=4"]
# 6·N_active·tokens leaves out attention (4·layers·H·K·L per token, 3x in training) and
# the router; at this small width they add ~13%, so the counted FLOPs (matmuls and the
# megablox kernels' declared FLOPs) lie within [0.9, 1.5] x 6·N·tokens.
FLOPS_FACTOR = (0.9, 1.5)


def _run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def default_fit(tmp_path_factory):
    """``routezoo compile`` of the default model with the megablox kernels: (exit code,
    stdout, the JSON report)."""
    path = tmp_path_factory.mktemp("fit") / "report.json"
    code, out, err = _run_cli(["compile", "--topology", TOPOLOGY, "--config.model.moe.gmm_backend=megablox",
                               *MESH_FLAGS, f"--json={path}"])
    assert code == 0, err
    return code, out, json.loads(path.read_text())


@needs_libtpu
def test_default_model_fits_v5e_with_memory_below_hbm(default_fit):
    _, out, r = default_fit
    assert r["fits"] and r["device_kind"] == "TPU v5 lite" and r["num_chips"] == 4
    assert r["mesh"] == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
    assert r["hbm"] == 16 * 2 ** 30
    for key in ("arguments", "outputs", "temporaries", "generated_code", "total"):
        assert 0 < r[key] < r["hbm"], (key, r[key])
    assert r["total"] == r["arguments"] + r["outputs"] - r["aliased"] + r["temporaries"] + r["generated_code"]
    assert r["aliased"] > 0   # the donated state is reused for the new one
    assert "per-chip memory" in out and "total (peak)" in out and out.strip().splitlines()[-1].startswith("fits:")


@needs_libtpu
def test_megablox_kernels_are_compiled_for_the_tpu_not_interpreted(default_fit):
    r = default_fit[2]
    assert "moe.gmm_backend=megablox" not in r["tpu_settings"]   # asked for on the command line
    assert "model.dtype=bfloat16" in r["tpu_settings"]
    # forward gmm x3, backward gmm x3 and tgmm x3 per scanned block (at least one block)
    assert r["mosaic_kernels"] >= 9


@needs_libtpu
def test_flops_are_positive_and_close_to_6_n_tokens(default_fit):
    r = default_fit[2]
    assert r["flops_per_chip"] > 0 and r["flops_total"] == pytest.approx(4 * r["flops_per_chip"])
    assert r["tokens_per_step"] == 16 * 128
    assert r["flops_analytic"] == pytest.approx(6 * r["params_active"] * r["tokens_per_step"])
    counted = r["flops_matmul"] + r["flops_kernels"]
    lo, hi = FLOPS_FACTOR
    assert lo * r["flops_analytic"] <= counted <= hi * r["flops_analytic"], r
    assert r["flops_kernels"] > 0   # the experts' matmuls are in the megablox kernels
    # routezoo's own estimate counts the same matmuls, attention included
    assert counted == pytest.approx(r["flops_routezoo"], rel=0.05)


@needs_libtpu
def test_collectives_match_the_fsdp_mesh(default_fit):
    c = default_fit[2]["collectives"]
    assert c["all-gather"] > 0                                # FSDP gathers the weights
    assert c["all-reduce"] + c["reduce-scatter"] > 0          # and reduces the gradients
    assert c["all-to-all"] + c["ragged-all-to-all"] == 0      # no expert parallelism: no token exchange


@needs_libtpu
def test_expert_parallel_mesh_exchanges_tokens_with_ragged_all_to_all():
    from routezoo.configs import default
    config = default.get_config()
    config.mesh.data, config.mesh.expert = 1, 4   # 2 of the 8 experts per chip
    r = fit.fit_check(config, TOPOLOGY)
    assert r.fits and "moe.ep_exchange=ragged" in r.tpu_settings and "moe.gmm_backend=megablox" in r.tpu_settings
    assert r.collectives["ragged-all-to-all"] > 0 and r.mosaic_kernels > 0


@needs_libtpu
def test_program_that_cannot_fit_exits_1_with_one_line():
    code, out, err = _run_cli(["compile", "--topology", TOPOLOGY, "--config.train.batch_size=8192",
                               "--config.data.seq_len=2048"])
    assert code == 1 and not out
    assert len(err.strip().splitlines()) == 1 and "does not fit" in err and TOPOLOGY in err, err


@needs_libtpu
@pytest.mark.parametrize("topology, needle", [("bogus:2x2", "unknown TPU topology 'bogus:2x2'"),
                                              ("v5e", "is not a TPU topology name")])
def test_unknown_topology_exits_2_with_one_line(topology, needle):
    code, out, err = _run_cli(["compile", "--topology", topology])
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and needle in err and "v5p:4x4x8" in err, err


@needs_libtpu
def test_mesh_that_does_not_divide_the_chips_exits_2_with_one_line():
    code, _, err = _run_cli(["compile", "--topology", TOPOLOGY, "--config.mesh.data=-1", "--config.mesh.expert=3"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "4 devices" in err, err


def test_missing_libtpu_exits_2_with_the_install_hint(monkeypatch):
    monkeypatch.setattr(fit, "libtpu_version", lambda: None)
    code, _, err = _run_cli(["compile", "--topology", TOPOLOGY])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "libtpu is not installed" in err and "pip install 'routezoo[tpu]'" in err, err


def test_missing_topology_flag_exits_2():
    code, _, err = _run_cli(["compile"])
    assert code == 2 and "--topology is required" in err


def test_collectives_are_counted_from_hlo_text():
    hlo = """
  %all-gather-start.1 = (bf16[4]) all-gather-start(bf16[2] %p), dimensions={0}
  %all-gather-done.1 = bf16[4] all-gather-done(%all-gather-start.1)
  %ar = f32[] all-reduce(f32[] %x), to_apply=%add
  %r = bf16[8] ragged-all-to-all(%a, %b, %c, %d, %e, %f)
  %t = bf16[8] all-to-all(%a), dimensions={0}
  %cp = bf16[8] collective-permute-start(%a), source_target_pairs={{0,1}}
"""
    assert fit.count_collectives(hlo) == {"all-gather": 1, "reduce-scatter": 0, "all-reduce": 1, "all-to-all": 1,
                                          "ragged-all-to-all": 1, "collective-permute": 1}


# --------------------------------------------------------------------------- shipped configs

# What a pod config's docstring claims, checked against its abstract parameters: total and
# active parameters in billions (Mixtral-8x7B and Qwen3-30B-A3B as published; the
# DeepSeek-V3-like config at its reduced depth).
POD_SIZES = {"mixtral_8x7b": (46.7, 12.9), "qwen3_30b_a3b": (30.5, 3.3), "deepseek_v3_pod": (348.9, 21.3)}


def _topology_chips(name: str) -> int:
    return math.prod(int(d) for d in re.split(r"[=_:]", name, maxsplit=1)[1].split("x"))


@pytest.mark.parametrize("name", cli.shipped_configs())
def test_every_shipped_config_validates(name):
    """Every shipped config passes the config check; a pod config (``SIZE = "pod"``) on its
    ``TOPOLOGY``'s chips, with its ``routezoo compile`` command in its docstring."""
    from routezoo.training import config_check
    module = importlib.import_module(f"routezoo.configs.{name}")
    config = module.get_config()
    if getattr(module, "SIZE", "") == "pod":
        topology = module.TOPOLOGY
        chips = _topology_chips(topology)
        config_check.validate(config, num_devices=chips, process_count=max(chips // 4, 1))
        assert f"routezoo compile --config {name} --topology {topology}" in module.__doc__
    else:
        config_check.validate(config, num_devices=8, process_count=1)


@pytest.mark.parametrize("name", sorted(POD_SIZES))
def test_pod_configs_have_their_published_size(name):
    """Sized from abstract shapes only: a pod config is never initialised here."""
    from routezoo import zoo
    from routezoo.training.state import init_variables
    module = importlib.import_module(f"routezoo.configs.{name}")
    config = module.get_config()
    shapes = jax.eval_shape(init_variables(zoo.build(config.model), config), jax.random.PRNGKey(0))["params"]
    total, active = zoo.count_params(shapes, config.model, config.data.seq_len)
    want_total, want_active = POD_SIZES[name]
    assert total / 1e9 == pytest.approx(want_total, rel=0.01) and active / 1e9 == pytest.approx(want_active, rel=0.02)
