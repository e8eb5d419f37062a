"""Upcycling, unlearning and layer skipping on models trained by routezoo, end to end.

    # tiny models on a 2-core CPU (the default; about 15 minutes)
    python benchmarks/transforms/upcycle_unlearn_skip.py --size tiny \\
        --root runs/bench_transforms_tiny --json benchmarks/results/transforms_upcycle_unlearn_skip_tiny_cpu.json
    # larger models for one GPU (about 10 minutes; --resume continues a run that was cut off)
    python benchmarks/transforms/upcycle_unlearn_skip.py --size small --root runs/bench_transforms_small --resume

Every model trains through ``routezoo train``'s :func:`~routezoo.training.train.train_and_evaluate`
(the one train step, the default stdlib data) and every operation runs through ``routezoo
transform``'s :func:`~routezoo.training.transform.run_transform`, each into its own workdir
under ``--root``:

1. ``dense``: a dense decoder trained ``dense_steps`` steps.
2. **upcycle** (equal total tokens ``dense_steps + more_steps``):
   ``dense+``: the dense model trained ``more_steps`` further (``init.from``);
   ``sparse upcycled``: ``upcycle`` (copies of the MLP, ``E`` experts, top-2, every other
   layer) then ``more_steps`` of training; ``MoE from scratch``: the same MoE trained
   ``dense_steps + more_steps`` from random init; ``Read-ME``: ``upcycle
   method=readme`` (``E`` experts carved by clustering, top-1 pre-gate, a shared quarter of
   the neurons, ``router_steps`` of pre-gate distillation) then ``more_steps`` of training
   distilled from the dense model (``distill.*``, kept by the transform).
3. **unlearn** on the MoE from scratch: UOE on one stdlib package (``--forget``) against
   unlearning the whole model, gradient ascent, ``unlearn_steps`` steps: validation loss on
   the forget package and on the retain packages, and the share of forget tokens still
   routed to the unlearned expert.
4. **layer_skip** on the dense model and the MoE from scratch: validation loss and the
   forward time of one batch at speed-ups 1, 1.25, 1.5, 2, 3 (the unified schedule).

Printed as tables; ``--json`` gets every number with the device and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

# name: (layers, d_model, heads, kv heads, head dim, mlp_dim, seq_len, batch, dense_steps, more_steps,
#        experts, router_steps, unlearn_steps, eval_steps)
PRESETS = {
    "tiny": (6, 64, 4, 2, 16, 256, 128, 16, 400, 200, 4, 50, 30, 8),        # a 2-core CPU
    # one GPU: a seed (six models, the transforms, every evaluation) in about 10 minutes
    "small": (8, 512, 8, 4, 64, 2048, 512, 32, 1500, 750, 8, 200, 100, 16),
}


def base_config(p, steps: int, seed: int = 0):
    from routezoo.configs import base
    layers, d, h, kv, hd, f, seq, batch, *_ , eval_steps = p
    c = base.get_config()
    m = c.model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = layers, d, h, kv, hd, f
    c.data.seq_len, c.train.batch_size, c.train.steps = seq, batch, steps
    c.train.eval_every, c.train.eval_steps, c.train.log_every, c.train.progress = steps, eval_steps, 50, False
    c.checkpoint.every, c.checkpoint.keep = steps, 1
    c.optimizer.warmup_steps = min(50, steps // 5)
    c.seed = seed
    return c


def moe_overrides(p) -> dict:
    experts = p[10]
    return {"ffn": "moe", "moe.every": 2, "moe.num_experts": experts, "moe.k": 2, "moe.expert_dim": p[5]}


def set_keys(config, overrides: dict) -> None:
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value


def train(config, workdir: str, log) -> dict:
    from routezoo.training import config_check
    from routezoo.training.train import train_and_evaluate
    config_check.validate(config)   # as the CLI does before training
    t0 = time.time()
    out = train_and_evaluate(config, workdir)
    log(f"trained {workdir}: eval loss {out['eval_loss']:.4f} in {time.time() - t0:.0f} s")
    return {"eval_loss": out["eval_loss"], "eval_bits_per_byte": out["eval_bits_per_byte"],
            "seconds": time.time() - t0, "workdir": workdir, **param_counts(workdir)}


def param_counts(workdir: str) -> dict:
    """The parameter counts the run logged at step 0 (total and active per token)."""
    from routezoo.training.metrics import read_metrics
    first = [r for r in read_metrics(workdir) if "params_total" in r]
    return {"params_total": first[0]["params_total"], "params_active": first[0]["params_active"]} if first else {}


def step0_eval(workdir: str) -> dict:
    from routezoo.training.metrics import read_metrics
    first = [r for r in read_metrics(workdir) if r["step"] == 0 and "eval_loss" in r][0]
    return {"eval_loss": first["eval_loss"], "eval_bits_per_byte": first["eval_bits_per_byte"]}


def train_transformed(out: str, steps: int, overrides: dict, log) -> dict:
    """``routezoo train --workdir OUT`` of a transformed workdir (its own config.json)."""
    from routezoo.training.workdir import read_workdir_config
    config = read_workdir_config(out)
    set_keys(config, {"train.steps": steps, "train.eval_every": steps, "checkpoint.every": steps,
                      "optimizer.warmup_steps": min(50, steps // 5), **overrides})
    res = train(config, out, log)
    res["step0"] = step0_eval(out)
    return res


def run(a) -> dict:
    import jax

    from routezoo.training import transform as T

    p = PRESETS[a.size]
    seed = getattr(a, "seed", 0)
    dense_steps, more_steps = a.dense_steps or p[8], a.more_steps or p[9]
    experts, router_steps, unlearn_steps = p[10], p[11], a.unlearn_steps or p[12]
    root = os.path.abspath(a.root)
    os.makedirs(root, exist_ok=True)
    log = print
    wd = lambda name: os.path.join(root, name)
    res: dict = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "size": a.size,
                 "preset": dict(zip(("layers", "d_model", "heads", "kv_heads", "head_dim", "mlp_dim", "seq_len",
                                     "batch", "dense_steps", "more_steps", "experts", "router_steps",
                                     "unlearn_steps", "eval_steps"), p)),
                 "dense_steps": dense_steps, "more_steps": more_steps, "seed": seed}

    # Every stage's result goes into ROOT/stages.json as soon as it is done. With --resume a
    # stage found there is not run again, and a workdir left by a stage that was cut off is
    # removed and redone; without it every workdir must be new.
    stages_path = wd("stages.json")
    stages: dict = {}
    if a.resume and os.path.exists(stages_path):
        with open(stages_path) as f:
            stages = json.load(f)
        log(f"resuming {root}: done {', '.join(stages) or 'nothing'}")

    def stage(key: str, name: str, fn):
        """``fn(workdir)`` into ``ROOT/name`` unless ``key`` is done; its result recorded."""
        if key in stages:
            return stages[key]
        path = wd(name)
        if os.path.exists(path):
            if not a.resume:
                raise SystemExit(f"{path} exists; give another --root (every run writes a new workdir) "
                                 "or pass --resume")
            shutil.rmtree(path)   # left by a stage that did not finish
        stages[key] = fn(path)
        with open(stages_path + ".tmp", "w") as f:
            json.dump(stages, f, indent=1, default=float)
        os.replace(stages_path + ".tmp", stages_path)
        return stages[key]

    # 1. the dense model
    res["dense"] = stage("dense", "dense", lambda out: train(base_config(p, dense_steps, seed), out, log))

    # 2. upcycling at equal total tokens
    def dense_more(out):
        c = base_config(p, more_steps, seed)
        c.init.from_workdir = wd("dense")
        return train(c, out, log)

    def sparse(out):
        T.run_transform("upcycle", wd("dense"), out, {"num_experts": str(experts), "every": "2",
                                                      "evaluate": "false"}, log=log)
        return train_transformed(out, more_steps, {}, log)

    def moe_scratch(out):
        c = base_config(p, dense_steps + more_steps, seed)
        set_keys(c.model, moe_overrides(p))
        return train(c, out, log)

    def readme(out):
        rec = T.run_transform("upcycle", wd("dense"), out,
                              {"method": "readme", "num_experts": str(experts), "shared_fraction": "0.25",
                               "router_steps": str(router_steps), "calibration_batches": "4", "evaluate": "false"},
                              log=log)
        r = train_transformed(out, more_steps, {}, log)
        r["distill_phases"] = rec["report"].get("distill_phases")
        return r

    up = {}
    up["dense+"] = stage("dense+", "dense_more", dense_more)
    up["sparse upcycled"] = stage("sparse upcycled", "sparse", sparse)
    up["MoE from scratch"] = stage("MoE from scratch", "moe_scratch", moe_scratch)
    up["Read-ME"] = stage("Read-ME", "readme", readme)
    res["upcycle"] = up

    # 3. unlearning one package in the MoE trained from scratch
    res["unlearn"] = stage("unlearn", "unlearned", lambda out: T.run_transform(
        "unlearn", wd("moe_scratch"), out, {"forget": a.forget, "steps": str(unlearn_steps),
                                            "learning_rate": str(a.unlearn_lr), "calibration_batches": "4"},
        log=log)["report"])

    # 4. layer skipping
    def skip(source):
        def fn(out):
            rec = T.run_transform("layer_skip", wd(source), out, {"speedup": "2", "speedups": "1,1.25,1.5,2,3"},
                                  log=log)
            return rec["report"]["by_speedup"]
        return fn

    res["layer_skip"] = {name: stage(f"layer_skip {name}", f"skip_{name}", skip(name))
                         for name in ("dense", "moe_scratch")}
    return res


def _params(r: dict) -> str:
    if "params_total" not in r:
        return "-"
    return f"{r['params_total'] / 1e6:.2f}M ({r['params_active'] / 1e6:.2f}M)"


def tables(res: dict) -> str:
    lines = [f"device: {res['device']}, jax {res['jax']}, size {res['size']} "
             f"({res['preset']['layers']} layers, d_model {res['preset']['d_model']})", "",
             f"Upcycling (dense trained {res['dense_steps']} steps, then {res['more_steps']} more):", "",
             "| model | parameters (active) | eval loss at its start | eval loss | bits/byte |",
             "| --- | --- | --- | --- | --- |",
             f"| dense ({res['dense_steps']} steps) | {_params(res['dense'])} | - | {res['dense']['eval_loss']:.4f} | "
             f"{res['dense']['eval_bits_per_byte']:.4f} |"]
    for name, r in res["upcycle"].items():
        start = f"{r['step0']['eval_loss']:.4f}" if "step0" in r else "-"
        lines.append(f"| {name} | {_params(r)} | {start} | {r['eval_loss']:.4f} | {r['eval_bits_per_byte']:.4f} |")
    u = res["unlearn"]
    lines += ["", f"Unlearning {u['forget']!r} (expert {u['target']['expert']} of layer {u['target']['layer']}, "
                  f"{u['objective']}):", "",
              "| model | forget loss | retain loss | forget tokens routed to the expert | parameters changed |",
              "| --- | --- | --- | --- | --- |",
              f"| source | {u['source']['eval_forget']:.4f} | {u['source']['eval_retain']:.4f} | "
              f"{u['source']['target_share']:.3f} | 0 |"]
    for key, name in (("uoe", "UOE (one expert, router anchored)"), ("whole_model", "whole model")):
        if key in u:
            r = u[key]
            lines.append(f"| {name} | {r['eval_forget']:.4f} | {r['eval_retain']:.4f} | {r['target_share']:.3f} | "
                         f"{len(r['changed'])} tensors |")
    lines += ["", "Layer skipping (unified schedule):", "",
              "| model | speed-up | skipped layers | eval loss | forward ms |", "| --- | --- | --- | --- | --- |"]
    for name, rows in res["layer_skip"].items():
        for r in rows:
            lines.append(f"| {name} | {r['speedup']:g} (layers {r['speedup_in_layers']:.2f}x) | "
                         f"{','.join(map(str, r['skip_layers'])) or '-'} | {r['eval_loss']:.4f} | "
                         f"{1000 * r['forward_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--root", default="runs/bench_transforms_tiny", help="directory for the workdirs (new)")
    ap.add_argument("--json", default="", help="write every number here")
    ap.add_argument("--forget", default="email", help="the stdlib package to unlearn")
    ap.add_argument("--unlearn_lr", type=float, default=1e-3)
    ap.add_argument("--dense_steps", type=int, default=0)
    ap.add_argument("--more_steps", type=int, default=0)
    ap.add_argument("--unlearn_steps", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="every model's init and batch order")
    ap.add_argument("--resume", action="store_true",
                    help="continue a run in --root that was cut off: finished stages (ROOT/stages.json) are kept")
    ap.add_argument("--table_from", default="", help="print the tables of a finished run's JSON (workdirs in --root)")
    a = ap.parse_args(argv)
    if a.table_from:
        res = json.load(open(a.table_from))
        names = {"dense": "dense", "dense+": "dense_more", "sparse upcycled": "sparse",
                 "MoE from scratch": "moe_scratch", "Read-ME": "readme"}
        for name, r in [("dense", res["dense"]), *res["upcycle"].items()]:
            if "params_total" not in r:
                r.update(param_counts(os.path.join(os.path.abspath(a.root), names[name])))
        print(tables(res))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1, default=float)
        return 0
    t0 = time.time()
    res = run(a)
    res["seconds"] = time.time() - t0
    print(tables(res))
    print(f"\ntotal {res['seconds']:.0f} s")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
