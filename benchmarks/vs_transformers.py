"""Training tokens/s: routezoo against Hugging Face transformers' Mixtral of the same shape.

    python benchmarks/vs_transformers.py [--config moe_1b] [--out FILE]

The PyTorch side: ``MixtralForCausalLM`` built from the same config through
``routezoo.zoo.hf.hf_config_from_model`` (so both have the same parameters), bf16
weights, SDPA attention, fused AdamW, load-balancing loss on, one optimizer step per
batch of random tokens; every experts backend transformers offers (``eager``,
``batched_mm``, ``grouped_mm``) is timed and the fastest is the reference. The routezoo
side is ``benchmarks/train_step.py``'s step with dropless dispatch (bf16 compute, fp32
master weights). Median of ``--iters`` steps after 3 warm-up steps; ratio = routezoo
tokens/s over the fastest transformers tokens/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def torch_side(model_cfg, batch: int, seq: int, iters: int, out_path: str) -> list[dict]:
    import torch
    import transformers

    from routezoo.zoo import hf

    hf_cfg = hf.hf_config_from_model(model_cfg, "MixtralForCausalLM")
    rows = []
    for impl in ("grouped_mm", "batched_mm", "eager"):
        try:
            cfg = transformers.MixtralConfig(**{k: v for k, v in hf_cfg.items() if k not in ("architectures",)})
            cfg.output_router_logits = True
            cfg.router_aux_loss_coef = 0.01
            try:
                model = transformers.MixtralForCausalLM._from_config(
                    cfg, attn_implementation="sdpa", experts_implementation=impl, dtype=torch.bfloat16)
            except TypeError:   # versions that take it only through the setter
                model = transformers.MixtralForCausalLM._from_config(
                    cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
                model.set_experts_implementation(impl)
            model = model.cuda()
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            tokens = torch.randint(2, cfg.vocab_size, (batch, seq), device="cuda")

            def step():
                out = model(input_ids=tokens, labels=tokens)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return out.loss

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            ts = []
            for _ in range(iters):
                t0 = time.perf_counter(); step(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
            t = statistics.median(ts)
            rows.append({"side": "transformers", "experts_implementation": impl, "step_s": t,
                         "tokens_per_second": batch * seq / t,
                         "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
                         "versions": f"torch {torch.__version__}, transformers {transformers.__version__}"})
            del model, opt
            torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        except Exception as e:  # noqa: BLE001 - report and go on
            rows.append({"side": "transformers", "experts_implementation": impl,
                         "error": " ".join(str(e).split())[:300]})
        print(json.dumps(rows[-1]), flush=True)
        json.dump(rows, open(out_path, "w"), indent=1)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="moe_1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="vs_transformers.json")
    p.add_argument("--skip-jax", action="store_true")
    a = p.parse_args()
    import importlib
    config = importlib.import_module(f"routezoo.configs.{a.config}").get_config()
    config.train.batch_size = a.batch
    seq = config.data.seq_len
    rows = torch_side(config.model, a.batch, seq, a.iters, a.out)
    if not a.skip_jax:
        import os
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
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
    print(f"\nbatch {a.batch} x seq {seq}, config {a.config}")
    for r in rows:
        if "error" in r:
            print(f"{r['side']:13} {r['experts_implementation']:20} ERROR {r['error'][:100]}")
        else:
            ratio = f"{r['tokens_per_second'] / best_t['tokens_per_second']:.2f}x" if best_t else "-"
            print(f"{r['side']:13} {r['experts_implementation']:20} {r['tokens_per_second']:10.0f} tok/s "
                  f"{r['peak_gib']:6.1f} GiB  {ratio} vs fastest transformers")


if __name__ == "__main__":
    main()
