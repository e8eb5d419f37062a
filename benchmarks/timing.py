"""Shared timing for the benchmark scripts: median wall time after warm-up, and the dense
bf16 matmul rate measured in the same process (the ceiling ratios are taken against)."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def call_times(fn, *args, iters: int, warmup: int = 3) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn(*args)`` (blocked until ready), after
    ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def bench(fn, *args, iters: int, warmup: int = 3) -> float:
    """Median seconds of ``fn(*args)`` over ``iters`` calls."""
    return statistics.median(call_times(fn, *args, iters=iters, warmup=warmup))


def dense_ceiling(iters: int = 10, n: int = 8192) -> float:
    """TFLOP/s of a bf16 ``n x n x n`` matmul on random data."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    return 2 * n ** 3 / bench(jax.jit(lambda a, b: a @ b), a, b, iters=iters) / 1e12
