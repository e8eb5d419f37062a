"""Will it fit? The real train step compiled ahead of time for a TPU topology.

    routezoo compile [--config FILE|NAME] --topology v5p:4x4x8 [--config.a.b=value ...]

:func:`fit_check` builds what the training loop builds (:mod:`routezoo.training.loop`):
the model, the optimizer, the train state's abstract tree and shardings
(:func:`~routezoo.training.adapter_run.make_run`), the batch sharding and the jitted
:func:`~routezoo.training.step.make_train_step` with the loop's in/out shardings and its
donated state. The mesh is the config's (``mesh.data|fsdp|expert|tensor``, -1 for the
rest) laid over the devices of a TPU topology that libtpu describes without any TPU
attached (``jax.experimental.topologies.get_topology_desc``), in the device order
``jax.make_mesh`` picks on a real slice. Every input is a ``jax.ShapeDtypeStruct`` with
its sharding, so no parameter is ever allocated: a model of hundreds of billions of
parameters compiles on a laptop. XLA's TPU compiler then gives, per chip, the memory of
the program (:meth:`jax.stages.Compiled.memory_analysis`), its FLOPs
(``cost_analysis``) and, in the compiled HLO, the collectives the partitioner inserted.
XLA's cost analysis counts a loop body once (scanned layers: one layer), so the report
also counts the traced step's matmuls and Pallas kernels with every loop by its trip
count (:func:`matmul_flops`).

Settings that a run decides from the machine it runs on (``auto``) are decided for a
TPU, as they would be on the slice: ``model.dtype`` bfloat16, ``moe.gmm_backend``
megablox (the Mosaic TPU kernels, lowered for real, not interpreted), ``moe.ep_exchange``
ragged. The tokenizer is not built: the objectives get the byte tokenizer's special ids,
which changes no shape.

Exit codes of the command: 0 fits, 1 does not fit (one line), 2 a usage or config
problem, an unknown topology, no libtpu, a chip of unknown HBM without ``--hbm_gib`` or a
program the TPU compiler refuses for another reason than its size (one line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import sys
import time
from typing import Any

GIB = 1024 ** 3
INSTALL_HINT = "pip install 'routezoo[tpu]'"

# HBM of one chip (GiB) and TensorCores per chip, by jax's device_kind. A device of a
# topology is a chip on megacore generations (v4 as compiled here, v5p: num_cores 2) and
# one TensorCore on v2/v3, so a device's HBM is chip HBM * num_cores / cores per chip.
# Sources: Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/
# system-architecture-tpu-vm, and v4, v5e, v5p, v6e): v2 16 GiB (8 per core),
# v3 32 GiB (16 per core), v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e (Trillium) 32 GiB.
# The runtime keeps a little of it for itself, so a program close to 100% is borderline.
HBM_BY_KIND: dict[str, tuple[float, int]] = {
    "TPU v2": (16.0, 2),
    "TPU v3": (32.0, 2),
    "TPU v4": (32.0, 2),
    "TPU v5 lite": (16.0, 1),   # v5e
    "TPU v5": (95.0, 2),        # v5p
    "TPU v6 lite": (32.0, 1),   # v6e
}
# Generations whose compile-only topology must be asked for in megacore mode to match a
# real slice (jax on a v4 VM shows one device per chip; libtpu's default here is one per core).
MEGACORE_GENERATIONS = ("v4",)
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all",
               "collective-permute")
TOPOLOGY_EXAMPLES = "v4:2x2x1, v5e:2x2, v5e:16x16, v5p:4x4x8, v6e:4x4"


class FitError(ValueError):
    """A usage or config problem (the command's exit code 2); the message is one line."""


def _one_line(text: str, limit: int = 400) -> str:
    return " ".join(str(text).split())[:limit]


# --------------------------------------------------------------------------- topology

def libtpu_version() -> str | None:
    """The installed libtpu's version, or ``None`` when it is not installed."""
    if importlib.util.find_spec("libtpu") is None:
        return None
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _on_tpu_vm() -> bool:
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


@contextlib.contextmanager
def _quiet_libtpu_init():
    """Off a TPU VM, libtpu looks for the TPU metadata of the machine when it loads, finds
    none and logs several lines to stderr; naming one host and a slice type beforehand
    silences that (the topology itself comes from its name: checked for v4, v5e, v5p and
    v6e). ``ALLOW_MULTIPLE_LIBTPU_LOAD`` lets several processes (test workers, a second
    compile) load libtpu at once; its lock file only guards real TPU chips. The variables
    are set while the plugin loads and restored afterwards."""
    if _on_tpu_vm():
        yield
        return
    want = {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_ACCELERATOR_TYPE": "v5litepod-4",
            "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    saved = {k: os.environ.get(k) for k in want}
    for k, v in want.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tpu_devices(topology: str) -> list[Any]:
    """The compile-only devices of a TPU topology such as ``v5p:4x4x8``.

    Raises:
      FitError: libtpu is not installed or does not load, or ``topology`` is not a
        topology name libtpu knows (one line each).
    """
    if libtpu_version() is None:
        raise FitError(f"libtpu is not installed: compiling for a TPU topology needs it; install it with "
                       f"{INSTALL_HINT}")
    if not re.fullmatch(r"[A-Za-z0-9_ ]+[=_:][0-9x]+(_twisted|_untwisted)?", topology or ""):
        raise FitError(f"--topology {topology!r} is not a TPU topology name; allowed: GENERATION:SHAPE, "
                       f"e.g. {TOPOLOGY_EXAMPLES}")
    from jax.experimental import topologies
    generation = re.split(r"[=_:]", topology, maxsplit=1)[0].lower()
    kwargs = {"chip_config_name": "megacore"} if generation in MEGACORE_GENERATIONS else {}
    try:
        with _quiet_libtpu_init():
            return list(topologies.get_topology_desc(topology, "tpu", **kwargs).devices)
    except Exception as e:  # noqa: BLE001 - libtpu raises JaxRuntimeError with a status text
        msg = _one_line(e, 300)
        if "Invalid TPU external name" in msg or "does not match regex" in msg or "not divisible" in msg \
                or "chip config" in msg:
            raise FitError(f"unknown TPU topology {topology!r} ({msg}); allowed: GENERATION:SHAPE names libtpu "
                           f"knows, e.g. {TOPOLOGY_EXAMPLES}") from None
        raise FitError(f"libtpu {libtpu_version()} could not describe topology {topology!r}: {msg}; "
                       f"reinstall it with {INSTALL_HINT}") from None


def device_hbm_bytes(device: Any) -> tuple[int | None, str]:
    """``(bytes, source)``: the device's own ``memory_stats()['bytes_limit']`` where the
    topology exposes it, else :data:`HBM_BY_KIND`; ``(None, why)`` for an unknown kind."""
    try:
        stats = device.memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"]), "the device's memory_stats"
    except Exception:  # noqa: BLE001 - compile-only devices have no memory stats
        pass
    kind = str(getattr(device, "device_kind", ""))
    if kind not in HBM_BY_KIND:
        return None, f"no HBM size known for device kind {kind!r}"
    chip_gib, cores_per_chip = HBM_BY_KIND[kind]
    cores = int(getattr(device, "num_cores", cores_per_chip) or cores_per_chip)
    return int(chip_gib * GIB * min(cores, cores_per_chip) / cores_per_chip), f"table, {kind}"


# --------------------------------------------------------------------------- the report

@dataclasses.dataclass
class FitReport:
    """What :func:`fit_check` measured. Memory is per chip (one device of the topology),
    in bytes, from XLA's memory analysis of the compiled SPMD program."""

    config_name: str
    topology: str
    device_kind: str
    num_chips: int
    num_hosts: int
    mesh: dict[str, int]
    tpu_settings: list[str]
    params_total: int
    params_active: int
    tokens_per_step: int
    batch: str
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    generated_code: int
    hbm: int | None
    hbm_source: str
    flops_per_chip: float
    flops_analytic: float          # 6 * active parameters * tokens per step, all chips
    flops_routezoo: float          # zoo.flops_per_token (train) * tokens, all chips
    flops_matmul: float            # dot_general FLOPs of the traced step, loops by trip count, all chips
    flops_kernels: float           # Pallas kernels' declared FLOPs, the same way (module docstring)
    collectives: dict[str, int]
    mosaic_kernels: int            # Pallas kernels compiled for the TPU (tpu_custom_call) in the HLO
    lower_seconds: float
    compile_seconds: float
    jax_version: str
    libtpu_version: str
    host: str
    compile_error: str = ""        # the TPU compiler refused the program (out of HBM)

    @property
    def total(self) -> int:
        """Bytes live at the peak: arguments and outputs (less the donated state the
        outputs reuse), the temporaries' peak and the program's code."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

    @property
    def fits(self) -> bool:
        return not self.compile_error and self.hbm is not None and self.total <= self.hbm

    @property
    def flops_total(self) -> float:
        return self.flops_per_chip * self.num_chips

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": self.total, "fits": self.fits, "flops_total": self.flops_total}

    def misfit_line(self) -> str:
        """The one line of a program that does not fit."""
        where = f"{self.config_name} on {self.topology} ({self.num_chips} x {self.device_kind}, mesh {_mesh_text(self.mesh)})"
        if self.compile_error:
            return f"does not fit: {where}: the TPU compiler ran out of memory: {self.compile_error}"
        if self.hbm is None:
            return f"cannot judge the fit: {where}: {self.hbm_source}; give --hbm_gib"
        return (f"does not fit: {where} needs {_gib(self.total)} GiB per chip, HBM {_gib(self.hbm)} GiB: "
                f"arguments {_gib(self.arguments)}, outputs {_gib(self.outputs)}, aliased -{_gib(self.aliased)}, "
                f"temporaries {_gib(self.temporaries)}, code {_gib(self.generated_code)} GiB")

    def table(self) -> str:
        """The report as text (the command's output)."""
        hbm = self.hbm or 0
        pct = (lambda b: f"{100.0 * b / hbm:5.1f}%") if hbm else (lambda b: "")
        rows = [("arguments (state + batch)", self.arguments), ("outputs (state + metrics)", self.outputs),
                ("aliased (donated state reused)", -self.aliased), ("temporaries (peak)", self.temporaries),
                ("generated code", self.generated_code)]
        lines = [
            f"{self.config_name} on {self.topology}: {self.num_chips} x {self.device_kind} "
            f"({self.num_hosts} host{'s' if self.num_hosts > 1 else ''}), mesh {_mesh_text(self.mesh)}",
            f"model: {_count(self.params_total)} parameters, {_count(self.params_active)} active per token; "
            f"batch {self.batch} = {self.tokens_per_step:,} tokens per step",
            f"decided for TPU: {', '.join(self.tpu_settings) or 'nothing (no auto settings)'}",
            f"compiled in {self.lower_seconds + self.compile_seconds:.1f} s (trace and lower "
            f"{self.lower_seconds:.1f} s, XLA {self.compile_seconds:.1f} s); jax {self.jax_version}, "
            f"libtpu {self.libtpu_version}; {self.host}",
            "",
            "per-chip memory (XLA memory analysis)      GiB    of HBM",
        ]
        lines += [f"  {name:<38}{_gib(b):>8}  {pct(b)}" for name, b in rows]
        lines.append(f"  {'total (peak)':<38}{_gib(self.total):>8}  {pct(self.total)}")
        lines.append(f"  {'HBM per chip (' + self.hbm_source + ')':<38}{_gib(hbm) if hbm else '?':>8}")
        counted = self.flops_matmul + self.flops_kernels
        ratio = counted / self.flops_analytic if self.flops_analytic else float("nan")
        lines += [
            "",
            f"FLOPs per step, XLA cost analysis: {self.flops_per_chip:.4g} per chip, {self.flops_total:.4g} in all "
            "(XLA counts a loop body once: scanned layers count as one layer)",
            f"FLOPs per step, counted in the traced step with loops by trip count: {counted:.4g} in all "
            f"({counted / self.num_chips:.4g} per chip) = matmuls {self.flops_matmul:.4g} + Pallas kernels "
            f"{self.flops_kernels:.4g} (declared; expert-parallel buffers at their worst-case size)",
            f"  against 6*N_active*tokens = {self.flops_analytic:.4g}: ratio {ratio:.2f} (a rematerialised forward "
            f"pass counts again); routezoo's estimate with attention {self.flops_routezoo:.4g}",
            "collectives in the compiled HLO (ops in the program text; those in a loop run once per iteration): "
            + ", ".join(f"{k} {v}" for k, v in self.collectives.items()),
            f"Pallas kernels compiled for the TPU (Mosaic custom calls in the HLO): {self.mosaic_kernels}",
        ]
        if self.fits:
            lines.append(f"fits: {_gib(self.total)} of {_gib(hbm)} GiB per chip ({100.0 * self.total / hbm:.1f}%)")
        return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def _mesh_text(mesh: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in mesh.items())


def count_collectives(hlo_text: str) -> dict[str, int]:
    """How many of each collective the HLO text holds: ``op(`` and its async ``op-start(``
    (``-done`` not counted again); ``ragged-all-to-all`` apart from ``all-to-all``."""
    out = {}
    for op in COLLECTIVES:
        out[op] = len(re.findall(rf"(?<![\w-]){re.escape(op)}(?:-start)?\(", hlo_text))
    return out


def _sub_jaxprs(value) -> list[Any]:
    from jax.extend import core as jex_core
    if isinstance(value, jex_core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jex_core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def matmul_flops(jaxpr) -> tuple[float, float]:
    """``(matmuls, kernels)``: FLOPs of a traced program, every loop counted by its trip count.

    ``matmuls``: ``dot_general`` (2 x output size x contracted size) and ``ragged_dot``.
    ``kernels``: the ``cost_estimate`` Pallas kernels declare; megablox declares
    2·rows·K·N over every row of its buffer, exact for a shard's own tokens, the worst
    case for an expert-parallel receive buffer (room for every shard's tokens: N times
    the rows it gets on average). A ``scan``'s body counts times its ``length``, a
    ``shard_map`` body (per-shard shapes) times its number of shards, a ``cond`` by its
    largest branch, a ``while`` body once (its trip count is not static). Elementwise work
    is not counted. Shapes are global: the FLOPs of the whole step over all chips.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    dots, kernels = 0.0, 0.0

    def add(pair, times=1.0):
        nonlocal dots, kernels
        dots, kernels = dots + times * pair[0], kernels + times * pair[1]

    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            (lhs_contract, _), _ = params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            dots += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
        elif name in ("ragged_dot", "ragged_dot_general"):
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            dots += 2.0 * math.prod(lhs) * rhs[-1]
        elif name == "pallas_call":
            kernels += float(getattr(params.get("cost_estimate"), "flops", 0) or 0)
        elif name == "scan":
            add(matmul_flops(params["jaxpr"]), int(params["length"]))
        elif name == "cond":
            add(max((matmul_flops(b) for b in params["branches"]), key=sum, default=(0.0, 0.0)))
        elif name == "while":
            add(matmul_flops(params["body_jaxpr"]))
        elif name == "shard_map":
            mesh = params["mesh"]
            axes = params.get("newly_manual_axes") or params.get("manual_axes") or mesh.axis_names
            add(matmul_flops(params["jaxpr"]), math.prod(int(dict(mesh.shape)[a]) for a in axes))
        else:
            for v in params.values():
                for j in _sub_jaxprs(v):
                    add(matmul_flops(j))
    return dots, kernels


# --------------------------------------------------------------------------- the fit check

def tpu_settings(config) -> list[str]:
    """Decides the ``auto`` settings of ``config`` as a TPU run does (in place); returns
    the ``key=value`` choices made. A run decides them from ``jax.default_backend()``,
    which on the compiling machine is its CPU."""
    made = []
    m = config.model
    if m.dtype == "auto":
        m.dtype = "bfloat16"
        made.append("model.dtype=bfloat16")
    if "moe" in m:
        if m.moe.gmm_backend == "auto":
            m.moe.gmm_backend = "megablox"
            made.append("moe.gmm_backend=megablox")
        if m.moe.get("ep_exchange", "auto") == "auto":
            m.moe.ep_exchange = "ragged"
            made.append("moe.ep_exchange=ragged")
    a = config.adapter
    if a.method and a.get("multi_lora_gmm_backend", "") == "auto":
        a.multi_lora_gmm_backend = "megablox"
        made.append("adapter.multi_lora_gmm_backend=megablox")
    return made


def abstract_batch(config, sharding) -> dict[str, Any]:
    """The shapes of one global training batch as the data pipeline makes it
    (:class:`~routezoo.training.data.MakeBatch`), each with ``sharding``."""
    import jax
    import jax.numpy as jnp
    b, length = int(config.train.batch_size), int(config.data.seq_len)
    keys = [("inputs", jnp.int32), ("targets", jnp.int32), ("weights", jnp.float32)]
    if config.data.packing == "masked":
        keys += [("segment_ids", jnp.int32), ("positions", jnp.int32)]
    out = {k: jax.ShapeDtypeStruct((b, length), dt, sharding=sharding) for k, dt in keys}
    if str(config.data.get("tasks", "")).strip():
        out["task_id"] = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharding)
    return out


def _host_line() -> str:
    cpus = os.cpu_count() or 0
    mem = ""
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    return f"compiled on {platform.machine()} {platform.system()}, {cpus} CPU cores{mem}"


def _is_out_of_hbm(msg: str) -> bool:
    """The TPU compiler's refusal of a program larger than the chip's HBM (a kernel over
    its scoped VMEM is another problem: it is raised as it is)."""
    return ("RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg) and "vmem" not in msg.lower()


def fit_check(config, topology: str, *, hbm_gib: float | None = None, config_name: str = "",
              hlo_path: str | None = None) -> FitReport:
    """Compiles ``config``'s train step for ``topology`` and measures it.

    Args:
      config: a run config (not changed; the ``auto`` settings of a copy are decided for
        a TPU, :func:`tpu_settings`).
      topology: a TPU topology name, e.g. ``'v5p:4x4x8'``.
      hbm_gib: HBM per chip in GiB to judge the fit against, in place of what the
        device reports or :data:`HBM_BY_KIND`.
      config_name: the name the report gives the config.
      hlo_path: where to write the compiled program's HLO text, or ``None``.

    Returns:
      The :class:`FitReport`; a program the TPU compiler refuses for lack of memory is a
      report with ``compile_error`` set.

    Raises:
      FitError: libtpu missing, an unknown topology, a config or mesh that does not
        suit the topology (one line).
    """
    import jax
    import ml_collections
    from flax import linen as nn
    from jax.sharding import NamedSharding, PartitionSpec

    from routezoo import zoo
    from routezoo.layers import adapters as adapter_lib
    from routezoo.layers import sharding as shd
    from routezoo.training import config_check
    from routezoo.training.adapter_run import adapter_config, make_run, optimizer_for
    from routezoo.training.loop import describe_model, jit_train_step
    from routezoo.training.step import init_guard

    devices = tpu_devices(topology)
    config = ml_collections.ConfigDict(config.to_dict())
    settings = tpu_settings(config)
    num_hosts = len({getattr(d, "process_index", 0) for d in devices})
    try:
        config_check.validate(config, num_devices=len(devices), process_count=num_hosts)
    except config_check.ConfigError as e:
        raise FitError(f"{e} (on {topology}: {len(devices)} chips, {num_hosts} host{'s' if num_hosts > 1 else ''})") from None
    sizes = shd.resolve_mesh_shape({a: config.mesh[a] for a in shd.MESH_AXES}, len(devices))
    # As make_mesh does for jax.devices() on a slice: jax.make_mesh picks a device order
    # that follows the torus.
    try:
        mesh = jax.make_mesh(sizes, shd.MESH_AXES, devices=devices,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(shd.MESH_AXES))
    except (NotImplementedError, ValueError) as e:   # as it would fail on the slice itself
        shape = re.split(r"[=_:]", topology, maxsplit=1)[-1]
        raise FitError(f"mesh {_mesh_text(dict(zip(shd.MESH_AXES, sizes)))} cannot be laid over the {shape} "
                       f"torus of {topology}: jax.make_mesh needs every axis size to be a product of some "
                       f"of the physical axis sizes ({_one_line(e, 160)})") from None
    rules = shd.rules_from_config(json.loads(config.mesh.rules) if config.mesh.rules else None)

    model = zoo.build(config.model)
    adapter = adapter_lib.from_config(adapter_config(config))
    tx, schedule = optimizer_for(config, adapter)
    batch_sharding = NamedSharding(mesh, shd.batch_spec(1))
    batch = abstract_batch(config, batch_sharding)
    t0 = time.perf_counter()
    # The state's shapes and shardings are traced outside the mesh context: its eager
    # helpers (the init's dummy tokens) cannot run on compile-only devices.
    with nn.logical_axis_rules(rules):
        run = make_run(model, tx, config, mesh, rules, adapter)
    extra = (run.setup.base_abstract,) if adapter is not None else ()
    info = describe_model(run.boxed_params, config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        replicated = NamedSharding(mesh, PartitionSpec())
        train_step = jit_train_step(model, tx, config, schedule, run, None, batch_sharding, replicated)
        guard = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                             jax.eval_shape(init_guard))
        traced = train_step.trace(run.abstract, guard, batch, *extra)
        lowered = traced.lower()
    t1 = time.perf_counter()
    step_matmul_flops, step_kernel_flops = matmul_flops(traced.jaxpr)
    compile_error = ""
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA raises JaxRuntimeError with a status text
        msg = _one_line(e, 600)
        if not _is_out_of_hbm(msg):
            raise FitError(f"the TPU compiler refused the program: {msg}") from None
        compiled, compile_error = None, msg
    t2 = time.perf_counter()

    mem = compiled.memory_analysis() if compiled is not None else None
    cost = compiled.cost_analysis() if compiled is not None else None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    hlo = compiled.as_text() if compiled is not None else ""
    if hlo_path and hlo:
        with open(hlo_path, "w") as f:
            f.write(hlo)
    if hbm_gib:
        hbm, hbm_source = int(hbm_gib * GIB), "--hbm_gib"
    else:
        hbm, hbm_source = device_hbm_bytes(devices[0])
    tokens = int(config.train.batch_size) * int(config.data.seq_len)
    return FitReport(
        config_name=config_name or str(config.model.name), topology=topology,
        device_kind=str(devices[0].device_kind), num_chips=len(devices), num_hosts=num_hosts,
        mesh=dict(zip(shd.MESH_AXES, map(int, sizes))), tpu_settings=settings,
        params_total=int(info["params_total"]), params_active=int(info["params_active"]),
        tokens_per_step=tokens, batch=f"{config.train.batch_size} x {config.data.seq_len}"
        + (f" in {config.train.grad_accum} micro-batches" if int(config.train.grad_accum) > 1 else ""),
        arguments=int(getattr(mem, "argument_size_in_bytes", 0)), outputs=int(getattr(mem, "output_size_in_bytes", 0)),
        aliased=int(getattr(mem, "alias_size_in_bytes", 0)), temporaries=int(getattr(mem, "temp_size_in_bytes", 0)),
        generated_code=int(getattr(mem, "generated_code_size_in_bytes", 0)),
        hbm=hbm, hbm_source=hbm_source,
        flops_per_chip=float((cost or {}).get("flops", 0.0)),
        flops_analytic=6.0 * info["params_active"] * tokens,
        flops_routezoo=float(info["flops_per_token_train"]) * tokens,
        flops_matmul=step_matmul_flops, flops_kernels=step_kernel_flops,
        collectives=count_collectives(hlo), mosaic_kernels=hlo.count('custom_call_target="tpu_custom_call"'),
        lower_seconds=t1 - t0, compile_seconds=t2 - t1,
        jax_version=jax.__version__, libtpu_version=str(libtpu_version()), host=_host_line(),
        compile_error=compile_error)


# --------------------------------------------------------------------------- the command

USAGE = """usage: routezoo compile [--config FILE|NAME] --topology GEN:SHAPE [--config.a.b=value ...]

  Compiles the train step of a config for a TPU topology on this machine (no TPU needed;
  needs libtpu: pip install 'routezoo[tpu]') and prints the per-chip memory against the
  chip's HBM, the FLOPs per step and the collectives. Exit code 0 fits, 1 does not fit,
  2 a usage or config problem.

  --config: config file (get_config()) or name of a shipped config; default: default
  --topology: a TPU topology, e.g. v4:2x2x1, v5e:2x2, v5p:4x4x8, v6e:16x16
  --config.KEY=VALUE: override any key of the config, e.g. --config.train.batch_size=64
  --hbm_gib=G: judge the fit against G GiB per chip instead of the chip's own HBM
  --json=FILE: also write the report as JSON to FILE
  --hlo=FILE: also write the compiled program (HLO text) to FILE
"""


def parse_flags(argv: list[str]):
    """``(config, config_name, topology, hbm_gib, json_path, hlo_path)``; SystemExit(2) on a problem."""
    from absl import flags

    from routezoo.training import cli

    def define(fv):
        flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x8", flag_values=fv)
        flags.DEFINE_float("hbm_gib", None, "HBM per chip in GiB to judge the fit against", flag_values=fv)
        flags.DEFINE_string("json", None, "write the report as JSON here", flag_values=fv)
        flags.DEFINE_string("hlo", None, "write the compiled HLO text here", flag_values=fv)

    argv = cli._resolve_config_arg(argv)
    config, fv = cli.parse_config_flags("routezoo compile", argv, define)
    if not fv.topology:
        raise SystemExit(cli._fail(f"--topology is required; allowed: a TPU topology such as {TOPOLOGY_EXAMPLES}"))
    if fv.hbm_gib is not None and fv.hbm_gib <= 0:
        raise SystemExit(cli._fail(f"--hbm_gib must be positive, got {fv.hbm_gib}"))
    path = next((a.split("=", 1)[1] if a.startswith("--config=") else argv[i + 1]
                 for i, a in enumerate(argv) if a.startswith("--config=") or (a == "--config" and i + 1 < len(argv))),
                "default")
    name = os.path.splitext(os.path.basename(path.split(":")[0]))[0]
    return config, name, fv.topology, fv.hbm_gib, fv.json, fv.hlo


def main(argv: list[str]) -> int:
    """``routezoo compile``: 0 fits, 1 does not fit, 2 a usage or config problem."""
    from routezoo.training import cli

    if any(a in ("-h", "--help", "-help") for a in argv):
        print(USAGE)
        return 0
    try:
        config, name, topology, hbm_gib, json_path, hlo_path = parse_flags(argv)
    except SystemExit as e:   # usage problems: one line already printed
        return int(e.code or 0)
    if config.init.from_hf:
        from routezoo.zoo import hf
        try:
            hf.update_config_from_hf(config)
        except (ValueError, FileNotFoundError) as e:
            return cli._fail(_one_line(e))
    try:
        report = fit_check(config, topology, hbm_gib=hbm_gib, config_name=name, hlo_path=hlo_path)
    except (FitError, ValueError) as e:
        return cli._fail(_one_line(e, 600))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    if report.hbm is None and not report.compile_error:   # an unknown chip: say how much HBM to judge by
        return cli._fail(report.misfit_line())
    if not report.fits:
        print(f"routezoo: {report.misfit_line()}", file=sys.stderr)
        return 1
    print(report.table())
    return 0


__all__ = ["FitError", "FitReport", "HBM_BY_KIND", "abstract_batch", "count_collectives", "device_hbm_bytes",
           "fit_check", "libtpu_version", "main", "tpu_devices", "tpu_settings"]
