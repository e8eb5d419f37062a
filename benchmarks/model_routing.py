"""Routing between whole models: a per-package library of LoRA fine-tunes of one base, with
prompts from every package routed to one member each by Tryage, Composition of Experts and
RouterRetriever, against the best single member, uniform random choice and the oracle.

    # 1. fix the data (CPU): packed rows of the stdlib corpus and of each task (a top-level
    #    stdlib package), adapter_quality.py's preparation with extra train rows per package
    python benchmarks/model_routing.py prepare --size tiny --out .bench_data/routing_tiny.npz
    # 2. per seed: a base, one LoRA per package, a prompt encoder, the routers; then every
    #    model on the held-out prompts (tiny: about 10 minutes for 3 seeds on a 2-core CPU)
    python benchmarks/model_routing.py run --size tiny --data .bench_data/routing_tiny.npz --seeds 3 --json routing.json
    # the GPU size (adapter_quality.py's 17.4M-parameter base, 256-token rows):
    python benchmarks/model_routing.py prepare --size small --out .bench_data/routing_small.npz
    python benchmarks/model_routing.py run --size small --data .bench_data/routing_small.npz --seeds 3 --json routing.json

What runs, per seed (``--seeds``; the seed sets model init, batch order and the routers'
minibatches):

1. **Base**: a dense decoder LM pre-trained on the whole corpus (every package).
2. **Library**: the base itself (member 0, the cheapest) and one LoRA per package (rank 8 on
   all seven projections, as merging.py's library), each trained on the first
   ``member_batches`` batches of its package's train rows. The LoRAs are served together by
   ``multi_lora`` (:class:`routezoo.zoo.compose.Library`).
3. **Router data**: the package's next ``router_batches`` batches of train rows, which no
   member trained on, with every member's true loss on them. A row's prompt is its first
   ``prefix`` tokens; losses (and bits per byte) are over the tokens after it.
4. **Routers** (:mod:`routezoo.training.compose`): a prompt encoder (``encoder_mlm``)
   pre-trained by masked-token prediction on the corpus rows; ``tryage`` (the encoder
   fine-tuned to predict each member's loss), ``coe`` (fine-tuned to classify the package,
   then the best member per package), ``retriever`` (frozen encoder, nearest pilot among the
   router rows; ``retriever mean``: nearest per-member mean).
5. **Evaluation** on the packages' validation rows (files no member or router saw): bits per
   byte of every member, the best single member (picked on the router data), uniform random
   choice (its expectation), each router, the package label (each prompt to its own
   package's LoRA, a router that is told the answer's domain) and the oracle (the lowest
   true loss per prompt); each router's FLOPs per routed prompt; tryage at several cost
   weights (nats per unit of relative FLOPs, the base being 1).

The table gives mean ± standard deviation over seeds; the JSON (``--json``, written after
every seed) holds every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adapter_quality as aq  # noqa: E402  (the data preparation and train_run this benchmark shares)

TASKS = "email,importlib,asyncio,multiprocessing,distutils,lib2to3"
# name: (adapter_quality size, seq_len, batch, base_steps, ft_steps, member_batches, router_batches,
#        eval_batches, LoRA lr, prefix, encoder size, encoder_steps, router_steps)
PRESETS = {
    "tiny": ("tiny", 64, 16, 400, 100, 40, 20, 4, 3e-3, 32, "tiny", 300, 300),     # a 2-core CPU
    "small": ("small", 256, 16, 1500, 300, 40, 20, 4, 1e-3, 64, "small", 1000, 600),  # one GPU
}
COST_WEIGHTS = "0,0.1,0.2,0.5,1,2"


def prepare(a) -> None:
    """adapter_quality's preparation: pre-training rows, and per task its train rows
    (members' and routers') and validation rows."""
    size, seq_len, batch, base_steps, _, member_batches, router_batches, eval_batches = PRESETS[a.size][:8]
    tasks = a.tasks.split(",")
    aq.prepare(argparse.Namespace(
        out=a.out, seq_len=seq_len, batch=batch, base_steps=base_steps,
        task_batches=member_batches + router_batches, eval_batches=eval_batches,
        train_tasks=",".join(tasks[:-1]), heldout_tasks=tasks[-1]))


def run(a) -> None:
    import jax

    from routezoo import zoo
    from routezoo.training import compose as T
    from routezoo.zoo import compose as C

    data = dict(np.load(a.data))
    pad_id, batch = int(data["pad_id"]), int(data["batch"])
    seq_len = int(data["pretrain"].shape[1]) - 1
    tasks = [t for t in a.tasks.split(",") if t]
    missing = [t for t in tasks if f"train/{t}" not in data]
    if missing:
        raise SystemExit(f"{a.data} has no rows for {', '.join(missing)}")
    (size, _, _, base_steps, ft_steps, member_batches, _, _, lora_lr, prefix, enc_size, enc_steps,
     router_steps) = PRESETS[a.size]
    prefix = a.prefix or prefix
    member_rows = member_batches * batch
    cost_weights = [float(w) for w in a.cost_weights.split(",") if w.strip()]
    lora_cfg = {"method": "lora", "targets": aq.TARGETS, "rank": a.rank, "alpha": 2.0 * a.rank, "rslora": False}
    fit = T.concat([T.rows_to_data(data[f"train/{t}"][member_rows:], pad_id, prefix, i) for i, t in enumerate(tasks)])
    ev = T.concat([T.rows_to_data(data[f"eval/{t}"], pad_id, prefix, i) for i, t in enumerate(tasks)])
    import flax
    import platform
    info = {"device": jax.devices()[0].device_kind, "cpus": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "flax": flax.__version__, "size": a.size, "model": size,
            "batch": batch, "seq_len": seq_len, "prefix": prefix, "base_steps": base_steps, "ft_steps": ft_steps,
            "lora": lora_cfg, "tasks": tasks, "member_rows_per_task": member_rows,
            "router_rows": int(len(fit["inputs"])), "eval_rows": int(len(ev["inputs"])),
            "encoder": {"size": enc_size, "steps": enc_steps}, "router_steps": router_steps, "router_lr": a.router_lr,
            "cost_weights": cost_weights, "seeds": a.seeds}
    seeds: list[dict] = []
    log = print if a.verbose else (lambda *_: None)
    t_start = time.perf_counter()

    def cfg(steps, lr, seed):
        c = aq.base_config(size, seq_len, batch, steps)
        c.model.dtype, c.seed = a.dtype, seed
        c.optimizer.learning_rate, c.optimizer.weight_decay = lr, 0.0
        return c

    eval_sets = {"token_bytes": data["token_bytes"], "pad_id": pad_id, "tasks": [(tasks[0], data[f"eval/{tasks[0]}"])]}
    for seed in range(a.seed, a.seed + a.seeds):
        t_seed = time.perf_counter()
        print(f"seed {seed}: base ({size}, {base_steps} steps on the whole corpus)", flush=True)
        base, _ = aq.train_run(cfg(base_steps, 2e-3, seed), None,
                               aq.TaskBatches([data["pretrain"]], batch, pad_id, seed=seed), eval_sets, base_steps,
                               log=log)
        base = jax.device_get(base)
        loras = []
        for i, t in enumerate(tasks):
            print(f"seed {seed}: LoRA on {t} ({ft_steps} steps)", flush=True)
            c = aq._adapter(cfg(ft_steps, lora_lr, seed), "lora", rank=a.rank, alpha=2.0 * a.rank)
            params, _ = aq.train_run(c, base, aq.TaskBatches([data[f"train/{t}"][:member_rows]], batch, pad_id,
                                                             seed=seed + 1 + i), eval_sets, ft_steps, log=log)
            loras.append((t, jax.device_get(params), lora_cfg))
        model = zoo.build(cfg(1, lora_lr, seed).model)
        library = C.Library.from_lora(model, {"params": base}, loras, base_name="base", seq_len=seq_len,
                                      domains=tasks, token_bytes=data["token_bytes"])

        print(f"seed {seed}: routers ({len(fit['inputs'])} router rows, prompt {prefix} of {seq_len} tokens)",
              flush=True)
        fit_scores = T.member_scores(library, fit, 32)
        losses = fit_scores["loss"]
        enc_config = T.encoder_config(cfg(1, lora_lr, seed).data, library.vocab_size, seq_len, enc_size,
                                      steps=enc_steps, batch=batch, seed=seed)
        pre = aq.TaskBatches([data["pretrain"]], batch, pad_id, seed=seed + 100)
        enc_vars = T.train_encoder(enc_config, pre, log)
        encoder = C.PromptEncoder(zoo.build(enc_config.model), enc_vars, prefix, pad_id)
        tryage, _ = T.fit_tryage(library, encoder, fit, losses, steps=router_steps, batch=32, lr=a.router_lr,
                                 seed=seed, log=log)
        coe, _ = T.fit_coe(library, encoder, fit, losses, tasks, steps=router_steps, batch=32, lr=a.router_lr,
                           seed=seed, log=log)
        retriever = T.fit_retriever(encoder, fit, losses, batch=32)
        routers = {"tryage": tryage, "coe": coe, "retriever": retriever,
                   "retriever mean": dataclasses.replace(retriever, pool="mean"), "oracle": C.Oracle()}
        res = T.evaluate(library, routers, ev, batch=32, domains=tasks, cost_weights=cost_weights)

        # references computed from the members' scores on the evaluation rows
        scores = T.member_scores(library, ev, 32)
        nll, nbytes = scores["nll"], scores["bytes"]
        bpb = lambda choice: float(nll[np.arange(len(choice)), choice].sum() / np.log(2) / nbytes.sum())  # noqa: E731
        fit_bpb = fit_scores["nll"].sum(0) / fit_scores["bytes"].sum()
        best_fit = int(np.argmin(fit_bpb))
        label = np.asarray([library.names.index(tasks[d]) for d in ev["domain"]])
        res["best_single_on_router_data"] = {"member": best_fit, "name": library.names[best_fit],
                                             "bpb": bpb(np.full(len(label), best_fit))}
        res["package_label"] = {"bpb": bpb(label), "agreement_with_oracle": float(np.mean(label == np.argmin(nll, 1)))}
        res["member_flops_per_prompt"] = float(library.flops.min() * seq_len)
        res["seed"], res["seconds"] = seed, round(time.perf_counter() - t_seed, 1)
        seeds.append(res)
        with open(a.json, "w") as f:
            json.dump({"info": info, "seeds": seeds, "summary": summarize(seeds)}, f, indent=1)
        print(f"seed {seed} done ({time.perf_counter() - t_start:.0f} s so far)", flush=True)
    info["seconds"] = round(time.perf_counter() - t_start, 1)
    with open(a.json, "w") as f:
        json.dump({"info": info, "seeds": seeds, "summary": summarize(seeds)}, f, indent=1)
    print_table(seeds)
    print(f"\nsize {a.size}, {a.seeds} seed(s), {info['seconds']:.0f} s; wrote {a.json}")


def _rows(res: dict) -> list[tuple[str, float, dict]]:
    """``(model, bits per byte, extras)`` of one seed's results, in table order."""
    out = [(f"member {m['name']}", m["bpb"], {}) for m in res["members"]]
    out.append(("best single member (picked on router data)", res["best_single_on_router_data"]["bpb"], {}))
    out.append(("uniform random (expected)", res["uniform"]["bpb"], {}))
    for name, r in res["routers"].items():
        if name != "oracle":
            out.append((name, r["bpb"], {"agreement": r["agreement_with_oracle"],
                                         "router_flops": r["router_flops_per_prompt"]}))
    out.append(("package label", res["package_label"]["bpb"], {"agreement": res["package_label"]["agreement_with_oracle"]}))
    o = res["routers"]["oracle"]
    out.append(("oracle", o["bpb"], {"agreement": 1.0, "router_flops": o["router_flops_per_prompt"]}))
    return out


def _ms(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(seeds: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every row, and of tryage at each cost weight."""
    rows = {}
    for res in seeds:
        for name, value, extra in _rows(res):
            r = rows.setdefault(name, {"bpb": [], "agreement": [], "router_flops": []})
            r["bpb"].append(value)
            for k, v in extra.items():
                r[k].append(v)
    table = []
    for name, r in rows.items():
        entry = {"model": name, "seeds": len(r["bpb"])}
        entry["bpb_mean"], entry["bpb_std"] = _ms(r["bpb"])
        if r["agreement"]:
            entry["agreement_mean"], entry["agreement_std"] = _ms(r["agreement"])
        if r["router_flops"]:
            entry["router_flops_per_prompt"] = float(np.mean(r["router_flops"]))
        table.append(entry)
    sweep = []
    for i, w in enumerate(seeds[0].get("tryage_cost_weight", [])):
        per = [res["tryage_cost_weight"][i] for res in seeds]
        bpb_m, bpb_s = _ms([p["bpb"] for p in per])
        base_share = _ms([p["choices"][0] / sum(p["choices"]) for p in per])
        flops = _ms([p["flops_per_token_of_chosen"] for p in per])
        sweep.append({"cost_weight": w["cost_weight"], "bpb_mean": bpb_m, "bpb_std": bpb_s,
                      "base_share_mean": base_share[0], "flops_per_token_mean": flops[0]})
    return {"table": table, "tryage_cost_weight": sweep,
            "member_flops_per_prompt": float(np.mean([r["member_flops_per_prompt"] for r in seeds]))}


def print_table(seeds: list[dict]) -> None:
    s = summarize(seeds)
    width = max(len(r["model"]) for r in s["table"])
    print(f"\n{'model':{width}} {'bits/byte':>16} {'oracle agreement':>16} {'router FLOPs/prompt':>20}")
    for r in s["table"]:
        agree = f"{r['agreement_mean']:.3f}" if "agreement_mean" in r else ""
        flops = f"{r['router_flops_per_prompt']:,.0f}" if "router_flops_per_prompt" in r else ""
        print(f"{r['model']:{width}} {r['bpb_mean']:8.4f} ± {r['bpb_std']:5.3f} {agree:>16} {flops:>20}")
    print(f"(one member's forward over a whole row: {s['member_flops_per_prompt']:,.0f} FLOPs)")
    print(f"\n{'tryage cost weight':>18} {'bits/byte':>16} {'routed to the base':>19} {'FLOPs/token of chosen':>22}")
    for r in s["tryage_cost_weight"]:
        print(f"{r['cost_weight']:18g} {r['bpb_mean']:8.4f} ± {r['bpb_std']:5.3f} {r['base_share_mean']:19.3f} "
              f"{r['flops_per_token_mean']:22,.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--size", default="tiny", choices=sorted(PRESETS))
    pp.add_argument("--out", default=".bench_data/routing_tiny.npz")
    pp.add_argument("--tasks", default=TASKS, help="stdlib packages, one member each")
    pr = sub.add_parser("run")
    pr.add_argument("--size", default="tiny", choices=sorted(PRESETS))
    pr.add_argument("--data", default=".bench_data/routing_tiny.npz")
    pr.add_argument("--tasks", default=TASKS)
    pr.add_argument("--seeds", type=int, default=3)
    pr.add_argument("--seed", type=int, default=0, help="the first seed")
    pr.add_argument("--rank", type=int, default=8)
    pr.add_argument("--prefix", type=int, default=None, help="prompt tokens the routers read; default: the size's")
    pr.add_argument("--router_lr", type=float, default=1e-3)
    pr.add_argument("--cost_weights", default=COST_WEIGHTS, help="tryage's cost weights to sweep")
    pr.add_argument("--dtype", default="auto")
    pr.add_argument("--verbose", action="store_true", help="print every training run's evaluation")
    pr.add_argument("--json", default="routing.json")
    a = p.parse_args()
    {"prepare": prepare, "run": run}[a.cmd](a)


if __name__ == "__main__":
    main()
