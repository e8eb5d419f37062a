"""Adapter quality: LoRA vs MoS at equal trainable parameters, and Poly vs MHR vs
multi-task LoRA on held-out tasks, all on the same tokens through routezoo's train_step.

    # 1. fix the data (CPU; needs the routezoo data stack): packed rows of the default
    #    stdlib corpus (pre-training) and of each task (a top-level stdlib package, data.tasks)
    python benchmarks/adapter_quality.py prepare --out .bench_data/adapters_256.npz
    # 2. pre-train a base, then train and evaluate every adapter on it (a GPU for the default size)
    python benchmarks/adapter_quality.py run --data .bench_data/adapters_256.npz --json adapter_quality.json

What runs (every adapter on the same frozen base, same optimizer, same batches):

1. **Base**: a dense decoder LM (``--size``) pre-trained for ``--base_steps`` on the whole
   corpus (every package, the held-out ones included: the adapters learn to specialise,
   not to see new text).
2. **LoRA vs MoS** (the MoS paper's small-scale check): fine-tune on one task
   (``--ft_task``) with LoRA at rank ``r_eq``, MoS at active rank ``r`` with the parameter
   budget of LoRA rank ``r_eq`` (equal trainable parameters), and LoRA at rank ``r`` (MoS's
   active rank, ``r/r_eq`` times the parameters). Expected (paper): MoS beats LoRA at
   ``r_eq`` and approaches LoRA at ``r``. DoRA and PiSSA at rank ``r_eq`` join the
   comparison: PiSSA trains exactly LoRA ``r_eq``'s parameters (its frozen residual is
   stored, not trained); DoRA adds one magnitude per output unit, the sum of the targets'
   output sizes (at ``--size small`` 35,840 on top of LoRA ``r_eq = 2``'s 133,120).
3. **Multi-task, then few-shot on held-out tasks** (the MHR paper's small-scale
   check): Poly, MHR and one multi-task LoRA (task ids ignored) train on the mixed train
   tasks; then each adapts to the held-out tasks from ``--fewshot_rows`` sequences per
   task: Poly and MHR fine-tune skills and a fresh router, MHR-z only the router, MHR-mu
   the skill average, LoRA continues from its multi-task weights; a LoRA trained from
   scratch on the same few shots is the baseline. Expected (paper): MHR >= Poly >=
   multi-task LoRA, MHR-z close behind.

Reported per run: validation loss and bits per byte on its task(s), trainable and stored
adapter parameters, steps, tokens/s. Writes ``--json`` after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

SIZES = {
    # name: (layers, d_model, heads, kv_heads, head_dim, mlp_dim)
    "small": (8, 384, 6, 2, 64, 1536),     # 8 layers: MoS r=8 at r_eq=2 with one private rank fits
    "tiny": (2, 64, 2, 1, 32, 128),          # a CPU smoke test of the script
}
TRAIN_TASKS = "lib2to3,idlelib,distutils,email,multiprocessing,importlib,asyncio"
HELDOUT_TASKS = "tomllib,zoneinfo,turtledemo"
TARGETS = "attn/(q|k|v|o)|mlp/(wi|wg|wo)"


def base_config(size: str, seq_len: int, batch: int, steps: int):
    from routezoo.configs import base
    c = base.get_config()
    layers, d, h, kv, hd, f = SIZES[size]
    m = c.model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = layers, d, h, kv, hd
    m.ffn, m.mlp_dim = "mlp", f
    m.scan_layers = False   # adapters address layers one by one (adapter runs execute the base unscanned)
    c.data.seq_len = seq_len
    c.train.batch_size, c.train.steps = batch, steps
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 2e-3, max(steps // 20, 1)
    return c


# --------------------------------------------------------------------------- data


def _rows(it, n):
    out = []
    for batch, _ in zip(it, range(n)):
        out.append(np.concatenate([batch["inputs"], batch["targets"][:, -1:]], 1))
    return np.concatenate(out)


def prepare(a) -> None:
    """Packed rows [N, L+1] (uint16): the whole corpus, and per task its train and
    validation rows (each row from one task)."""
    from routezoo.training import data as data_lib
    c = base_config("tiny", a.seq_len, a.batch, 1)
    c.train.eval_steps = a.eval_batches
    data_lib.ensure_dataset(c.data)
    tok = data_lib.get_tokenizer(c.data)
    out = {"pretrain": _rows(data_lib.make_train_iterator(c), a.base_steps).astype(np.uint16)}
    for task in (a.train_tasks + "," + a.heldout_tasks).split(","):
        c.data.tasks = task
        out[f"train/{task}"] = _rows(data_lib.make_train_iterator(c), a.task_batches).astype(np.uint16)
        ev = [np.concatenate([b["inputs"], b["targets"][:, -1:]], 1) for b in data_lib.eval_batches(c)]
        rows = np.concatenate(ev)
        out[f"eval/{task}"] = rows[(rows[:, 1:] != tok.pad_id).any(1)].astype(np.uint16)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    np.savez_compressed(a.out, token_bytes=np.asarray(tok.token_bytes, np.int32), pad_id=tok.pad_id,
                        batch=a.batch, train_tasks=a.train_tasks, heldout_tasks=a.heldout_tasks, **out)
    print(f"wrote {a.out}: " + ", ".join(f"{k} {v.shape[0]}" for k, v in out.items()))


class TaskBatches:
    """Batches of ``batch`` rows with ``task_id``: rows of task ``t`` drawn in turn from
    ``rows[t]`` (cycled), the task of each row uniform at random (fixed seed)."""

    def __init__(self, rows: list[np.ndarray], batch: int, pad_id: int, seed: int = 0):
        self.rows, self.batch, self.pad_id = rows, batch, pad_id
        self.rng = np.random.default_rng(seed)
        self.next = [0] * len(rows)

    def __call__(self) -> dict[str, np.ndarray]:
        tasks = self.rng.integers(0, len(self.rows), self.batch)
        picked = []
        for t in tasks:
            r = self.rows[t]
            picked.append(r[self.next[t] % len(r)])
            self.next[t] += 1
        r = np.stack(picked).astype(np.int32)
        return {"inputs": r[:, :-1], "targets": r[:, 1:], "weights": (r[:, 1:] != self.pad_id).astype(np.float32),
                "task_id": tasks.astype(np.int32)}


# --------------------------------------------------------------------------- training


def evaluate(eval_fn, state, config, eval_sets, batch_sharding, extra=()) -> dict[str, float]:
    """Validation loss per task (``eval_loss/<task>``), bits per byte per task
    (``eval_bits_per_byte/<task>``) and over all tasks, of ``eval_fn(state, batch, *extra)``."""
    import jax
    out, tot = {}, {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
    b = int(config.train.batch_size)
    for task_id, (name, rows) in enumerate(eval_sets["tasks"]):
        s = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
        for i in range(0, len(rows), b):
            r = rows[i:i + b].astype(np.int32)
            if len(r) < b:
                r = np.concatenate([r, np.full((b - len(r), r.shape[1]), eval_sets["pad_id"], np.int32)])
            batch = {"inputs": r[:, :-1], "targets": r[:, 1:],
                     "weights": (r[:, 1:] != eval_sets["pad_id"]).astype(np.float32),
                     "task_id": np.full((b,), task_id, np.int32)}
            res = jax.device_get(eval_fn(state, jax.device_put(batch, batch_sharding), *extra))
            for k in s:
                s[k] += float(res[k])
        out[f"eval_loss/{name}"] = s["nll"] / max(s["tokens"], 1.0)
        out[f"eval_bits_per_byte/{name}"] = s["nll"] / np.log(2) / max(s["bytes"], 1.0)
        for k in tot:
            tot[k] += s[k]
    out["eval_loss"] = tot["nll"] / max(tot["tokens"], 1.0)
    out["eval_bits_per_byte"] = tot["nll"] / np.log(2) / max(tot["bytes"], 1.0)
    return out


def train_run(config, base, train_batches, eval_sets, steps, sources=None, log=print,
              init_params=None) -> tuple[object, dict]:
    """Trains ``config`` (an adapter run over ``base``, or the base itself when
    ``base`` is None; a full fine-tune of ``init_params`` when given) for ``steps``;
    returns (params, metrics incl. per-task eval)."""
    import jax
    from flax import linen as nn
    from jax.sharding import NamedSharding

    from routezoo import zoo
    from routezoo.layers import adapters as adapter_lib
    from routezoo.layers import sharding as shd
    from routezoo.training import train as T

    mesh, rules = T.mesh_and_rules(config)
    model = zoo.build(config.model)
    adapter = adapter_lib.from_config(T.adapter_config(config)) if config.adapter.method else None
    tx, schedule = T.optimizer_for(config, adapter)
    table = np.asarray(eval_sets["token_bytes"])
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        bs = NamedSharding(mesh, shd.batch_spec(1))
        if adapter is None:
            _, shardings, _ = T.state_shardings(model, tx, config, mesh, rules)
            state = T.create_state(model, tx, config, shardings)
            if init_params is not None:   # a full fine-tune: the given parameters, a fresh optimizer
                params = jax.device_put(init_params, shardings.params)
                state = state.replace(params=params, opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(
                    params))
            extra, extra_shard, info = (), (), {}
        else:
            _, shardings, setup = T.adapter_state_shardings(model, tx, config, mesh, rules, adapter, sources)
            base_dev = jax.device_put(base, setup.base_shardings)
            meta = T.adapter_metadata(config, setup, base_dev)
            state = T.create_adapter_state(model, tx, config, shardings, setup, sources, base=base_dev)
            extra, extra_shard = (base_dev,), (setup.base_shardings,)
            info = {k: meta[k] for k in ("params_trainable", "params_adapter", "params_base")}
        step_fn = jax.jit(T.make_train_step(model, tx, config, schedule, adapter),
                          in_shardings=(shardings, bs, *extra_shard), out_shardings=(shardings, None),
                          donate_argnums=0)
        eval_fn = jax.jit(T.make_eval_step(model, table, adapter), in_shardings=(shardings, bs, *extra_shard))

        t0, metrics = None, None
        for i in range(steps):
            state, metrics = step_fn(state, jax.device_put(train_batches(), bs), *extra)
            if i == min(4, steps - 1):
                jax.block_until_ready(metrics)
                t0, i0 = time.perf_counter(), i
        jax.block_until_ready(state.params)
        tps = int(config.train.batch_size) * int(config.data.seq_len) * (steps - 1 - i0) / max(
            time.perf_counter() - t0, 1e-9)
        ev = evaluate(eval_fn, state, config, eval_sets, bs, extra)
        log("  " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()) + f"; loss {float(metrics['loss']):.4f}")
        params = jax.device_get(state.params)
    return params, {**info, **ev, "train_loss": float(metrics["loss"]), "steps": steps, "tokens_per_second": tps}


def _adapter(c, method: str, **keys):
    c.adapter.method, c.adapter.targets = method, TARGETS
    for k, v in keys.items():
        c.adapter[k] = v
    return c


def run(a) -> None:
    import jax
    data = dict(np.load(a.data))
    pad_id, batch = int(data["pad_id"]), int(data["batch"])
    seq_len = int(data["pretrain"].shape[1]) - 1
    train_tasks, heldout = str(data["train_tasks"]).split(","), str(data["heldout_tasks"]).split(",")
    rows: list[dict] = []

    def cfg(steps, lr):
        c = base_config(a.size, seq_len, batch, steps)
        c.model.dtype, c.seed = a.dtype, a.seed
        c.optimizer.learning_rate, c.optimizer.weight_decay = lr, 0.0
        return c

    def eval_sets(tasks):
        return {"token_bytes": data["token_bytes"], "pad_id": pad_id,
                "tasks": [(t, data[f"eval/{t}"]) for t in tasks]}

    def record(name, group, r, note):
        rows.append({"run": name, "group": group, "note": note, **r})
        info = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "size": a.size, "batch": batch,
                "seq_len": seq_len, "base_steps": a.base_steps, "ft_steps": a.ft_steps, "mt_steps": a.mt_steps,
                "fewshot_steps": a.fewshot_steps, "fewshot_rows": a.fewshot_rows, "ft_task": a.ft_task,
                "train_tasks": train_tasks, "heldout_tasks": heldout, "seed": a.seed}
        json.dump({"info": info, "rows": rows}, open(a.json, "w"), indent=1)

    print(f"base: {a.size}, {a.base_steps} steps on the whole corpus", flush=True)
    pre = data["pretrain"]
    base, r = train_run(cfg(a.base_steps, 2e-3), None, TaskBatches([pre], batch, pad_id, seed=a.seed),
                        eval_sets([a.ft_task] + heldout), a.base_steps)
    record("base", "base", r, "dense LM pre-trained on every package")

    # --- LoRA vs MoS (and DoRA, PiSSA) on one task -----------------------------------
    ft = TaskBatches([data[f"train/{a.ft_task}"]], batch, pad_id, seed=a.seed + 1)
    r_eq, r_act = a.r_eq, a.r_active
    for name, method, keys, note in (
            (f"lora r={r_eq}", "lora", {"rank": r_eq, "alpha": 2.0 * r_eq}, "LoRA at MoS's parameter budget"),
            (f"mos r={r_act} r_eq={r_eq}", "mos", {"rank": r_act, "alpha": 2.0 * r_act, "mos_equiv_rank": r_eq,
                                                 "mos_private_rank": 1, "mos_shards_per_vector": 2},
             "MoS: active rank r, parameters of LoRA r_eq"),
            (f"lora r={r_act}", "lora", {"rank": r_act, "alpha": 2.0 * r_act}, "LoRA at MoS's active rank"),
            (f"dora r={r_eq}", "dora", {"rank": r_eq, "alpha": 2.0 * r_eq},
             "DoRA: LoRA r_eq's parameters plus one magnitude per output unit"),
            (f"pissa r={r_eq}", "pissa", {"rank": r_eq},
             "PiSSA: LoRA r_eq's trainable parameters from the top-r_eq SVD, scale 1; residual frozen")):
        print(f"{name} on {a.ft_task}", flush=True)
        ft.rng, ft.next = np.random.default_rng(a.seed + 1), [0]
        _, res = train_run(_adapter(cfg(a.ft_steps, a.lr), method, **keys), base, ft, eval_sets([a.ft_task]),
                           a.ft_steps)
        record(name, f"single task ({a.ft_task})", res, note)

    if "multi" not in a.parts.split(","):
        print_table(rows)
        return
    # --- multi-task, then few-shot on held-out tasks ------------------------------------
    mt_rows = [data[f"train/{t}"] for t in train_tasks]
    shots = [data[f"train/{t}"][:a.fewshot_rows] for t in heldout]
    common = {"rank": a.poly_rank, "poly_skills": a.skills, "num_tasks": len(train_tasks)}
    trained = {}
    for name, method, keys in (("poly", "poly", common), ("mhr", "mhr", {**common, "mhr_heads": a.heads}),
                               ("lora (multi-task)", "lora", {"rank": a.skills * a.poly_rank,
                                                              "alpha": 2.0 * a.skills * a.poly_rank})):
        print(f"{name}: multi-task on {len(train_tasks)} tasks", flush=True)
        params, res = train_run(_adapter(cfg(a.mt_steps, a.lr), method, **keys), base,
                                TaskBatches(mt_rows, batch, pad_id, seed=a.seed + 2), eval_sets(train_tasks), a.mt_steps)
        trained[name] = params
        record(name, "multi-task (train tasks)", res, f"{len(train_tasks)} tasks mixed")
    few = {**common, "num_tasks": len(heldout)}
    for name, source, method, keys, note in (
            ("poly few-shot", "poly", "poly", few, "skills + new router rows fine-tuned"),
            ("mhr few-shot", "mhr", "mhr", {**few, "mhr_heads": a.heads}, "skills + new router rows"),
            ("mhr_z few-shot", "mhr", "mhr_z", {**few, "mhr_heads": a.heads}, "router only; skills frozen"),
            ("mhr_mu few-shot", "mhr", "mhr_mu", {**few, "mhr_heads": a.heads}, "skill average, no router"),
            ("lora few-shot (from multi-task)", "lora (multi-task)", "lora",
             {"rank": a.skills * a.poly_rank, "alpha": 2.0 * a.skills * a.poly_rank}, "multi-task LoRA continued"),
            ("lora few-shot (from scratch)", None, "lora",
             {"rank": a.skills * a.poly_rank, "alpha": 2.0 * a.skills * a.poly_rank}, "no multi-task stage")):
        print(f"{name}: {a.fewshot_rows} rows per held-out task", flush=True)
        c = _adapter(cfg(a.fewshot_steps, a.lr), method, **keys)
        sources = None if source is None else {"previous": (trained[source], {})}
        try:
            _, res = train_run(c, base, TaskBatches(shots, batch, pad_id, seed=a.seed + 3), eval_sets(heldout),
                               a.fewshot_steps, sources)
        except Exception as err:  # noqa: BLE001 - report and go on
            res = {"error": " ".join(str(err).split())[:400]}
        record(name, "few-shot (held-out tasks)", res, note)
    print_table(rows)


def print_table(rows) -> None:
    print(f"\n{'run':34} {'group':28} {'trainable':>10} {'val loss':>8} {'bpb':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['run']:34} {r['group']:28} ERROR {r['error'][:150]}")
            continue
        tr = r.get("params_trainable")
        print(f"{r['run']:34} {r['group']:28} {('-' if tr is None else f'{tr:,}'):>10} "
              f"{r['eval_loss']:8.4f} {r['eval_bits_per_byte']:6.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--out", default=".bench_data/adapters_256.npz")
    pp.add_argument("--seq_len", type=int, default=256)
    pp.add_argument("--batch", type=int, default=16)
    pp.add_argument("--base_steps", type=int, default=1500)
    pp.add_argument("--task_batches", type=int, default=40, help="train batches packed per task")
    pp.add_argument("--eval_batches", type=int, default=4)
    pp.add_argument("--train_tasks", default=TRAIN_TASKS)
    pp.add_argument("--heldout_tasks", default=HELDOUT_TASKS)
    pr = sub.add_parser("run")
    pr.add_argument("--data", default=".bench_data/adapters_256.npz")
    pr.add_argument("--size", default="small", choices=sorted(SIZES))
    pr.add_argument("--dtype", default="auto")
    pr.add_argument("--base_steps", type=int, default=1500)
    pr.add_argument("--ft_task", default="email")
    pr.add_argument("--ft_steps", type=int, default=300)
    pr.add_argument("--mt_steps", type=int, default=400)
    pr.add_argument("--fewshot_steps", type=int, default=100)
    pr.add_argument("--fewshot_rows", type=int, default=32)
    pr.add_argument("--lr", type=float, default=1e-3)
    pr.add_argument("--r_eq", type=int, default=2)
    pr.add_argument("--r_active", type=int, default=8)
    pr.add_argument("--poly_rank", type=int, default=2)
    pr.add_argument("--skills", type=int, default=4)
    pr.add_argument("--heads", type=int, default=4)
    pr.add_argument("--seed", type=int, default=0, help="model init and batch order (the data stay the same)")
    pr.add_argument("--parts", default="single,multi",
                    help="single: LoRA vs MoS, DoRA, PiSSA on --ft_task; multi: multi-task then few-shot")
    pr.add_argument("--json", default="adapter_quality.json")
    a = p.parse_args()
    {"prepare": prepare, "run": run}[a.cmd](a)


if __name__ == "__main__":
    main()
