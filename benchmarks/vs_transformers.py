"""Training tokens/s: routezoo against Hugging Face transformers' Mixtral of the same shape.

    python benchmarks/vs_transformers.py [--config moe_1b] [--batch 8] [--compile] [--out FILE]

The PyTorch side (``peers/hf_mixtral.py``): ``MixtralForCausalLM`` built from the same
config through ``routezoo.zoo.hf.hf_config_from_model`` (so both have the same
parameters), bf16 weights, SDPA attention, fused AdamW, load-balancing loss on, one
optimizer step per batch of random tokens; every experts backend of ``--experts``
(default ``grouped_mm,batched_mm,eager``; ``auto``: every one transformers registers) is
timed and the fastest is the reference. Eager by default; ``--compile`` puts the model
under ``torch.compile`` (``train_step.py --peers`` runs that comparison beside the MFU
table). The routezoo side is ``benchmarks/train_step.py``'s step with dropless dispatch
(bf16 compute, fp32 master weights). Median of ``--iters`` steps after 3 warm-up steps;
ratio = routezoo tokens/s over the fastest transformers tokens/s. PyTorch runs first and
releases its memory before JAX starts (``peers/__init__.py``).
"""

from __future__ import annotations

import argparse
import json
import os


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="moe_1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="vs_transformers.json")
    p.add_argument("--skip-jax", action="store_true")
    p.add_argument("--experts", default="grouped_mm,batched_mm,eager",
                   help="transformers experts backends, comma-separated, or 'auto' (all registered)")
    p.add_argument("--compile", action="store_true", help="the transformers model under torch.compile")
    a = p.parse_args()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # before jax starts its GPU client
    import importlib

    from peers import free_torch, hf_mixtral

    config = importlib.import_module(f"routezoo.configs.{a.config}").get_config()
    config.train.batch_size = a.batch
    seq = config.data.seq_len
    rows = hf_mixtral.train_rows(config.model, a.batch, seq, iters=a.iters, compile=a.compile,
                                 backends=hf_mixtral.parse_backends(a.experts, ()),
                                 log=lambda r: print(json.dumps(r), flush=True))
    free_torch()
    if not a.skip_jax:
        from train_step import run
        config.model.dtype = "bfloat16"
        name = f"dropless/{config.model.moe.gmm_backend}"
        try:
            r = run(config, a.iters)
            rows.append({"side": "routezoo", "experts_implementation": name,
                         **{k: r[k] for k in ("step_s", "tokens_per_second", "peak_gib", "params_total",
                                              "params_active")}})
        except Exception as e:  # noqa: BLE001 - keep the transformers rows
            rows.append({"side": "routezoo", "experts_implementation": name,
                         "error": " ".join(str(e).split())[:300]})
        print(json.dumps(rows[-1]), flush=True)
    json.dump(rows, open(a.out, "w"), indent=1)
    ok = [r for r in rows if "tokens_per_second" in r]
    best_t = max((r for r in ok if r["side"] == "transformers"), key=lambda r: r["tokens_per_second"], default=None)
    print(f"\nbatch {a.batch} x seq {seq}, config {a.config}, transformers "
          f"{'under torch.compile' if a.compile else 'eager'}")
    for r in rows:
        if "error" in r:
            print(f"{r['side']:13} {r['experts_implementation']:20} ERROR {r['error'][:100]}")
        else:
            ratio = f"{r['tokens_per_second'] / best_t['tokens_per_second']:.2f}x" if best_t else "-"
            peak = f"{r['peak_gib']:6.1f} GiB" if "peak_gib" in r else "     - GiB"
            print(f"{r['side']:13} {r['experts_implementation']:20} {r['tokens_per_second']:10.0f} tok/s "
                  f"{peak}  {ratio} vs fastest transformers")


if __name__ == "__main__":
    main()
