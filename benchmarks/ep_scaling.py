"""Expert-parallel weak scaling of the MoE block on the GPUs of one host.

    python benchmarks/ep_scaling.py [--shape mixtral] [--tokens_per_gpu 16384] [--exchange padded,ragged]
                                    [--link_gbps 450] [--out FILE]

For ``n = 1, 2, 4, ...`` up to the number of devices: a mesh ``expert = n`` over the first
``n`` devices, the experts sharded ``n`` ways (``E/n`` per GPU), ``tokens_per_gpu`` tokens
on every GPU (``n · tokens_per_gpu`` in all: weak scaling), the routezoo MoE block
(dropless, the platform's grouped-matmul backend, inside ``shard_map``) forward +
backward, median of ``--iters`` calls after warm-up. For ``n > 1`` one row per
``--exchange`` (``moe.ep_exchange``, see ``layers/py``): ``padded``
(``all_to_all`` of ``[n, T·k, D]`` blocks) and ``ragged`` (``ragged_all_to_all`` of the
real rows only); ``ragged_emulated`` (the ragged offsets over an emulated exchange) runs
anywhere, e.g. ``--shape tiny`` on CPU, where XLA has no ``ragged-all-to-all`` (a
``ragged`` row there reports that and goes on). Efficiency = ``t(1) / t(n)`` (the same
work per GPU, so 100% means the exchange is free).

The all-to-all alone, per exchange, reported as the bytes each GPU sends to the others
per call over the time, against ``--link_gbps`` (per-direction NVLink bandwidth of one
GPU: 450 GB/s for H100/H200 NVLink 4, 900 GB/s both ways):

* ``padded``: the padded buffer ``[n, T·k, D]`` that the block sends, exchanged with
  ``jax.lax.all_to_all``; ``(n-1)/n`` of it leaves the GPU, and only ``1/n`` of that is
  token copies (the useful bytes; both are printed);
* ``ragged``: the ``T·k`` real rows ``[T·k, D]``, ``T·k/n`` to each GPU (balanced
  routing), exchanged with ``jax.lax.ragged_all_to_all`` into a ``[T·k, D]`` buffer
  (the block's receive buffer is ``n`` times larger, its worst case, but only the real
  rows travel); ``(n-1)/n`` of the rows leave the GPU, all of them useful.

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import functools
import os
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from timing import bench

SHAPES = {
    # name: (E, k, D, F)
    "mixtral": (8, 2, 4096, 14336),
    "deepseek": (64, 6, 2048, 1408),
    "tiny": (8, 2, 64, 128),          # CPU smoke test
}


def block_case(n: int, shape: str, tokens_per_gpu: int, iters: int, dtype, exchange: str) -> dict:
    from routezoo.configs import base
    from routezoo.layers import sharding
    from routezoo.layers.moe import moe_from_config

    e, k, d, f = SHAPES[shape]
    cfg = base.get_config().model.moe
    cfg.num_experts, cfg.k, cfg.expert_dim = e, k, f
    cfg.dispatch, cfg.jitter, cfg.ep_exchange = "dropless", 0.0, exchange
    model = moe_from_config(cfg, d_model=d, dtype=dtype, param_dtype=dtype)
    seq = min(2048, tokens_per_gpu)
    mesh = sharding.make_mesh({"data": 1, "expert": n}, devices=jax.devices()[:n])
    rules = sharding.DEFAULT_RULES
    x = jax.random.normal(jax.random.key(2), (n * tokens_per_gpu // seq, seq, d), dtype)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), x, deterministic=True))
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
        variables = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), x, deterministic=True)),
                            out_shardings=shardings)()
        x = jax.device_put(x, sharding.logical_sharding(mesh, ("batch", "length", "act_embed"), rules))

        def loss(v, x):
            y, aux = model.apply(v, x, deterministic=True)
            return jnp.sum(y.astype(jnp.float32)) + sum(aux["losses"].values())

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        compiled = step.lower(variables, x).compile()
        t = bench(compiled, variables, x, iters=iters)
    hlo = compiled.as_text()
    mem = compiled.memory_analysis()
    ragged = hlo.count("ragged-all-to-all")
    return {"n": n, "exchange": exchange if n > 1 else "-", "ms": t * 1e3,
            "all_to_all_in_hlo": hlo.count("all-to-all") - ragged, "ragged_all_to_all_in_hlo": ragged,
            "temp_gib": getattr(mem, "temp_size_in_bytes", 0) / 2 ** 30, "tokens_total": n * tokens_per_gpu}


def all_to_all_case(n: int, shape: str, tokens_per_gpu: int, iters: int, dtype, exchange: str) -> dict:
    from routezoo.layers.moe.exchange import ragged_exchange, ragged_exchange_emulated

    e, k, d, f = SHAPES[shape]
    m = tokens_per_gpu * k
    itemsize = jnp.dtype(dtype).itemsize
    mesh = jax.make_mesh((n,), ("expert",), devices=jax.devices()[:n])
    if exchange == "padded":
        buf = jax.device_put(jnp.ones((n * n, m, d), dtype), NamedSharding(mesh, P("expert")))

        @jax.jit
        @functools.partial(jax.shard_map, mesh=mesh, in_specs=P("expert"), out_specs=P("expert"))
        def run(b):                                       # b: [n, M, D] per GPU
            return jax.lax.all_to_all(b, "expert", 0, 0)

        sent = (n - 1) / n * n * m * d * itemsize         # bytes each GPU sends to others
        useful = sent / n
    else:
        fn = ragged_exchange if exchange == "ragged" else ragged_exchange_emulated
        buf = jax.device_put(jnp.ones((n * m, d), dtype), NamedSharding(mesh, P("expert")))
        chunk = m // n                                    # balanced: T·k/n rows to every GPU

        @jax.jit
        @functools.partial(jax.shard_map, mesh=mesh, in_specs=P("expert"), out_specs=P("expert"))
        def run(rows):                                    # rows: [M, D] per GPU
            me = jax.lax.axis_index("expert")
            sizes = jnp.full((n,), chunk, jnp.int32)
            input_offsets = jnp.arange(n, dtype=jnp.int32) * chunk
            output_offsets = jnp.full((n,), me * chunk, jnp.int32)   # after the earlier senders' rows
            return fn(rows, jnp.zeros_like(rows), input_offsets, sizes, output_offsets, sizes, "expert")

        sent = (n - 1) / n * n * chunk * d * itemsize
        useful = sent
    t = bench(run, buf, iters=iters)
    return {"a2a_ms": t * 1e3, "a2a_gbps": sent / t / 1e9, "a2a_useful_gbps": useful / t / 1e9}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="mixtral", choices=sorted(SHAPES))
    p.add_argument("--tokens_per_gpu", type=int, default=16384)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--link_gbps", type=float, default=450.0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--exchange", default="padded,ragged",
                   help="comma-separated moe.ep_exchange values: padded, ragged, ragged_emulated")
    p.add_argument("--out", default="ep_scaling.json")
    p.add_argument("--a2a_only", action="store_true",
                   help="time the exchange alone (no MoE block), e.g. to compare XLA_FLAGS settings")
    a = p.parse_args()
    exchanges = [x for x in a.exchange.split(",") if x]
    unknown = sorted(set(exchanges) - {"padded", "ragged", "ragged_emulated"})
    if unknown or not exchanges:
        p.error(f"--exchange {a.exchange!r}: allowed values are padded, ragged, ragged_emulated")
    dtype = jnp.dtype(a.dtype)
    sizes = [n for n in (1, 2, 4, 8, 16) if n <= jax.device_count() and SHAPES[a.shape][0] % n == 0]
    rows = []
    for n in sizes:
        if a.a2a_only and n == 1:
            continue
        for exchange in (exchanges if n > 1 else exchanges[:1]):
            try:
                if exchange == "ragged" and n > 1 and jax.default_backend() == "cpu":
                    raise RuntimeError("XLA:CPU has no ragged-all-to-all; use --exchange ragged_emulated on CPU")
                r = ({"n": n, "exchange": exchange} if a.a2a_only
                     else block_case(n, a.shape, a.tokens_per_gpu, a.iters, dtype, exchange))
                if n > 1:
                    r.update(all_to_all_case(n, a.shape, a.tokens_per_gpu, a.iters, dtype, exchange))
            except Exception as err:  # noqa: BLE001 - report and go on
                r = {"n": n, "exchange": exchange if n > 1 else "-", "error": " ".join(str(err).split())[:300]}
            rows.append(r)
            print(json.dumps(r), flush=True)
    base_ms = rows[0].get("ms") if rows else None
    for r in rows:
        if "ms" in r and base_ms:
            r["efficiency"] = base_ms / r["ms"]
    info = {"device": jax.devices()[0].device_kind, "devices": jax.device_count(), "jax": jax.__version__,
            "shape": a.shape, "tokens_per_gpu": a.tokens_per_gpu, "link_gbps": a.link_gbps,
            "exchanges": exchanges, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    json.dump({"info": info, "rows": rows}, open(a.out, "w"), indent=1)
    e, k, d, f = SHAPES[a.shape]
    print(f"\n{info['device']} x{info['devices']}, jax {info['jax']}; shape {a.shape} (E={e}, k={k}, D={d}, F={f}), "
          f"{a.tokens_per_gpu} tokens per GPU, dropless, forward + backward")
    print(f"{'GPUs':>4} {'exchange':>15} {'ms':>8} {'efficiency':>10} {'temp GiB':>8} {'a2a ms':>8} "
          f"{'a2a GB/s':>9} {'% link':>7} {'useful GB/s':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['n']:4d} {r['exchange']:>15} ERROR {r['error'][:120]}")
            continue
        a2a = (f"{r['a2a_ms']:8.2f} {r['a2a_gbps']:9.1f} {100 * r['a2a_gbps'] / a.link_gbps:6.1f}% "
               f"{r['a2a_useful_gbps']:11.1f}") if "a2a_ms" in r else f"{'-':>8} {'-':>9} {'-':>7} {'-':>11}"
        if "ms" not in r:   # --a2a_only
            print(f"{r['n']:4d} {r['exchange']:>15} {'-':>8} {'-':>10} {'-':>8} {a2a}")
            continue
        print(f"{r['n']:4d} {r['exchange']:>15} {r['ms']:8.2f} {100 * r['efficiency']:9.1f}% "
              f"{r['temp_gib']:8.2f} {a2a}")


if __name__ == "__main__":
    main()
