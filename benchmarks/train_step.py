"""Training-step throughput and MFU of a MoE LM through routezoo's one ``train_step``.

    python benchmarks/train_step.py [--config moe_1b] [--dispatch dropless:auto,capacity:1.25]
        [--packing eos,masked] [--doc_len 600] [--param_dtype float32,bfloat16] [--out FILE]

Builds the config's model, optimizer and sharded state exactly as ``routezoo train`` does
(``training.train.state_shardings``/``create_state``/``make_train_step``), feeds random
tokens (no data pipeline), and times the jitted, donated step: median of ``--iters``
after 3 warm-up steps. MFU counts the model's training FLOPs per token (6·N_active plus
attention, ``zoo.flops_per_token``) against two peaks: the dense bf16 matmul measured in
the same process, and the datasheet peak given by ``--peak`` (H100 SXM: 989 TFLOP/s).

``--profile N`` traces N more steps after the timed ones and prints where the device time
goes: per category (grouped matmuls, cuDNN attention, dense GEMMs, collectives, the sort, XLA
fusions) and per kernel (``timing.traced_kernel_times``), each XLA kernel with the JAX
operation it runs (``timing.kernel_sources``: the module path and primitive from the compiled
HLO's metadata, e.g. ``bwd: DecoderLM/layer3/moe/mul``).

``--packing``: ``eos`` feeds rows without document boundaries (attention over the whole
row, the cuDNN flash kernel without a mask); ``masked`` adds ``segment_ids`` and
``positions`` of documents with lengths drawn from a geometric distribution of mean
``--doc_len`` tokens (seeded), as ``data.packing='masked'`` produces, so the step pays for
the document mask (on GPU: the mask through cuDNN's fused attention as a bias).

The measured ceiling is the higher of a queued bf16 ``n^3`` matmul (``--ceiling_n``, 8192) through
XLA and through cuBLAS (PyTorch, in a child process) (``timing.ceilings``). ``--peers``
(default on when torch and a CUDA device are available) first times transformers'
``MixtralForCausalLM`` of the same shape and batch (``peers/hf_mixtral.py``: random bf16
weights, fused AdamW, load-balancing loss, the model under ``torch.compile``) with each
experts backend of ``--peer_experts`` (``auto``: every one transformers registers), and
reports each routezoo row's tokens/s over the fastest of them. The PyTorch side keeps bf16
weights and optimizer state; routezoo keeps float32 master weights and AdamW state (more
work); ``--param_dtype float32,bfloat16`` times routezoo both ways, the second in the peer's
precision recipe. Order: the cuBLAS ceiling and the transformers steps, each in a child process of its
own, then jax in this process (its ceiling, the routezoo steps), so each side has the whole
card (``peers/__init__.py``).

CPU smoke run (the default config's tiny model, PyTorch on the CPU)::

    python benchmarks/train_step.py --peers --config default --batch 2 --dispatch dropless:auto \\
        --iters 2 --ceiling_n 256 --out /tmp/train_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import peers

# decided before jax starts its GPU client; a module importing this one gets no peers
PEERS = peers.decide() if __name__ == "__main__" else {"on": False, "note": "peers off (imported)"}

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from timing import (CEILING_N, CEILING_QUEUE, ceilings, format_ceilings, format_kernel_times,  # noqa: E402
                    torch_ceiling_in_child, traced_kernel_times)


def load_config(name: str):
    import importlib
    return importlib.import_module(f"routezoo.configs.{name}").get_config()


def packed_documents(b: int, l: int, doc_len: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``segment_ids`` and ``positions`` int32 ``[b, l]`` of rows packed with documents of
    geometric lengths (mean ``doc_len``), cut at the row end as the packer does."""
    rng = np.random.default_rng(seed)
    seg, pos = np.zeros((b, l), np.int32), np.zeros((b, l), np.int32)
    for r in range(b):
        i, k = 0, 1
        while i < l:
            n = min(int(rng.geometric(1.0 / doc_len)), l - i)
            seg[r, i:i + n], pos[r, i:i + n] = k, np.arange(n)
            i, k = i + n, k + 1
    return seg, pos


def run(config, iters: int, packing: str = "eos", doc_len: float = 600.0, profile: int = 0) -> dict:
    from routezoo import zoo
    from routezoo.training.optim import make_optimizer
    from routezoo.training.train import (create_state, describe_model, make_train_step, mesh_and_rules,
                                         state_shardings)
    from jax.sharding import NamedSharding
    from routezoo.layers import sharding as shd

    mesh, rules = mesh_and_rules(config)
    model = zoo.build(config.model)
    tx, schedule = make_optimizer(config.optimizer, config.train.steps)
    b, l, v = config.train.batch_size, config.data.seq_len, config.model.vocab_size
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, shardings, boxed = state_shardings(model, tx, config, mesh, rules)
        info = describe_model(boxed, config)
        state = create_state(model, tx, config, shardings)
        batch_sharding = NamedSharding(mesh, shd.batch_spec(2))
        step = jax.jit(make_train_step(model, tx, config, schedule), in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, None), donate_argnums=0)
        tokens = np.random.default_rng(0).integers(2, v, size=(b, l + 1)).astype(np.int32)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((b, l), np.float32)}
        docs = 0.0
        if packing == "masked":
            batch["segment_ids"], batch["positions"] = packed_documents(b, l, doc_len)
            docs = float(batch["segment_ids"].max(axis=1).mean())
        batch = jax.device_put(batch, batch_sharding)
        for _ in range(3):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            ts.append(time.perf_counter() - t0)
        mem = jax.devices()[0].memory_stats() or {}
        kernels = None
        if profile:
            box = [state]

            def traced():
                for _ in range(profile):
                    box[0], m = step(box[0], batch)
                jax.block_until_ready(m)

            # the step's HLO names the JAX operation of each XLA kernel (one more compile, profiling only)
            kernels = traced_kernel_times(traced, profile, step.lower(box[0], batch).compile().as_text())
            print(format_kernel_times(kernels, 25), flush=True)
    t = statistics.median(ts)
    return {**info, "step_s": t, "tokens_per_second": b * l / t, "loss": float(metrics["loss"]),
            "peak_gib": mem.get("peak_bytes_in_use", 0) / 2 ** 30, "packing": packing, "docs_per_row": docs,
            **({"kernels": kernels[:40], "kernel_ms": sum(k["ms"] for k in kernels)} if kernels is not None else {})}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="moe_1b")
    p.add_argument("--dispatch", default="dropless:auto,capacity:1.25,capacity:1.0")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--peak", type=float, default=989.0)
    p.add_argument("--packing", default="eos")
    p.add_argument("--param_dtype", default="float32",
                   help="routezoo's parameters and AdamW state, comma-separated: float32 (the library's "
                        "default, master weights) and/or bfloat16 (as the transformers side keeps them)")
    p.add_argument("--doc_len", type=float, default=600.0)
    p.add_argument("--out", default="train_step.json")
    p.add_argument("--profile", type=int, default=0,
                   help="after timing, trace this many steps and print the device time by kernel category "
                        "and busiest kernel (stored under 'kernels' in each row)")
    p.add_argument("--ceiling_n", type=int, default=CEILING_N, help="side of the square ceiling matmul")
    p.add_argument("--ceiling_queue", type=int, default=CEILING_QUEUE, help="ceiling matmuls per timed sample")
    peers.add_flag(p)
    p.add_argument("--peer_experts", default="grouped_mm,eager",
                   help="transformers experts backends to time, comma-separated, or 'auto' (all registered)")
    p.add_argument("--peer_compile", action=argparse.BooleanOptionalAction, default=True,
                   help="the transformers model under torch.compile (--no-peer_compile: eager)")
    p.add_argument("--peer_batch", type=int, default=0, help="the transformers side's batch (0: the same)")
    a = p.parse_args()
    print(PEERS["note"], flush=True)
    base_cfg = load_config(a.config)
    batch = a.batch or base_cfg.train.batch_size
    # every PyTorch measurement first, each in a child process, then jax (peers/__init__.py)
    torch_ceil = torch_ceiling_in_child(a.ceiling_n, 10, a.ceiling_queue) if PEERS["on"] else None
    torch_rows = []
    if PEERS["on"]:
        from peers import hf_mixtral
        for impl in hf_mixtral.parse_backends(a.peer_experts, hf_mixtral.TRAIN_BACKENDS):
            torch_rows += peers.in_child(
                "peers.hf_mixtral", "train_rows", model_cfg=base_cfg.model, batch=a.peer_batch or batch,
                seq=int(base_cfg.data.seq_len), iters=a.iters, backends=[impl], compile=a.peer_compile)
    ceil = ceilings(a.ceiling_n, 10, a.ceiling_queue, torch_tflops=torch_ceil)
    ceiling = ceil["max"]
    print(format_ceilings(ceil), flush=True)
    best_t = max((r for r in torch_rows if "tokens_per_second" in r), key=lambda r: r["tokens_per_second"],
                 default=None)
    rows = []
    for variant, packing, pdt in [(v, k, d) for v in a.dispatch.split(",") for k in a.packing.split(",")
                                  for d in a.param_dtype.split(",")]:
        if pdt not in ("float32", "bfloat16"):
            raise SystemExit(f"--param_dtype {pdt!r}: allowed float32, bfloat16")
        dispatch, opt = variant.split(":")
        c = load_config(a.config)
        c.model.dtype = "bfloat16"
        c.model.param_dtype = pdt
        c.model.moe.dispatch = dispatch
        if dispatch == "capacity":
            c.model.moe.capacity_factor = float(opt)
        else:
            c.model.moe.gmm_backend = opt
        if a.batch:
            c.train.batch_size = a.batch
        try:
            r = run(c, a.iters, packing, a.doc_len, a.profile)
        except Exception as e:  # noqa: BLE001 - report and go on (e.g. out of memory)
            r = {"error": " ".join(str(e).split())[:300]}
        name = f"{variant}/{packing}" + ("/bf16 params" if pdt == "bfloat16" else "")
        r.update(variant=name, param_dtype=pdt, config=a.config, batch=c.train.batch_size, seq_len=c.data.seq_len)
        if "tokens_per_second" in r:
            achieved = r["flops_per_token_train"] * r["tokens_per_second"] / 1e12
            r.update(tflops=achieved, mfu_datasheet=achieved / a.peak, mfu_measured=achieved / ceiling)
            if best_t:
                r["vs_transformers"] = r["tokens_per_second"] / best_t["tokens_per_second"]
        rows.append(r)
        print(json.dumps(r), flush=True)
    # the transformers rows' MFU, with routezoo's FLOP count of the same shape
    fpt = next((r["flops_per_token_train"] for r in rows if "flops_per_token_train" in r), None)
    for t in torch_rows:
        if fpt and "tokens_per_second" in t:
            achieved = fpt * t["tokens_per_second"] / 1e12
            t.update(tflops=achieved, mfu_datasheet=achieved / a.peak, mfu_measured=achieved / ceiling)
    info = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "ceiling_tflops": ceiling,
            "ceilings": ceil, "peak_tflops": a.peak, "peers": PEERS["note"]}
    if PEERS["on"]:
        info["torch_versions"] = peers.versions()
    json.dump({"info": info, "rows": rows, "torch_rows": torch_rows}, open(a.out, "w"), indent=1)
    print(f"\n{info['device']}, jax {info['jax']}; {format_ceilings(ceil)}; datasheet {a.peak:.0f}")
    if PEERS["on"]:
        print(f"transformers peer: {info['torch_versions']}")
    print(f"{'variant':28} {'params':>8} {'active':>8} {'tok/s':>9} {'TFLOP/s':>8} {'MFU(sheet)':>10} {'MFU(meas)':>9} "
          f"{'peak GiB':>8} {'vs transformers':>15}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:28} ERROR {r['error'][:100]}")
            continue
        ratio = f"{r['vs_transformers']:14.2f}x" if "vs_transformers" in r else f"{'-':>15}"
        print(f"{r['variant']:28} {r['params_total'] / 1e9:7.2f}B {r['params_active'] / 1e9:7.2f}B "
              f"{r['tokens_per_second']:9.0f} {r['tflops']:8.1f} {100 * r['mfu_datasheet']:9.1f}% "
              f"{100 * r['mfu_measured']:8.1f}% {r['peak_gib']:8.1f} {ratio}")
    for t in torch_rows:
        name = f"transformers {t['experts_implementation']}" + ("" if t.get("compiled") else " eager")
        if "error" in t:
            print(f"{name:28} ERROR {t['error'][:100]}")
            continue
        tflops = f"{t['tflops']:8.1f} {100 * t['mfu_datasheet']:9.1f}% {100 * t['mfu_measured']:8.1f}%" \
            if "tflops" in t else f"{'-':>8} {'-':>10} {'-':>9}"
        peak = f"{t['peak_gib']:8.1f}" if "peak_gib" in t else f"{'-':>8}"
        print(f"{name:28} {'':8} {'':8} {t['tokens_per_second']:9.0f} {tflops} {peak} "
              f"{'(batch ' + str(t['batch']) + ')':>15}")


if __name__ == "__main__":
    main()
