"""Expert merging (MC-SMoE) against averaging and pruning, and AdaMoE's null experts, on a
trained MoE, through ``routezoo transform``.

    # tiny (CPU, a few minutes): trains the source MoE (8 experts, top-2) first
    python benchmarks/transforms/merge_experts.py --workdir /tmp/merge_bench
    # one GPU: trains the router leaderboard's medium MoE (8 layers, d_model 512) as the source;
    # --resume keeps the rows a run that was cut off finished
    python benchmarks/transforms/merge_experts.py --workdir /tmp/merge_small --size small --resume
    # a trained run of your own (e.g. a leaderboard-size MoE on one GPU)
    python benchmarks/transforms/merge_experts.py --workdir /tmp/merge_bench --source runs/moe --finetune_steps 300

What runs (every transform writes its workdir under ``--workdir``; the source is only read):

1. **Source**: ``--source`` or, without it, an MoE LM of ``--size`` (8 experts, top-2; tiny:
   2 layers, d_model 64; small: 8 layers, d_model 512) trained by ``routezoo train`` on the
   default dataset (``--train_steps``).
2. **Merge** ``E -> N`` for each ``N`` of ``--keep`` (default 4 and 2) by ``mc_smoe``
   (aligned, usage-weighted), ``average`` (same groups, plain mean) and ``prune`` (the ``N``
   most used experts kept): the same number of stored experts per layer. Each is evaluated
   as merged and after ``--finetune_steps`` steps of the training loop (all parameters,
   learning rate ``--lr``, the same batches for every model).
3. **Null experts** (AdaMoE): ``add_null_experts`` for each setting of ``--null`` (``Z:k:lb``:
   ``Z`` null experts, top-``k`` over real and null, load-balance coefficient ``lb``),
   fine-tuned the same way; reported with the real experts per token.
4. **Control**: the source fine-tuned the same number of steps (what the merged and null
   models are compared with after fine-tuning).

Reported per model: evaluation loss (nats per token) and bits per byte as transformed and
after the fine-tune, the experts stored per MoE layer and the real experts run per token
(on the calibration batches). The table is Markdown; ``results.json`` under ``--workdir``
holds every number and each transform's report.

:func:`run` takes a workdir (a string: every default) or this script's arguments (a list of
strings or an ``argparse.Namespace``) and returns ``{'rows': [...], 'table': str}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

# the source MoE trained here when --source is not given, per --size
SOURCES = {
    # a 2-core CPU: d_model 64, 2 MoE layers of 8 experts of width 128, top-2
    "tiny": {
        "model.ffn": "moe", "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4,
        "model.num_kv_heads": 2, "model.head_dim": 16, "model.moe.num_experts": 8, "model.moe.k": 2,
        "model.moe.expert_dim": 128, "data.seq_len": 64, "train.batch_size": 16, "train.eval_steps": 4,
        "optimizer.warmup_steps": 30, "train.progress": False, "train.log_every": 50,
    },
    # one GPU: the router leaderboard's medium MoE (8 layers, d_model 512, 8 SwiGLU experts of
    # width 1024 in every layer, top-2), 512-token rows, batch 16
    "small": {
        "model.ffn": "moe", "model.num_layers": 8, "model.d_model": 512, "model.num_heads": 8,
        "model.num_kv_heads": 2, "model.head_dim": 64, "model.moe.num_experts": 8, "model.moe.k": 2,
        "model.moe.expert_dim": 1024, "data.seq_len": 512, "train.batch_size": 16, "train.eval_steps": 16,
        "optimizer.warmup_steps": 100, "train.progress": False, "train.log_every": 100,
    },
}
# per --size: source steps, fine-tune steps, null-expert settings
SIZE_DEFAULTS = {
    "tiny": (300, 60, "8:4:0.01,16:4:0.01,16:4:0.1,8:3:0.1"),
    "small": (2000, 200, "16:4:0.01,8:3:0.1"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="where the source (if trained here) and every transform go")
    p.add_argument("--source", default="", help="a trained MoE run; '' = train one of --size under --workdir")
    p.add_argument("--size", choices=sorted(SOURCES), default="tiny",
                   help="the source trained here and the defaults below (tiny: a CPU; small: one GPU)")
    p.add_argument("--train_steps", type=int, default=0, help="steps of the source trained here (0: the size's)")
    p.add_argument("--keep", default="4,2", help="experts kept per layer, comma-separated")
    p.add_argument("--methods", default="mc_smoe,average,prune")
    p.add_argument("--null", default=None,
                   help="add_null_experts settings Z:k:load_balance_coef, comma-separated ('' = none; "
                        "default: the size's)")
    p.add_argument("--finetune_steps", type=int, default=-1, help="-1: the size's")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tune peak learning rate")
    p.add_argument("--calibration_batches", type=int, default=8)
    p.add_argument("--json", default="", help="also write the rows here")
    p.add_argument("--seed", type=int, default=0, help="the source's init and batch order, and every fine-tune's")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of an earlier run in --workdir (its results.json); run the rest")
    a = p.parse_args(argv)
    steps, finetune, null = SIZE_DEFAULTS[a.size]
    a.train_steps = a.train_steps or steps
    a.finetune_steps = finetune if a.finetune_steps < 0 else a.finetune_steps
    a.null = null if a.null is None else a.null
    return a


def train_source(workdir: str, steps: int, log, seed: int = 0, size: str = "tiny") -> str:
    """Trains the ``size`` MoE into ``workdir/source`` (kept if it already holds a finished run)."""
    from routezoo.configs import base
    from routezoo.training.train import train_and_evaluate

    out = os.path.join(workdir, "source")
    done = os.path.join(out, "checkpoints", str(steps))
    if os.path.isdir(done):
        log(f"source: {out} (already trained)")
        return out
    c = base.get_config()
    for key, value in {**SOURCES[size], "seed": seed, "train.steps": steps, "train.eval_every": steps,
                       "checkpoint.every": steps}.items():
        node = c
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    t0 = time.time()
    train_and_evaluate(c, out)
    log(f"source: trained {steps} steps in {time.time() - t0:.0f} s")
    return out


def _finetune_overrides(steps: int, lr: float) -> dict[str, str]:
    # the schedule spans the fine-tune: short warmup, cosine to 10%
    return {"train.steps": str(max(steps, 1)), "optimizer.learning_rate": str(lr),
            "optimizer.warmup_steps": str(max(1, steps // 10))}


def _bpb(ev: dict | None) -> float | None:
    return None if ev is None else ev.get("eval_bits_per_byte")


def _loss(ev: dict | None) -> float | None:
    return None if ev is None else ev.get("eval_loss")


def format_table(rows: list[dict[str, Any]], finetune_steps: int) -> str:
    """The Markdown table of :func:`run`'s rows."""
    import math

    def fmt(x, spec=".4f"):
        return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)

    lines = ["| model | experts stored / layer | real expert copies per token: transformed, fine-tuned | "
             f"eval loss | bits/byte | eval loss after {finetune_steps} steps | bits/byte after |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ept = r["experts_per_token"]
        ept0 = r.get("experts_per_token_init", ept)
        lines.append(f"| {r['model']} | {r['experts']} | {fmt(ept0, '.2f')}, {fmt(ept, '.2f')} | {fmt(r['loss'])} | "
                     f"{fmt(r['bpb'])} | {fmt(r['loss_ft'])} | {fmt(r['bpb_ft'])} |")
    return "\n".join(lines)


def run(args: Any) -> dict[str, Any]:
    """The benchmark; ``args``: a workdir, a list of arguments, or a parsed namespace."""
    if isinstance(args, str):
        args = parse_args(["--workdir", args])
    elif isinstance(args, (list, tuple)):
        args = parse_args(list(args))
    from routezoo.training import transform as T

    def log(msg):
        print(msg, flush=True)

    quiet = lambda *_: None  # noqa: E731
    os.makedirs(args.workdir, exist_ok=True)
    source_path = args.source or train_source(args.workdir, args.train_steps, log, args.seed, args.size)
    overrides = {**_finetune_overrides(args.finetune_steps, args.lr), "seed": str(args.seed)}
    rows: list[dict[str, Any]] = []
    reports: dict[str, Any] = {}
    results_path = os.path.join(args.workdir, "results.json")
    done: dict[str, dict[str, Any]] = {}    # tag -> row of an earlier run (--resume)
    if args.resume and os.path.exists(results_path):
        with open(results_path) as f:
            earlier = json.load(f)
        done = {r["tag"]: r for r in earlier["rows"] if "tag" in r}
        reports.update(earlier.get("reports", {}))
        log(f"resuming {args.workdir}: {len(done)} rows done")

    def save():
        with open(results_path + ".tmp", "w") as f:
            json.dump({"args": vars(args), "source": source_path, "rows": rows, "reports": reports}, f, indent=2,
                      default=float)
        os.replace(results_path + ".tmp", results_path)

    def add(row):
        rows.append(row)
        save()

    # control: the source, evaluated and fine-tuned as the others are
    src = T.load_source(source_path, overrides, log=quiet)
    ctx = T.Context(src, log=quiet)
    e, k = int(src.config.model.moe.num_experts), int(src.config.model.moe.k)
    if "source" in done:
        rows.append(done["source"])
    else:
        t0 = time.time()
        ev0 = ctx.evaluate(src.config, src.params, src.model_state)
        ev1 = None
        if args.finetune_steps:
            p, ms, _ = ctx.finetune(src.config, src.params, src.model_state, args.finetune_steps)
            ev1 = ctx.evaluate(src.config, p, ms)
        add({"tag": "source", "model": f"source ({e} experts, top-{k})", "experts": e, "experts_per_token": float(k),
             "loss": _loss(ev0), "bpb": _bpb(ev0), "loss_ft": _loss(ev1), "bpb_ft": _bpb(ev1),
             "seconds": time.time() - t0})
        log(f"source: loss {_loss(ev0):.4f} -> {_loss(ev1) if ev1 else float('nan'):.4f} after fine-tune")

    def transform(name, tag, options):
        out = os.path.join(args.workdir, tag)
        if os.path.isdir(out):
            import shutil
            shutil.rmtree(out)
        t0 = time.time()
        record = T.run_transform(name, source_path, out, {**options, "finetune_steps": args.finetune_steps},
                                 overrides, log=quiet)
        reports[tag] = record["report"]
        return record["report"], time.time() - t0

    for n in [int(x) for x in args.keep.split(",") if x]:
        for method in [m for m in args.methods.split(",") if m]:
            tag = f"merge_{method}_{n}"
            if tag in done:
                rows.append(done[tag])
                continue
            rep, secs = transform("merge", tag, {
                "num_experts": n, "merge_method": method, "calibration_batches": args.calibration_batches})
            before = rep.get("eval_merged")
            after = rep.get("eval_finetuned")
            add({"tag": tag, "model": f"merge {e}->{n} {method}", "experts": n,
                 "experts_per_token": float(min(k, n)) if method == "prune" else float(k),
                 "loss": _loss(before), "bpb": _bpb(before), "loss_ft": _loss(after), "bpb_ft": _bpb(after),
                 "seconds": secs})
            log(f"merge {e}->{n} {method}: loss {_loss(before):.4f} -> {_loss(after) or float('nan'):.4f}")

    for setting in [s for s in args.null.split(",") if s]:
        z, kk, lb = setting.split(":")
        tag = f"null_{z}_{kk}_{lb}"
        if tag in done:
            rows.append(done[tag])
            continue
        rep, secs = transform("add_null_experts", tag, {
            "num_null_experts": int(z), "k": int(kk), "load_balance_coef": float(lb),
            "calibration_batches": min(args.calibration_batches, 4)})
        ept0 = rep.get("real_experts_per_token", {}).get("mean")
        ept1 = rep.get("real_experts_per_token_finetuned", {}).get("mean", ept0)
        add({"tag": tag, "model": f"null experts Z={z} k={kk} lb={lb}", "experts": e,
             "experts_per_token": ept1, "experts_per_token_init": ept0,
             "loss": _loss(rep.get("eval_null")), "bpb": _bpb(rep.get("eval_null")),
             "loss_ft": _loss(rep.get("eval_finetuned")), "bpb_ft": _bpb(rep.get("eval_finetuned")),
             "seconds": secs})
        log(f"null Z={z} k={kk} lb={lb}: experts/token {ept0} -> {ept1}, loss {_loss(rep.get('eval_null')):.4f} "
            f"-> {_loss(rep.get('eval_finetuned')) or float('nan'):.4f}")

    table = format_table(rows, args.finetune_steps)
    save()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2, default=float)
    return {"rows": rows, "table": table}


def main(argv: list[str] | None = None) -> None:
    t0 = time.time()
    result = run(parse_args(argv))
    print(result["table"])
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
