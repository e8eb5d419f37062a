"""Compile time, memory and step time against depth, with and without scanned layers and
under each rematerialisation policy, through routezoo's own ``train_step``.

    # CPU: compile time and XLA's memory figures only (nothing runs)
    python benchmarks/depth.py --config default --layers 12,24,48 --scan true,false \
        --remat none --mode compile --out depth_cpu.json
    # GPU: compile, then time the step and read the device's peak memory
    python benchmarks/depth.py --config moe_1b --layers 24 --scan true,false \
        --remat none,full,dots_saveable,save_moe_dispatch --mode run --out depth_gpu.json

Each variant runs in a fresh subprocess (``--one``), so compile caches and the device's
peak-memory counter start clean. Per variant it reports: the time to trace and lower the
jitted, donated train step, the XLA compile time, the compiled program's memory analysis
(arguments, outputs, temporaries; per device) and, with ``--mode run``, the median step
time over ``--iters`` steps after 2 warm-up steps and ``peak_bytes_in_use`` of device 0.
The model is the named config with ``model.num_layers`` replaced; ``--set KEY=VALUE``
overrides any other key (repeatable). Random tokens feed the step (no data pipeline).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time


def _set(config, key: str, value: str) -> None:
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    old = node[leaf]
    node[leaf] = type(old)(value.lower() in ("1", "true")) if isinstance(old, bool) else type(old)(value)


def one(spec: dict) -> dict:
    """One variant, in this process: build, lower, compile and (``run``) time the step."""
    import jax
    import numpy as np
    from flax import linen as nn
    from jax.sharding import NamedSharding

    from routezoo import zoo
    from routezoo.layers import sharding as shd
    from routezoo.training.optim import make_optimizer
    from routezoo.training.train import (create_state, describe_model, make_train_step, mesh_and_rules,
                                         state_shardings)
    from routezoo.zoo import stack

    config = importlib.import_module(f"routezoo.configs.{spec['config']}").get_config()
    for kv in spec.get("set", []):
        _set(config, *kv.split("=", 1))
    config.model.num_layers = spec["layers"]
    config.model.scan_layers = spec["scan"]
    config.model.remat = spec["remat"]
    mesh, rules = mesh_and_rules(config)
    model = zoo.build(config.model)
    tx, schedule = make_optimizer(config.optimizer, config.train.steps)
    b, l, v = config.train.batch_size, config.data.seq_len, config.model.vocab_size
    out = {**spec, "layout": stack.stack_layouts(config.model)[()].describe() if config.model.name == "decoder_lm"
           else str(stack.is_scanned(config.model))}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract, shardings, boxed = state_shardings(model, tx, config, mesh, rules)
        out.update(describe_model(boxed, config))
        batch_sharding = NamedSharding(mesh, shd.batch_spec(2))
        step = jax.jit(make_train_step(model, tx, config, schedule), in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, None), donate_argnums=0)
        tokens = np.random.default_rng(0).integers(2, v, size=(b, l + 1)).astype(np.int32)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((b, l), np.float32)}
        batch_abs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding), batch)
        t0 = time.perf_counter()
        lowered = step.lower(abstract, batch_abs)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        mem = compiled.memory_analysis()
        gib = 2 ** 30
        out.update(trace_lower_s=t1 - t0, compile_s=t2 - t1,
                   arg_gib=mem.argument_size_in_bytes / gib, out_gib=mem.output_size_in_bytes / gib,
                   alias_gib=mem.alias_size_in_bytes / gib, temp_gib=mem.temp_size_in_bytes / gib,
                   xla_total_gib=(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                                  + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes) / gib)
        if spec["mode"] == "run":
            state = create_state(model, tx, config, shardings)
            batch = jax.device_put(batch, batch_sharding)
            for _ in range(2):
                state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            ts = []
            for _ in range(spec["iters"]):
                t = time.perf_counter()
                state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics)
                ts.append(time.perf_counter() - t)
            stats = jax.devices()[0].memory_stats() or {}
            out.update(step_s=statistics.median(ts), tokens_per_second=b * l / statistics.median(ts),
                       loss=float(metrics["loss"]), peak_gib=stats.get("peak_bytes_in_use", 0) / gib)
    out.update(device=jax.devices()[0].device_kind, jax=jax.__version__, batch=b, seq_len=l)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="default")
    p.add_argument("--layers", default="12,24,48")
    p.add_argument("--scan", default="true,false")
    p.add_argument("--remat", default="none")
    p.add_argument("--mode", choices=("compile", "run"), default="compile")
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE config override (repeatable)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per variant")
    p.add_argument("--out", default="depth.json")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(json.loads(a.one))), flush=True)
        return
    rows = []
    for layers in [int(x) for x in a.layers.split(",")]:
        for scan in [s.strip().lower() == "true" for s in a.scan.split(",")]:
            for remat in a.remat.split(","):
                spec = {"config": a.config, "layers": layers, "scan": scan, "remat": remat, "mode": a.mode,
                        "iters": a.iters, "set": a.set}
                t0 = time.perf_counter()
                try:
                    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec)],
                                          capture_output=True, text=True, timeout=a.timeout)
                    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                    row = json.loads(lines[-1][7:]) if lines else {
                        **spec, "error": " ".join(proc.stderr.strip().splitlines()[-1:])[:300]}
                except subprocess.TimeoutExpired:
                    row = {**spec, "error": f"over {a.timeout:.0f} s"}
                row["process_s"] = time.perf_counter() - t0
                rows.append(row)
                print(json.dumps(row), flush=True)
                json.dump(rows, open(a.out, "w"), indent=1)
    print(f"\n{'layers':>6} {'scan':>5} {'remat':>22} {'trace+lower s':>13} {'compile s':>9} {'XLA temp GiB':>12} "
          f"{'XLA total GiB':>13} {'step ms':>8} {'peak GiB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['layers']:>6} {str(r['scan']):>5} {r['remat']:>22}  ERROR {r['error'][:90]}")
            continue
        step = f"{1e3 * r['step_s']:8.1f}" if "step_s" in r else f"{'-':>8}"
        peak = f"{r['peak_gib']:8.2f}" if "peak_gib" in r else f"{'-':>8}"
        print(f"{r['layers']:>6} {str(r['scan']):>5} {r['remat']:>22} {r['trace_lower_s']:13.1f} {r['compile_s']:9.1f} "
              f"{r['temp_gib']:12.3f} {r['xla_total_gib']:13.3f} {step} {peak}")


if __name__ == "__main__":
    main()
