"""Decode latency of a mixed-adapter batch vs the number of distinct adapters in it (S-LoRA / Punica style batching).

One decode step (one token per example, ``--batch`` examples) through ``--layers`` adapted
``D x D`` projections, ``x <- x W_l + s_a (x A_{l,a}) B_{l,a}``, with a library of
``--library`` LoRA adapters stacked as ``routezoo.layers.adapters.multi_lora`` stores them (slot 0 the
zero adapter). The batch uses ``K`` distinct adapters (example ``b`` gets adapter
``1 + b mod K``) for K in ``--distinct``. Compared:

* ``base``: the base projections only (no adapter), the floor;
* ``gather``: BGMV, :func:`routezoo.layers.adapters.multi_lora.delta_gather` (what ``auto`` runs at decode);
* ``sorted``: SGMV, :func:`routezoo.layers.adapters.multi_lora.delta_sorted` with the grouped matmul
  ``--gmm-backend`` (``auto``: blocked on CPU, the Pallas kernel on GPU, ragged_dot on TPU);
* ``loop``: the naive mixed batch as huggingface/peft's ``_mixed_batch_forward`` does it, a
  loop over the distinct adapters, each on its sub-batch, scattered back
  (:func:`routezoo.layers.adapters.multi_lora.per_adapter_loop`; recompiled per id set, timed after).

``gather`` and ``sorted`` take the ids as an argument (one compile for every K). Timing:
median (or, ``--stat min``, minimum) of ``--iters`` calls after 3 warm-ups, blocked
until ready; both are written to the JSON.

    python benchmarks/multi_lora.py [--d-model 512 --rank 16 --layers 4 --library 64 --batch 64]
        [--dtype float32|bfloat16] [--stat median|min] [--device-note "2-core CPU"]
        [--out benchmarks/results/multi_lora_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from routezoo.layers.moe.gmm import GMM_BACKEND_NAMES
from timing import call_times
from routezoo.layers.adapters.multi_lora import delta_gather, delta_sorted, per_adapter_loop


def timings(fn, *args, iters: int) -> dict[str, float]:
    """Median and minimum milliseconds of ``fn(*args)``; the minimum is the steadier
    number on a shared machine."""
    times = call_times(fn, *args, iters=iters)
    return {"median": 1e3 * statistics.median(times), "min": 1e3 * min(times)}


def make_weights(args, rng):
    d, r, n, L = args.d_model, args.rank, args.library + 1, args.layers
    dt = jnp.dtype(args.dtype)
    w = [(rng.standard_normal((d, d)) / np.sqrt(d)).astype(dt) for _ in range(L)]
    a = [(rng.standard_normal((n, d, r)) / np.sqrt(d)).astype(dt) for _ in range(L)]
    b = [(0.1 * rng.standard_normal((n, r, d)) / np.sqrt(r)).astype(dt) for _ in range(L)]
    for x in a + b:
        x[0] = 0                                   # slot 0: the zero adapter
    return [jnp.asarray(x) for x in w], [jnp.asarray(x) for x in a], [jnp.asarray(x) for x in b]


def step_fn(impl: str, backend: str):
    def step(x, ws, as_, bs, ids):
        for w, a, b in zip(ws, as_, bs):
            y = jnp.einsum("BSI,IO->BSO", x, w)
            if impl == "gather":
                y = y + delta_gather(x, a, b, ids).astype(y.dtype)
            elif impl == "sorted":
                y = y + delta_sorted(x, a, b, ids, backend).astype(y.dtype)
            x = y
        return x
    return jax.jit(step)


def loop_fn(ids: np.ndarray):
    def step(x, ws, as_, bs):
        for w, a, b in zip(ws, as_, bs):
            x = jnp.einsum("BSI,IO->BSO", x, w) + per_adapter_loop(x, a, b, ids).astype(x.dtype)
        return x
    return jax.jit(step)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--library", type=int, default=64, help="adapters stacked (ids 1..library)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=1, help="tokens per example (1 = decode)")
    p.add_argument("--distinct", default="1,4,16,64", help="distinct adapters in the batch")
    p.add_argument("--impls", default="base,gather,sorted,loop")
    p.add_argument("--gmm-backend", default="auto", choices=GMM_BACKEND_NAMES)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--stat", default="median", choices=["median", "min"], help="the statistic printed "
                   "(both are written to the JSON); min on a shared machine")
    p.add_argument("--device-note", default="", help="free text stored with the results (hardware, load)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "multi_lora_cpu.json"))
    args = p.parse_args()
    distinct = [int(k) for k in args.distinct.split(",")]
    impls = args.impls.split(",")
    if max(distinct) > args.library:
        p.error(f"--distinct {max(distinct)} > --library {args.library}")

    t_start = time.perf_counter()
    ws, as_, bs = make_weights(args, np.random.default_rng(0))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((args.batch, args.tokens, args.d_model)),
                    jnp.dtype(args.dtype))
    fns = {impl: step_fn(impl, args.gmm_backend) for impl in ("base", "gather", "sorted") if impl in impls}
    rows = []
    for k in distinct:
        ids = (1 + np.arange(args.batch) % k).astype(np.int32)
        row = {"distinct": k}
        for impl in impls:
            if impl == "loop":
                row[impl] = timings(loop_fn(ids), x, ws, as_, bs, iters=args.iters)
            else:
                row[impl] = timings(fns[impl], x, ws, as_, bs, jnp.asarray(ids), iters=args.iters)
        rows.append(row)
    if "gather" in impls and "sorted" in impls:    # the two paths agree on the last batch
        ids = jnp.asarray((1 + np.arange(args.batch) % distinct[-1]).astype(np.int32))
        diff = float(jnp.abs(fns["gather"](x, ws, as_, bs, ids).astype(jnp.float32)
                             - fns["sorted"](x, ws, as_, bs, ids).astype(jnp.float32)).max())
    else:
        diff = None

    backend = args.gmm_backend
    if backend == "auto":
        backend = {"cpu": "blocked", "gpu": "pallas"}.get(jax.default_backend(), "ragged_dot")
    print(f"decode step, ms ({args.stat} of {args.iters}): batch {args.batch} x {args.tokens} token, "
          f"{args.layers} layers D={args.d_model}, rank {args.rank}, library {args.library}, {args.dtype}, "
          f"sorted gmm={backend}; {jax.devices()[0].device_kind} {args.device_note}")
    print("| distinct adapters | " + " | ".join(impls) + " |")
    print("|---:|" + "---:|" * len(impls))
    for row in rows:
        print(f"| {row['distinct']} | " + " | ".join(f"{row[i][args.stat]:.3f}" for i in impls) + " |")
    if diff is not None:
        print(f"max |gather - sorted| = {diff:.2e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "gmm_backend": backend, "device": jax.devices()[0].device_kind,
                   "platform": jax.default_backend(), "device_note": args.device_note, "unit": "ms",
                   "rows": rows, "max_abs_gather_minus_sorted": diff,
                   "wall_s": time.perf_counter() - t_start}, f, indent=2)
    print(f"wrote {args.out} ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
