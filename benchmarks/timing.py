"""Shared timing for the benchmark scripts: median wall time after warm-up, and the dense
bf16 matmul rate measured in the same process (the ceiling ratios are taken against).

The ceiling is read on both sides of the card when PyTorch is importable: XLA's own GEMM
(:func:`dense_ceiling`) and cuBLAS through ``torch.matmul`` (:func:`torch_dense_ceiling`),
both queued (many calls back to back, one wait at the end) so neither side counts the
host's dispatch latency. :func:`ceilings` returns both and the rule the scripts divide by:
**the ceiling is the higher of the two** (XLA's GEMM can read below cuBLAS on the same
card; a ceiling taken from the slower side would flatter every ratio). PyTorch is
imported only inside the ``torch_*`` functions, so the scripts run without it (JAX side
only).
"""

from __future__ import annotations

import re
import statistics
import time

import jax
import jax.numpy as jnp

CEILING_N = 8192     # the square matmul's side
CEILING_QUEUE = 20   # matmuls per timed sample (8192^3 at ~700 TFLOP/s: ~1.6 ms each)


def call_times(fn, *args, iters: int, warmup: int = 3, queue: int = 1) -> list[float]:
    """Seconds per call of ``fn(*args)``, ``iters`` samples after ``warmup`` calls.

    ``queue=1``: each sample is one call, blocked until ready (includes the host's
    dispatch and synchronisation latency, about 0.1 ms per call on the GPU machines
    here). ``queue=n``: each sample is ``n`` calls issued back to back and one block on
    the last (one device stream runs them in order), divided by ``n``: the host latency
    overlaps the device work, which is what a training loop sees. Use it for sub-ms
    kernels.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(queue):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / queue)
    return times


def bench(fn, *args, iters: int, warmup: int = 3, queue: int = 1) -> float:
    """Median seconds per call of ``fn(*args)`` over ``iters`` samples (see
    :func:`call_times` for ``queue``)."""
    return statistics.median(call_times(fn, *args, iters=iters, warmup=warmup, queue=queue))


def dense_ceiling(iters: int = 10, n: int = CEILING_N, queue: int = 1) -> float:
    """TFLOP/s of a bf16 ``n x n x n`` matmul on random data through XLA (``queue``: see
    :func:`call_times`; :func:`ceilings` uses the queued form)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    return 2 * n ** 3 / bench(jax.jit(lambda a, b: a @ b), a, b, iters=iters, queue=queue) / 1e12


# ------------------------------------------------------------------ PyTorch side


def torch_device() -> str:
    """``'cuda'`` when PyTorch sees a GPU, else ``'cpu'`` (PyTorch must be importable)."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_call_times(fn, *, iters: int, warmup: int = 3, queue: int = 1) -> list[float]:
    """Seconds per call of ``fn()`` on PyTorch, ``iters`` samples after ``warmup`` calls.

    On a GPU each sample is ``queue`` calls issued back to back on the current stream
    between two CUDA events, read after one synchronisation (the events time the stream,
    so host time shows only where the host falls behind the device); on the CPU,
    ``time.perf_counter`` around the same loop.
    """
    import torch
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(queue):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / queue)
        else:
            t0 = time.perf_counter()
            for _ in range(queue):
                fn()
            times.append((time.perf_counter() - t0) / queue)
    return times


def torch_bench(fn, *, iters: int, warmup: int = 3, queue: int = 1) -> float:
    """Median seconds per call of ``fn()`` (see :func:`torch_call_times`)."""
    return statistics.median(torch_call_times(fn, iters=iters, warmup=warmup, queue=queue))


def torch_dense_ceiling(n: int = CEILING_N, iters: int = 10, queue: int = CEILING_QUEUE) -> float:
    """TFLOP/s of a bf16 ``n x n x n`` matmul on random data through ``torch.matmul``
    (cuBLAS on a GPU), ``queue`` calls per CUDA-event sample, median of ``iters``."""
    import torch
    dev = torch_device()
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=g)
    c = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
    t = torch_bench(lambda: torch.matmul(a, b, out=c), iters=iters, queue=queue)
    del a, b, c
    if dev == "cuda":
        torch.cuda.empty_cache()
    return 2 * n ** 3 / t / 1e12


def ceilings(n: int = CEILING_N, iters: int = 10, queue: int = CEILING_QUEUE,
             torch_tflops: float | None = None) -> dict:
    """The dense bf16 ``n^3`` matmul rate on both sides, in TFLOP/s:
    ``{'jax', 'torch', 'max', 'n', 'queue'}``. ``torch`` is ``torch_tflops``, the PyTorch
    side measured beforehand in a child process (:func:`torch_ceiling_in_child`), or ``None``
    when the run has no PyTorch side. ``max`` is the ceiling every ratio is taken against:
    the higher of the two. The JAX side runs here."""
    j = dense_ceiling(iters, n, queue)
    return {"jax": j, "torch": torch_tflops, "max": max(j, torch_tflops or 0.0), "n": n, "queue": queue}


def torch_ceiling_in_child(n: int = CEILING_N, iters: int = 10, queue: int = CEILING_QUEUE) -> float:
    """:func:`torch_dense_ceiling` in a process of its own (``peers.in_child``); call it
    before jax starts its GPU client, like every PyTorch measurement of a script."""
    import peers
    return float(peers.in_child("timing", "torch_dense_ceiling", n=n, iters=iters, queue=queue))


def format_ceilings(c: dict) -> str:
    """One line: both readings and which one the ratios use."""
    f = lambda v: f"{v:.0f}" if v >= 10 else f"{v:.3g}"
    head = f"dense bf16 {c['n']}^3 (queued x{c['queue']})"
    if c.get("torch") is None:
        return f"{head}: XLA {f(c['jax'])} TFLOP/s (no PyTorch side: the ceiling is XLA's)"
    return (f"{head}: XLA {f(c['jax'])}, cuBLAS (torch) {f(c['torch'])} TFLOP/s; "
            f"ceiling = the higher: {f(c['max'])}")


# kernel-name patterns -> category, first match wins (lower-case substrings)
# (attention first: cuDNN's Hopper kernels are named "...wgmma...", which holds "gmm")
KERNEL_CATEGORIES = (
    ("attention (cuDNN)", ("cudnn", "fmha", "flash", "sdpa")),
    ("grouped matmul (Pallas/Mosaic)", ("gmm", "tgmm", "ragged", "mosaic")),
    ("dense matmuls (cuBLAS, XLA GEMM fusions)", ("gemm", "xmma", "nvjet", "cutlass", "cublas", "matmul")),
    ("collectives (NCCL)", ("nccl", "all_reduce", "all-reduce", "all_to_all", "collective")),
    ("sort", ("sort", "radix", "cub::")),
    ("XLA fusions and copies", ("fusion", "loop_", "input_", "copy", "transpose", "reduce",
                                "convert", "broadcast", "dynamic", "scatter", "gather", "concatenate")),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    for category, keys in KERNEL_CATEGORIES:
        if any(k in low for k in keys):
            return category
    return "other"


def traced_kernel_times(run, calls: int, hlo_text: str | None = None) -> list[dict]:
    """Device time per kernel (ms per call, summed over its launches) while ``run()`` makes
    ``calls`` calls and waits for them, from a ``jax.profiler`` Perfetto trace: the complete
    events of the processes whose name mentions a GPU, busiest first. Empty where the trace
    has no GPU process (a CPU run). With the traced program's compiled ``hlo_text``
    (``jitted.lower(...).compile().as_text()``), each XLA kernel's row gets the JAX operation
    it runs as ``source`` (:func:`kernel_sources`); Pallas and library kernels, named by
    their own code, get none."""
    import glob
    import gzip
    import json
    import tempfile
    from collections import defaultdict

    logdir = tempfile.mkdtemp(prefix="rz_trace_")
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        run()
    files = glob.glob(f"{logdir}/**/*perfetto_trace.json.gz", recursive=True)
    if not files:
        return []
    with gzip.open(files[0]) as fh:
        events = json.load(fh)["traceEvents"]
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, n in names.items() if "gpu" in n.lower()}
    total, count = defaultdict(float), defaultdict(int)
    for e in events:
        if e.get("ph") == "X" and "dur" in e and e.get("pid") in gpu:
            total[e["name"]] += e["dur"] / 1e3 / calls
            count[e["name"]] += 1
    sources = kernel_sources(hlo_text) if hlo_text else {}
    rows = [{"kernel": k, "ms": v, "launches": count[k] // calls, "category": kernel_category(k)}
            for k, v in sorted(total.items(), key=lambda kv: -kv[1])]
    for r in rows:
        if r["kernel"] in sources:
            r["source"] = sources[r["kernel"]]
    return rows


def format_kernel_times(rows: list[dict], top: int = 15) -> str:
    """The per-category sums and the ``top`` kernels of :func:`traced_kernel_times`."""
    if not rows:
        return "  no device kernels in the trace (no GPU process)"
    from collections import defaultdict
    s = sum(r["ms"] for r in rows)
    by_cat = defaultdict(float)
    for r in rows:
        by_cat[r["category"]] += r["ms"]
    lines = [f"  device time per call, summed over kernels: {s:.3f} ms ({len(rows)} kernels)"]
    lines += [f"  {ms:8.3f} ms {100 * ms / s:5.1f}%  {cat}" for cat, ms in sorted(by_cat.items(), key=lambda kv: -kv[1])]
    lines.append("  busiest kernels:")
    for r in rows[:top]:
        lines.append(f"  {r['ms']:8.3f} ms {100 * r['ms'] / s:5.1f}%  x{r['launches']:<3} {r['kernel'][:90]}")
        if r.get("source"):
            lines.append(f"  {'':27}<- {r['source']}")
    return "\n".join(lines)


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?\bmetadata=\{[^}]*?op_name=\"([^\"]*)\"")
_WRAPPERS = re.compile(r"\b(?:jit|pjit|jvp|transpose|vmap|remat|checkpoint|closed_call|core_call|shard_map|"
                       r"custom_vjp_call|custom_jvp_call)\(([^()]*)\)")


def kernel_sources(hlo_text: str) -> dict[str, str]:
    """Kernel name -> the JAX operation it comes from, read from a compiled program's HLO
    text (``jitted.lower(...).compile().as_text()``): each instruction's ``op_name``
    metadata under its name with ``.`` and ``-`` as ``_``, the form XLA gives the GPU
    kernel it emits (``%loop_add_fusion.49`` runs as ``loop_add_fusion_49``). The op name is
    shortened to its module path and primitive (``jit(...)``/``jvp(...)`` wrappers dropped,
    a ``transpose(...)`` kept as a leading ``bwd:``)."""
    out: dict[str, str] = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, op = m.group(1), m.group(2)
        bwd = "transpose(" in op
        while True:   # innermost wrapper first, until none is left
            unwrapped = _WRAPPERS.sub(r"\1", op)
            if unwrapped == op:
                break
            op = unwrapped
        path = [p for p in op.split("/") if p]
        short = "/".join(path[-6:])
        out.setdefault(re.sub(r"[.\-]", "_", name), ("bwd: " if bwd else "") + short)
    return out

