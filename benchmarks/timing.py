"""Shared timing for the benchmark scripts: median wall time after warm-up, and the dense
bf16 matmul rate measured in the same process (the ceiling ratios are taken against)."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


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


def dense_ceiling(iters: int = 10, n: int = 8192, queue: int = 1) -> float:
    """TFLOP/s of a bf16 ``n x n x n`` matmul on random data."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    return 2 * n ** 3 / bench(jax.jit(lambda a, b: a @ b), a, b, iters=iters, queue=queue) / 1e12
