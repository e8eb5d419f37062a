"""Router quality leaderboard: every causal router of the zoo trained on the same tokens.

    # 1. fix the data (CPU is fine; needs the routezoo data stack): packed rows of the
    #    default stdlib dataset, exactly the batches `routezoo train` would read
    python benchmarks/router_quality.py prepare --out .bench_data/stdlib_512.npz
    # 2. train and evaluate every router on them (a GPU for the default size)
    python benchmarks/router_quality.py run --data .bench_data/stdlib_512.npz [--routers top_k,hash]
    # 3. (optional) join the JSON of several runs, e.g. one per device call
    python benchmarks/router_quality.py merge rq1.json rq2.json --json router_quality.json

Every router trains the same decoder LM (``--size``: ``medium`` is 8 layers, d_model 512,
8 experts of width 1024 in every layer) through routezoo's own ``train_step`` (the one
``routezoo train`` jits), on the same batches in the same order, for the same number of
steps, with the same optimizer; only ``model.moe`` (and, for routers that use a different
number of experts per token, the expert width) changes. The budget held equal is the
**active expert width per token**: ``k · expert_dim = 2 · 1024`` (the dense baseline is an
MLP of width 2048). Routers with ``k = 1`` (hash, THOR) get experts twice as wide; the
dynamic routers (top-p, null experts) are set so that they start near two experts per
token and are reported with the mean they reached; SMoE-Dropout grows ``k`` from 1 to
``E`` over training, as its paper does, and is ranked at ``k = 2`` (its other ``k`` are in
the JSON). Expert choice and Soft MoE look at future tokens and are left out of a causal
LM leaderboard.

Reported per router: validation loss and bits per byte (the ``eval_steps`` batches of the
validation split), total and active parameters, training FLOPs per token
(``zoo.flops_per_token``), mean experts per token (router statistics, last logged step),
training tokens/s (steps 20..N, evaluation time excluded). Writes ``--json`` after every
router (so a cut-off run keeps what finished), a table on stdout and ``--plot`` (validation
loss against steps).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

# name -> (model.moe overrides, other model overrides, note). The budget: k * expert_dim = 2 * F.
def router_setups(f: int, e: int) -> dict[str, tuple[dict, dict, str]]:
    return {
        "dense": ({}, {"ffn": "mlp", "mlp_dim": 2 * f}, "dense MLP of width 2F (same active width)"),
        "top_k": ({"router": "top_k", "k": 2}, {}, "top-2, load balance 0.01, z-loss 1e-3"),
        "hash": ({"router": "hash", "k": 1, "expert_dim": 2 * f, "hash_vocab_size": 258}, {},
                 "k=1, experts 2F wide (2x total params)"),
        "thor": ({"router": "thor", "k": 1, "expert_dim": 2 * f}, {}, "k=1, experts 2F wide; eval: one expert per sequence"),
        "smoe_dropout": ({"router": "smoe_dropout", "smoe_k_start": 1, "smoe_k_end": e, "smoe_eval_k": 2,
                          "smoe_eval_sweep": "auto"},
                         {}, f"k 1 -> {e} linear over training; ranked at eval k=2"),
        "top_p": ({"router": "top_p", "top_p_threshold": 0.4, "top_p_max_k": 4}, {}, "p=0.4, at most 4 experts"),
        "null_experts": ({"router": "null_experts", "k": 4, "num_null_experts": e}, {},
                         f"top-4 over {e} real + {e} null experts"),
        "recurrent": ({"router": "recurrent", "k": 2, "recurrent_dim": 128}, {}, "GRU state 128"),
        "pregate": ({"router": "pregate", "k": 2, "pregate_dim": 128}, {}, "pre-gate width 128, one route for all layers"),
        "duo": ({"router": "duo", "expert_dim": 2 * f, "duo_eval_sweep": "small,skip"}, {}, "big 2F / small / skip, random routing; eval all big"),
        "uoe": ({"router": "uoe", "k": 2}, {}, "selective heads + top-2 of E MLP slices"),
    }


SIZES = {
    # name: (layers, d_model, heads, kv_heads, head_dim, experts, expert_dim)
    "medium": (8, 512, 8, 2, 64, 8, 1024),
    "tiny": (2, 64, 2, 1, 32, 8, 64),          # a CPU smoke test of the script
}


def base_config(size: str, seq_len: int, batch: int, steps: int):
    from routezoo.configs import base
    c = base.get_config()
    layers, d, h, kv, hd, e, f = SIZES[size]
    m = c.model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = layers, d, h, kv, hd
    m.ffn, m.mlp_dim = "moe", 4 * d
    m.moe.num_experts, m.moe.k, m.moe.expert_dim = e, 2, f
    m.moe.dispatch = "dropless"
    m.moe.smoe_k_steps = steps
    m.moe.smoe_eval_sweep = ""
    c.data.seq_len = seq_len
    c.train.batch_size, c.train.steps = batch, steps
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 2e-3, max(steps // 20, 1)
    return c


# --------------------------------------------------------------------------- data


def prepare(a) -> None:
    """Packed rows [N, L+1] (uint16) of the train split and of the validation split."""
    from routezoo.training import data as data_lib
    c = base_config("tiny", a.seq_len, a.batch, a.steps)
    c.train.eval_steps = a.eval_batches
    data_lib.ensure_dataset(c.data)
    tok = data_lib.get_tokenizer(c.data)
    it = data_lib.make_train_iterator(c)
    train = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1) for b, _ in
                            zip(it, range(a.steps))])
    evals = [np.concatenate([b["inputs"], b["targets"][:, -1:]], 1) for b in data_lib.eval_batches(c)]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    np.savez_compressed(a.out, train=train.astype(np.uint16), eval=np.concatenate(evals).astype(np.uint16),
                        token_bytes=np.asarray(tok.token_bytes, np.int32), pad_id=tok.pad_id,
                        batch=a.batch)
    print(f"wrote {a.out}: train {train.shape}, eval {len(evals)} batches, {os.path.getsize(a.out) / 2**20:.1f} MiB")


def batches(rows: np.ndarray, batch: int, pad_id: int):
    """The i-th batch of ``routezoo train`` from its packed rows (cycled)."""
    n = rows.shape[0] // batch

    def get(i: int) -> dict[str, np.ndarray]:
        r = rows[(i % n) * batch:(i % n + 1) * batch].astype(np.int32)
        return {"inputs": r[:, :-1], "targets": r[:, 1:], "weights": (r[:, 1:] != pad_id).astype(np.float32)}
    return get, n


# --------------------------------------------------------------------------- training


def train_one(config, data, steps: int, eval_every: int, log=print) -> dict:
    import jax
    from flax import linen as nn
    from jax.sharding import NamedSharding

    from routezoo import zoo
    from routezoo.layers import sharding as shd
    from routezoo.layers.moe import validate_moe_config
    from routezoo.training.optim import make_optimizer
    from routezoo.training.train import (create_state, describe_model, eval_variants, make_eval_step,
                                         make_train_step, mesh_and_rules, state_shardings)

    if "moe" in zoo.ffn_kinds(config.model):
        validate_moe_config(config.model.moe, causal=True, mesh_shape={})
    mesh, rules = mesh_and_rules(config)
    model = zoo.build(config.model)
    tx, schedule = make_optimizer(config.optimizer, steps)
    pad_id = int(data["pad_id"])
    b = int(config.train.batch_size)
    train_batch, _ = batches(data["train"], b, pad_id)
    eval_rows = data["eval"]
    eval_batch, n_eval = batches(eval_rows, b, pad_id)
    table = data["token_bytes"]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, shardings, boxed = state_shardings(model, tx, config, mesh, rules)
        info = describe_model(boxed, config)
        state = create_state(model, tx, config, shardings)
        bs = NamedSharding(mesh, shd.batch_spec(2))
        step_fn = jax.jit(make_train_step(model, tx, config, schedule), in_shardings=(shardings, bs),
                          out_shardings=(shardings, None), donate_argnums=0)
        eval_fn = jax.jit(make_eval_step(model, table), in_shardings=(shardings, bs))

        def evaluate() -> dict[str, float]:
            s = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
            for i in range(n_eval):
                out = jax.device_get(eval_fn(state, jax.device_put(eval_batch(i), bs)))
                for k in s:
                    s[k] += float(out[k])
            return {"eval_loss": s["nll"] / s["tokens"], "eval_bits_per_byte": s["nll"] / np.log(2) / s["bytes"]}

        curve, t_eval, t0, i0, metrics = [], 0.0, None, 0, None
        t_compile = time.perf_counter()
        for i in range(steps):
            state, metrics = step_fn(state, jax.device_put(train_batch(i), bs))
            if i == 0:
                jax.block_until_ready(metrics)
                t_compile = time.perf_counter() - t_compile
            if i == 19 or (i == 0 and steps <= 20):
                jax.block_until_ready(metrics)
                t0, i0 = time.perf_counter(), i
            if (i + 1) % eval_every == 0 or i + 1 == steps:
                te = time.perf_counter()
                ev = evaluate()
                if t0 is not None:
                    t_eval += time.perf_counter() - te
                curve.append({"step": i + 1, "loss": float(metrics["loss"]), **ev})
                log(f"  step {i + 1}: loss {float(metrics['loss']):.4f} eval {ev['eval_loss']:.4f} "
                    f"bpb {ev['eval_bits_per_byte']:.4f}")
        jax.block_until_ready(state.params)
        elapsed = time.perf_counter() - t0 - t_eval
        # the router's extra evaluations (SMoE-Dropout at several k, Duo-LLM's routes), at the end
        variants = {}
        for suffix, m in eval_variants(config).items():
            eval_fn = jax.jit(make_eval_step(m, table), in_shardings=(shardings, bs))
            variants[suffix] = evaluate()
        last = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
    per_token = [v for k, v in last.items() if k.endswith("/experts_per_token") or k.endswith("/real_experts_per_token")]
    real = [v for k, v in last.items() if k.endswith("/real_experts_per_token")]
    return {**info, **curve[-1], "curve": curve, "compile_s": t_compile,
            "tokens_per_second": b * int(config.data.seq_len) * (steps - 1 - i0) / max(elapsed, 1e-9),
            "experts_per_token": float(np.mean(real or per_token)) if per_token else None,
            "eval_variants": variants,
            "last_train_metrics": last}


def run(a) -> None:
    import jax
    data = dict(np.load(a.data))
    rows = []
    if os.path.exists(a.json) and a.resume:
        rows = json.load(open(a.json))["rows"]
    done = {r["router"] for r in rows}
    layers, d, h, kv, hd, e, f = SIZES[a.size]
    setups = router_setups(f, e)
    names = list(setups) if a.routers == "all" else a.routers.split(",")
    unknown = [n for n in names if n not in setups]
    if unknown:
        raise SystemExit(f"unknown router(s) {unknown}; known: {list(setups)}")
    for name in names:
        if name in done:
            continue
        moe_over, model_over, note = setups[name]
        c = base_config(a.size, int(data["train"].shape[1]) - 1, int(data["batch"]), a.steps)
        c.model.dtype = a.dtype
        c.model.moe.update(moe_over)
        c.model.update(model_over)
        print(f"{name}: {note}", flush=True)
        try:
            r = train_one(c, data, a.steps, a.eval_every)
        except Exception as err:  # noqa: BLE001 - report and go on with the next router
            r = {"error": " ".join(str(err).split())[:400]}
        r.update(router=name, note=note)
        rows.append(r)
        info = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "size": a.size,
                "steps": a.steps, "batch": int(data["batch"]), "seq_len": int(data["train"].shape[1]) - 1,
                "tokens": a.steps * int(data["batch"]) * (int(data["train"].shape[1]) - 1)}
        json.dump({"info": info, "rows": rows}, open(a.json, "w"), indent=1)
    print_table(rows)
    if a.plot:
        plot(rows, a.plot)


def print_table(rows) -> None:
    print(f"\n{'router':13} {'val loss':>8} {'bpb':>6} {'total':>7} {'active':>7} {'GFLOP/tok':>9} "
          f"{'exp/tok':>7} {'tok/s':>9}")
    ok = sorted((r for r in rows if "error" not in r), key=lambda r: r["eval_loss"])
    for r in ok:
        ept = "-" if r["experts_per_token"] is None else f"{r['experts_per_token']:.2f}"
        print(f"{r['router']:13} {r['eval_loss']:8.4f} {r['eval_bits_per_byte']:6.3f} "
              f"{r['params_total'] / 1e6:6.1f}M {r['params_active'] / 1e6:6.1f}M "
              f"{r['flops_per_token_train'] / 1e9:9.3f} {ept:>7} {r['tokens_per_second']:9.0f}")
    for r in rows:
        if "error" in r:
            print(f"{r['router']:13} ERROR {r['error'][:200]}")
    for r in ok:
        for suffix, ev in (r.get("eval_variants") or {}).items():
            print(f"{r['router']}@{suffix}: val loss {ev['eval_loss']:.4f}, bpb {ev['eval_bits_per_byte']:.3f}")


def plot(rows, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.cm.tab20.colors
    for i, r in enumerate(r for r in rows if "curve" in r):
        ax.plot([p["step"] for p in r["curve"]], [p["eval_bits_per_byte"] for p in r["curve"]], label=r["router"],
                color=colors[(2 * i) % 20 + (i >= 10)], linestyle="--" if r["router"] == "dense" else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("validation bits per byte")
    ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge(a) -> None:
    """Joins the JSON of several ``run`` calls (e.g. one per device call) into one."""
    rows, info = [], None
    for path in a.inputs:
        d = json.load(open(path))
        info = info or d["info"]
        if any(d["info"][k] != info[k] for k in ("device", "jax", "size", "steps", "batch", "seq_len")):
            raise SystemExit(f"{path}: run settings {d['info']} differ from {info}")
        rows += [r for r in d["rows"] if r["router"] not in {x["router"] for x in rows}]
    json.dump({"info": info, "rows": rows}, open(a.json, "w"), indent=1)
    print(json.dumps(info))
    print_table(rows)
    if a.plot:
        plot(rows, a.plot)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--out", default=".bench_data/stdlib_512.npz")
    pp.add_argument("--seq_len", type=int, default=512)
    pp.add_argument("--batch", type=int, default=16)
    pp.add_argument("--steps", type=int, default=2000)
    pp.add_argument("--eval_batches", type=int, default=16)
    pr = sub.add_parser("run")
    pr.add_argument("--data", default=".bench_data/stdlib_512.npz")
    pr.add_argument("--routers", default="all")
    pr.add_argument("--size", default="medium", choices=sorted(SIZES))
    pr.add_argument("--steps", type=int, default=2000)
    pr.add_argument("--eval_every", type=int, default=250)
    pr.add_argument("--dtype", default="auto")
    pr.add_argument("--json", default="router_quality.json")
    pr.add_argument("--plot", default="router_quality.png")
    pr.add_argument("--resume", action="store_true", help="keep the routers already in --json")
    pm = sub.add_parser("merge")
    pm.add_argument("inputs", nargs="+")
    pm.add_argument("--json", default="router_quality.json")
    pm.add_argument("--plot", default="router_quality.png")
    a = p.parse_args()
    {"prepare": prepare, "run": run, "merge": merge}[a.cmd](a)


if __name__ == "__main__":
    main()
