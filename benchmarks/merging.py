"""Merging without training: a per-package library of fine-tunes of one base merged by task
arithmetic, TIES, DARE and Model Breadcrumbs, against the per-task models and a multi-task
model, at several numbers of tasks and seeds, all through routezoo's train_step.

    # 1. fix the data (CPU): packed rows of the stdlib corpus and of each task (a top-level
    #    stdlib package), the same preparation as benchmarks/adapter_quality.py
    python benchmarks/merging.py prepare --size tiny --out .bench_data/merging_tiny.npz
    # 2. per seed: a base, one fine-tune per task, a multi-task fine-tune per task count,
    #    then every method at every task count (tiny: about 10 minutes on a 2-core CPU)
    python benchmarks/merging.py run --size tiny --data .bench_data/merging_tiny.npz --json merging.json
    # the GPU size (a 17.4M-parameter dense base, adapter_quality.py's 'small'):
    python benchmarks/merging.py prepare --size small --out .bench_data/merging_small.npz
    python benchmarks/merging.py run --size small --data .bench_data/merging_small.npz --json merging.json

What runs, per seed (``--seeds``; the seed sets model init, batch order and DARE's masks):

1. **Base**: a dense decoder LM pre-trained on the whole corpus (every package).
2. **Library**: one fine-tune per task (``--finetune lora``: LoRA rank 8 on all seven
   projections, as the adapter benchmark's library; ``full``: every parameter), each from the
   base on its package only. Its task vector is its inference weights minus the base's.
3. For each task count ``N`` (``--counts``, the first ``N`` tasks): a **multi-task**
   fine-tune on the mix of the ``N`` packages (``N`` times the steps of one per-task run: the
   same number of training examples as the ``N`` runs together), and the ``N`` task vectors
   **merged** by each method of :mod:`routezoo.zoo.merge` at its paper's defaults.

Reported per (``N``, model): validation loss and bits per byte on each of the ``N`` tasks and
their mean; the per-task row is each task's own fine-tune on that task (what merging tries to
keep). The table gives the mean over tasks, as mean ± standard deviation over seeds; the JSON
(``--json``, written after every seed) holds every number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adapter_quality as aq  # noqa: E402  (the data preparation and train_run this benchmark shares)

TASKS = "email,importlib,asyncio,multiprocessing,distutils,lib2to3"
# name: (adapter_quality size, seq_len, batch, base_steps, ft_steps, task_batches, eval_batches, LoRA lr)
PRESETS = {
    "tiny": ("tiny", 64, 16, 400, 100, 40, 4, 3e-3),     # a 2-core CPU: about 10 minutes for 3 seeds
    "small": ("small", 256, 16, 1500, 300, 40, 4, 1e-3),  # one GPU
}


def prepare(a) -> None:
    """adapter_quality's preparation: pre-training rows and, per task, train and validation rows."""
    size, seq_len, batch, base_steps, _, task_batches, eval_batches, _ = PRESETS[a.size]
    tasks = a.tasks.split(",")
    aq.prepare(argparse.Namespace(
        out=a.out, seq_len=a.seq_len or seq_len, batch=batch, base_steps=a.base_steps or base_steps,
        task_batches=task_batches, eval_batches=eval_batches,
        train_tasks=",".join(tasks[:-1]), heldout_tasks=tasks[-1]))


class Evaluator:
    """Validation loss and bits per byte of plain parameter trees, one compiled eval step."""

    def __init__(self, config, token_bytes, pad_id):
        import jax
        from flax import linen as nn
        from jax.sharding import NamedSharding

        from routezoo.layers import sharding as shd
        from routezoo.training import train as T

        self.config, self.pad_id, self.token_bytes = config, pad_id, token_bytes
        self.mesh, self.rules = T.mesh_and_rules(config)
        self.model = T.zoo.build(config.model)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            self.bs = NamedSharding(self.mesh, shd.batch_spec(1))
            variables = nn.unbox(jax.jit(T.init_variables(self.model, config))(jax.random.PRNGKey(0)))
            self.model_state = {k: v for k, v in variables.items() if k != "params"}
            self.eval_fn = jax.jit(T.make_eval_step(self.model, np.asarray(token_bytes)))

    def __call__(self, params, tasks: list[tuple[str, np.ndarray]]) -> dict[str, float]:
        import jax
        import jax.numpy as jnp
        from flax import linen as nn

        from routezoo.training import train as T
        state = T.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=(),
                             model_state=self.model_state, rng=jnp.zeros((2,), jnp.uint32))
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return aq.evaluate(self.eval_fn, state, self.config, {"tasks": tasks, "pad_id": self.pad_id}, self.bs)


def _per_task(result: dict, tasks: list[str]) -> dict[str, dict[str, float]]:
    return {t: {"loss": result[f"eval_loss/{t}"], "bpb": result[f"eval_bits_per_byte/{t}"]} for t in tasks}


def run(a) -> None:
    import jax

    from routezoo.layers import adapters as adapter_lib
    from routezoo.training import train as T
    from routezoo.zoo import merge as M

    data = dict(np.load(a.data))
    pad_id, batch = int(data["pad_id"]), int(data["batch"])
    seq_len = int(data["pretrain"].shape[1]) - 1
    available = [t for t in (str(data["train_tasks"]) + "," + str(data["heldout_tasks"])).split(",") if t]
    tasks = [t for t in (a.tasks.split(",") if a.tasks else available) if t]
    missing = [t for t in tasks if f"train/{t}" not in data]
    if missing:
        raise SystemExit(f"{a.data} has no rows for {', '.join(missing)}; it has {', '.join(available)}")
    counts = sorted(int(n) for n in a.counts.split(","))
    if counts[-1] > len(tasks):
        raise SystemExit(f"--counts goes up to {counts[-1]} but only {len(tasks)} tasks are given")
    tasks = tasks[:counts[-1]]
    size, _, _, base_steps, ft_steps, _, _, lora_lr = PRESETS[a.size]
    base_steps, ft_steps, lora_lr = a.base_steps or base_steps, a.ft_steps or ft_steps, a.lr or lora_lr
    eval_rows = {t: data[f"eval/{t}"] for t in tasks}
    variants = [(m, m, {}) for m in M.METHODS] + [parse_variant(v) for v in a.also.split(",") if v.strip()]
    rows: list[dict] = []
    info = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "size": a.size, "model": size,
            "batch": batch, "seq_len": seq_len, "base_steps": base_steps, "ft_steps": ft_steps,
            "mt_steps": "ft_steps * N", "finetune": a.finetune, "tasks": tasks, "counts": counts,
            "seeds": a.seeds, "methods": {m: M.METHODS[m].defaults for m in M.METHODS}}

    def cfg(steps, lr, seed):
        c = aq.base_config(size, seq_len, batch, steps)
        c.model.dtype, c.seed = a.dtype, seed
        c.model.scan_layers = False   # the per-layer layout adapters and per-tensor masks address
        c.optimizer.learning_rate, c.optimizer.weight_decay = lr, 0.0
        return c

    def ft_config(steps, seed):
        if a.finetune == "full":
            return cfg(steps, a.full_lr, seed)
        return aq._adapter(cfg(steps, lora_lr, seed), "lora", rank=a.rank, alpha=2.0 * a.rank)

    def eval_sets(names):
        return {"token_bytes": data["token_bytes"], "pad_id": pad_id, "tasks": [(t, eval_rows[t]) for t in names]}

    def finetune(base, names, steps, seed):
        """``(inference weights, per-task results)`` of a fine-tune of ``base`` on ``names`` mixed."""
        c = ft_config(steps, seed)
        batches = aq.TaskBatches([data[f"train/{t}"] for t in names], batch, pad_id, seed=seed + 1)
        if a.finetune == "full":
            params, r = aq.train_run(c, None, batches, eval_sets(names), steps, init_params=base, log=log)
            return params, r
        params, r = aq.train_run(c, base, batches, eval_sets(names), steps, log=log)
        method = adapter_lib.from_config(T.adapter_config(c))
        return jax.device_get(jax.jit(method.merge)(base, params)), r

    def record(seed, n, model, result, names, **extra):
        per = _per_task(result, names)
        rows.append({"seed": seed, "tasks": n, "model": model, "per_task": per,
                     "loss": float(np.mean([v["loss"] for v in per.values()])),
                     "bpb": float(np.mean([v["bpb"] for v in per.values()])), **extra})
        with open(a.json, "w") as f:
            json.dump({"info": info, "rows": rows, "summary": summarize(rows)}, f, indent=1)

    log = print if a.verbose else (lambda *_: None)
    t_start = time.perf_counter()
    for seed in range(a.seed, a.seed + a.seeds):
        print(f"seed {seed}: base ({size}, {base_steps} steps on the whole corpus)", flush=True)
        base, r = aq.train_run(cfg(base_steps, 2e-3, seed), None,
                               aq.TaskBatches([data["pretrain"]], batch, pad_id, seed=seed), eval_sets(tasks),
                               base_steps, log=log)
        base = jax.device_get(base)
        evaluator = Evaluator(cfg(1, lora_lr, seed), data["token_bytes"], pad_id)
        vectors, own = {}, {}
        for t in tasks:
            print(f"seed {seed}: {a.finetune} fine-tune on {t} ({ft_steps} steps)", flush=True)
            params, r = finetune(base, [t], ft_steps, seed)
            vectors[t] = M.task_vector(params, base)
            own[t] = r
        for n in counts:
            names = tasks[:n]
            record(seed, n, "base", evaluator(base, eval_sets(names)["tasks"]), names)
            per_task = {f"eval_loss/{t}": own[t][f"eval_loss/{t}"] for t in names}
            per_task.update({f"eval_bits_per_byte/{t}": own[t][f"eval_bits_per_byte/{t}"] for t in names})
            record(seed, n, "per-task", per_task, names)
            print(f"seed {seed}, {n} tasks: multi-task fine-tune ({ft_steps * n} steps)", flush=True)
            _, r = finetune(base, names, ft_steps * n, seed)
            record(seed, n, "multi-task", r, names)
            for name, method, hyper in variants:
                if "seed" in M.METHODS[method].defaults:
                    hyper = {"seed": seed, **hyper}
                merged = M.merge(method, base, [vectors[t] for t in names], **hyper)
                record(seed, n, name, evaluator(merged, eval_sets(names)["tasks"]), names,
                       hyperparameters=M.hyperparameters(method, **hyper))
        print(f"seed {seed} done ({time.perf_counter() - t_start:.0f} s so far)", flush=True)
    info["seconds"] = round(time.perf_counter() - t_start, 1)
    with open(a.json, "w") as f:
        json.dump({"info": info, "rows": rows, "summary": summarize(rows)}, f, indent=1)
    print_table(rows)
    print(f"\n{a.finetune} fine-tunes, size {a.size}, {a.seeds} seed(s), {info['seconds']:.0f} s; wrote {a.json}")


def parse_variant(text: str) -> tuple[str, str, dict]:
    """``'dare:scale=0.4:combine=ties'`` -> ``('dare scale=0.4 combine=ties', 'dare', {...})``."""
    from routezoo.zoo import merge as M
    method, *pairs = text.strip().split(":")
    hyper = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        default = M.METHODS[method].defaults.get(key) if method in M.METHODS else None
        hyper[key] = value if isinstance(default, str) else (int(value) if isinstance(default, int) else float(value))
    M.hyperparameters(method, **hyper)   # refuses an unknown method, key or value now, not after training
    return " ".join([method, *pairs]), method, hyper


def _models(rows) -> list[str]:
    out = []
    for r in rows:
        if r["model"] not in out:
            out.append(r["model"])
    return out


def summarize(rows) -> list[dict]:
    """Per (task count, model): mean over tasks of loss and bits per byte, mean and standard
    deviation over seeds."""
    out = []
    for n in sorted({r["tasks"] for r in rows}):
        for model in _models(rows):
            sel = [r for r in rows if r["tasks"] == n and r["model"] == model]
            if not sel:
                continue
            bpb, loss = np.array([r["bpb"] for r in sel]), np.array([r["loss"] for r in sel])
            out.append({"tasks": n, "model": model, "seeds": len(sel), "bpb_mean": float(bpb.mean()),
                        "bpb_std": float(bpb.std(ddof=1)) if len(sel) > 1 else 0.0,
                        "loss_mean": float(loss.mean()), "loss_std": float(loss.std(ddof=1)) if len(sel) > 1 else 0.0})
    return out


def print_table(rows) -> None:
    summary = summarize(rows)
    width = max([16] + [len(s["model"]) for s in summary])
    print(f"\n{'tasks':>5} {'model':{width}} {'val loss':>16} {'bits/byte':>16} {'vs per-task':>12}")
    for s in summary:
        ref = next(x for x in summary if x["tasks"] == s["tasks"] and x["model"] == "per-task")
        print(f"{s['tasks']:>5} {s['model']:{width}} {s['loss_mean']:8.4f} ± {s['loss_std']:5.3f} "
              f"{s['bpb_mean']:8.4f} ± {s['bpb_std']:5.3f} {s['bpb_mean'] - ref['bpb_mean']:+12.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--size", default="tiny", choices=sorted(PRESETS))
    pp.add_argument("--out", default=".bench_data/merging_tiny.npz")
    pp.add_argument("--tasks", default=TASKS, help="stdlib packages, one task each")
    pp.add_argument("--seq_len", type=int, default=None, help="default: the size's")
    pp.add_argument("--base_steps", type=int, default=None, help="pre-training batches packed; default: the size's")
    pr = sub.add_parser("run")
    pr.add_argument("--size", default="tiny", choices=sorted(PRESETS))
    pr.add_argument("--data", default=".bench_data/merging_tiny.npz")
    pr.add_argument("--tasks", default=TASKS, help="in order: a count N takes the first N")
    pr.add_argument("--counts", default="2,4,6")
    pr.add_argument("--seeds", type=int, default=3)
    pr.add_argument("--seed", type=int, default=0, help="the first seed")
    pr.add_argument("--finetune", default="lora", choices=("lora", "full"))
    pr.add_argument("--rank", type=int, default=8)
    pr.add_argument("--lr", type=float, default=None, help="LoRA learning rate; default: the size's")
    pr.add_argument("--full_lr", type=float, default=3e-4, help="full fine-tune learning rate")
    pr.add_argument("--base_steps", type=int, default=None, help="default: the size's")
    pr.add_argument("--ft_steps", type=int, default=None, help="per-task steps; default: the size's")
    pr.add_argument("--dtype", default="auto")
    pr.add_argument("--also", default="", help="more merges at other settings, e.g. "
                    "'dare:scale=0.4,ties:density=0.5:scale=0.5' (method:key=value:...)")
    pr.add_argument("--verbose", action="store_true", help="print every run's evaluation")
    pr.add_argument("--json", default="merging.json")
    a = p.parse_args()
    {"prepare": prepare, "run": run}[a.cmd](a)


if __name__ == "__main__":
    main()
