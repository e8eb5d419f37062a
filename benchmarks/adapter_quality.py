"""Adapter quality: every adapter method of routezoo against its paper's small-scale claim,
on the same tokens through routezoo's train_step, each method at its own best learning rate
(a sweep, chosen on validation), its best-validation checkpoint, over several seeds.

    # 1. fix the data (CPU; needs the routezoo data stack): packed rows of the whole corpus
    #    (pre-training) and of each task (a top-level stdlib package, data.tasks)
    python benchmarks/adapter_quality.py prepare --out .bench_data/adapters_256.npz
    # 2. per seed: pre-train a base, then train and evaluate every adapter on it (a GPU for
    #    the default size; --size tiny on a CPU)
    python benchmarks/adapter_quality.py run --data .bench_data/adapters_256.npz --seeds 0,1,2 \\
        --json adapter_quality.json
    # a cut-off run goes on where it stopped; runs of several machines join into one JSON
    python benchmarks/adapter_quality.py run ... --resume
    python benchmarks/adapter_quality.py merge a.json b.json --json adapter_quality.json

Protocol (every row):

- **Learning rate**: a sweep per method (``--lrs``; default three rates a factor 3 apart
  around a centre per method family, :data:`LR_FAMILIES`), because the methods' update
  scales differ (LoRA at ``alpha = 2r`` scales its product by 2, Poly/MHR by ``1/r``: 4x
  apart at rank 2). The rate is held in the optimizer state (:func:`with_runtime_lr`), so
  every rate of a sweep runs the same compiled step (and, with a persistent compilation
  cache, every seed too).
- **Checkpoint**: validation every ``--eval_every`` steps (and at step 0); a row reports
  the best validation point and its step, the test score there, and the last step's.
  Each task's validation rows are split in two halves: the first selects the step and
  the learning rate, the second (test) is the reported score.
- **Seeds**: ``--seeds`` (model init, adapter init and batch order; the data stay the
  same). Each seed pre-trains its own base. The summary reports, per method at the
  learning rate with the best mean validation over seeds, the mean, standard deviation and
  range of the test bits per byte, and a noise band: the median over methods of the
  spread across seeds of a method's gain over its own seed's base.

What runs, per seed (every adapter on the same frozen base, AdamW, no weight decay):

1. **Base**: a dense decoder LM (``--size``) pre-trained for ``--base_steps`` on the whole
   corpus (every package, the held-out ones included: the adapters learn to specialise,
   not to see new text).
2. **Single task** (``--ft_task``): LoRA at rank ``r_eq``, MoS at active rank ``r`` with
   LoRA ``r_eq``'s parameters, LoRA at rank ``r`` (MoS paper: MoS beats LoRA at ``r_eq`` and
   approaches LoRA at ``r``); DoRA and PiSSA at rank ``r_eq``; Hydra with parallel and
   sequential ranks summing to ``r_eq`` at LoRA's scale (about LoRA ``r_eq``'s parameters;
   Hydra paper: it beats LoRA at matched parameters).
3. **Per-task LoRA**: one LoRA per training task (rank ``--task_rank``), each evaluated on
   its own task: the per-task baseline of the multi-task methods, and the library of the
   library methods (each task's LoRA at its best learning rate for that seed).
4. **Multi-task, then few-shot on held-out tasks** (MHR paper): Poly, MHR and one
   multi-task LoRA (task ids ignored) train on the mixed training tasks; then each adapts
   to the held-out tasks from ``--fewshot_rows`` sequences per task: Poly and MHR fine-tune
   skills and a fresh router, MHR-z only the router, MHR-mu the skill average, LoRA
   continues from its multi-task weights; a LoRA trained from scratch on the same few
   shots is the baseline. Expected: MHR >= Poly >= multi-task LoRA, MHR-z close behind.
5. **Library methods** over the per-task LoRAs: ScaLearn trains per-feature scales of all
   of them on ``--ft_task`` (paper: it beats the target-only adapter, here that task's own
   LoRA); PHATGOOSE trains a sigmoid gate per LoRA (swept learning rate, ``--gate_steps``),
   then routes zero-shot per token (paper: beats post-hoc merging, here the mean of the
   library's outputs, and at times multi-task training, here the multi-task LoRA, on
   held-out tasks); GLIDER adds the task-similarity bias (paper: much better than
   PHATGOOSE on held-in tasks at lambda 100, as good on held-out ones at lambda 3).
6. **Compressed from scratch** (STABLE-RPS paper): RPS at compression ``c`` of every
   target matrix, against a dense model with the same number of trained parameters
   (narrower) and a magnitude-pruned model at the same compression (dense for half the
   steps, pruned once to the largest ``c`` of the target weights, trained masked for the
   other half); all three for ``--rps_steps`` on the whole corpus.

Each row is written to ``--json`` as soon as it is done, keyed by (method, lr, seed);
``--resume`` keeps the rows already there, and the parameters that later rows start from
are cached beside the JSON (``--cache``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from typing import Any, NamedTuple

import numpy as np

SIZES = {
    # name: (layers, d_model, heads, kv_heads, head_dim, mlp_dim)
    "small": (8, 384, 6, 2, 64, 1536),     # 8 layers: MoS r=8 at r_eq=2 with one private rank fits
    "tiny": (2, 64, 2, 1, 32, 128),          # CPU size
}
TRAIN_TASKS = "lib2to3,idlelib,distutils,email,multiprocessing,importlib,asyncio"
HELDOUT_TASKS = "tomllib,zoneinfo,turtledemo"
TARGETS = "attn/(q|k|v|o)|mlp/(wi|wg|wo)"
TARGET_RE = re.compile(r"(^|/)(attn/(q|k|v|o)|mlp/(wi|wg|wo))$")
BASE_LR = 2e-3
GRID = (1 / 3, 1.0, 3.0)                    # a sweep: the centre times these
# family: (what uses it, the centre of its sweep)
LR_FAMILIES = {
    "lora": ("LoRA, MoS, DoRA, PiSSA, Hydra, per-task and multi-task LoRA", "--lr"),
    "poly": ("Poly, MHR, MHR-mu (scale 1/r: 4x smaller updates than LoRA at alpha = 2r)", "4 x --lr"),
    "mhr_z": ("MHR-z (router only, which learns at 100x: the card's router rate 0.1 at --lr 1e-3)", "--lr / 10"),
    "scalearn": ("ScaLearn's scales", "3 x --lr"),
    "gate": ("PHATGOOSE gates (and so PHATGOOSE and GLIDER rows)", "--gate_lr"),
    "scratch": ("RPS, the dense model of equal size, the pruned model", "--scratch_lr"),
    # few-shot: many epochs of a few rows from an adapted start, a decade lower
    "fewshot_lora": ("LoRA few-shot (from the multi-task LoRA, and from scratch)", "--lr / 10"),
    "fewshot_poly": ("Poly, MHR, MHR-mu few-shot", "4 x --lr / 10"),
}


def base_config(size: str, seq_len: int, batch: int, steps: int, dims: tuple | None = None):
    from routezoo.configs import base
    c = base.get_config()
    layers, d, h, kv, hd, f = dims or SIZES[size]
    m = c.model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = layers, d, h, kv, hd
    m.ffn, m.mlp_dim = "mlp", f
    m.scan_layers = False   # adapters address layers one by one (adapter runs execute the base unscanned)
    c.data.seq_len = seq_len
    c.train.batch_size, c.train.steps = batch, steps
    c.optimizer.learning_rate, c.optimizer.warmup_steps = BASE_LR, max(steps // 20, 1)
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
    if a.dataset:
        c.data.name = a.dataset
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
                        batch=a.batch, train_tasks=a.train_tasks, heldout_tasks=a.heldout_tasks,
                        dataset=str(c.data.name), **out)
    print(f"wrote {a.out}: " + ", ".join(f"{k} {v.shape[0]}" for k, v in out.items()))


class TaskBatches:
    """Batches of ``batch`` rows with ``task_id``: rows of task ``t`` drawn in turn from
    ``rows[t]`` in an order shuffled by ``seed`` (cycled), the task of each row uniform at
    random (the same seed)."""

    def __init__(self, rows: list[np.ndarray], batch: int, pad_id: int, seed: int = 0):
        self.batch, self.pad_id = batch, pad_id
        self.rng = np.random.default_rng(seed)
        self.rows = [r[self.rng.permutation(len(r))] for r in rows]
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


def split_eval(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A task's validation rows cut in two halves: (validation, test)."""
    h = (len(rows) + 1) // 2
    return rows[:h], rows[h:]


# --------------------------------------------------------------------------- training


class RuntimeLR(NamedTuple):
    inner: Any
    lr: Any


def with_runtime_lr(tx):
    """``tx`` (built at peak learning rate 1) followed by a multiplication by a learning rate
    held in the optimizer state (``RuntimeLR.lr``, set after the state is created): every
    rate of a sweep runs one compiled step. The same updates as ``tx`` built at that rate
    where the update is linear in the peak rate (AdamW without weight decay, as here)."""
    import jax
    import jax.numpy as jnp
    import optax

    def init(params):
        return RuntimeLR(tx.init(params), jnp.ones((), jnp.float32))

    def update(updates, state, params=None):
        u, inner = tx.update(updates, state.inner, params)
        return jax.tree.map(lambda x: x * state.lr.astype(x.dtype), u), RuntimeLR(inner, state.lr)
    return optax.GradientTransformation(init, update)


def evaluate(eval_fn, state, batch_size, eval_sets, batch_sharding, extra=()) -> dict[str, dict[str, list]]:
    """``{'val' | 'test': {task: [nll, tokens, bytes]}}`` of ``eval_fn(state, batch, *extra)``
    on each task's two halves; the task id of a task is its index in ``eval_sets['tasks']``."""
    import jax
    out = {"val": {}, "test": {}}
    b, pad = int(batch_size), eval_sets["pad_id"]
    for task_id, (name, val_rows, test_rows) in enumerate(eval_sets["tasks"]):
        for split, rows in (("val", val_rows), ("test", test_rows)):
            s = np.zeros(3)
            for i in range(0, len(rows), b):
                r = rows[i:i + b].astype(np.int32)
                if len(r) < b:
                    r = np.concatenate([r, np.full((b - len(r), r.shape[1]), pad, np.int32)])
                batch = {"inputs": r[:, :-1], "targets": r[:, 1:], "weights": (r[:, 1:] != pad).astype(np.float32),
                         "task_id": np.full((b,), task_id, np.int32)}
                res = jax.device_get(eval_fn(state, jax.device_put(batch, batch_sharding), *extra))
                s += [float(res["nll"]), float(res["tokens"]), float(res["bytes"])]
            out[split][name] = s.tolist()
    return out


def bpb(sums: dict[str, list], tasks=None) -> float:
    """Bits per byte over ``tasks`` (all when None) of ``{task: [nll, tokens, bytes]}``."""
    v = np.sum([s for t, s in sums.items() if tasks is None or t in tasks], axis=0)
    return float(v[0] / math.log(2) / max(v[2], 1.0))


def _count(tree) -> int:
    import jax
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def train_run(config, base, batches, eval_sets, steps, lr, eval_every, sources=None, init_params=None,
              edit=None, mask=None, log=print):
    """Trains ``config`` for ``steps`` at peak learning rate ``lr``: an adapter run over
    ``base`` (its frozen parameters; None: the config's random init, RPS's template), or,
    without ``config.adapter.method``, a plain run (from ``init_params`` when given; ``mask``
    multiplies the parameters after every step: a pruned model). ``edit`` changes the
    initial parameters (jitted). Validation at step 0, every ``eval_every`` steps and at
    the last; ``steps = 0`` evaluates only. Returns (best-validation params, last params,
    result)."""
    import jax
    from flax import linen as nn
    from jax.sharding import NamedSharding

    from routezoo import zoo
    from routezoo.layers import adapters as adapter_lib
    from routezoo.layers import sharding as shd
    from routezoo.training import train as T

    o = config.optimizer
    if o.name != "adamw" or float(o.weight_decay) or float(o.learning_rate) != 1.0:
        raise ValueError("train_run: AdamW without weight decay at optimizer.learning_rate=1 (the rate is lr)")
    t_start = time.perf_counter()
    mesh, rules = T.mesh_and_rules(config)
    model = zoo.build(config.model)
    adapter = adapter_lib.from_config(T.adapter_config(config)) if config.adapter.method else None
    tx, schedule = T.optimizer_for(config, adapter)
    tx = with_runtime_lr(tx)
    table = np.asarray(eval_sets["token_bytes"])
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        bs = NamedSharding(mesh, shd.batch_spec(1))
        if adapter is None:
            _, shardings, _ = T.state_shardings(model, tx, config, mesh, rules)
            state = T.create_state(model, tx, config, shardings)
            if init_params is not None:   # the given parameters, a fresh optimizer
                params = jax.device_put(init_params, shardings.params)
                state = state.replace(params=params, opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(
                    params))
            extra, extra_shard = (), ()
            n = _count(state.params)
            if mask is not None:
                n -= int(sum(np.size(m) - np.count_nonzero(m) for m in jax.tree.leaves(mask)))
            info = {"params_trainable": n, "params_total": n}
        else:
            _, shardings, setup = T.adapter_state_shardings(model, tx, config, mesh, rules, adapter, sources)
            base_dev = (T.load_base(model, config, setup, mesh, rules) if base is None
                        else jax.device_put(base, setup.base_shardings))
            meta = T.adapter_metadata(config, setup, base_dev)
            state = T.create_adapter_state(model, tx, config, shardings, setup, sources, base=base_dev)
            extra, extra_shard = (base_dev,), (setup.base_shardings,)
            info = {k: meta[k] for k in ("params_trainable", "params_adapter", "params_base")}
        if edit is not None:
            state = state.replace(params=jax.jit(edit, out_shardings=shardings.params)(state.params))
        state = state.replace(opt_state=state.opt_state._replace(
            lr=jax.device_put(np.float32(lr), shardings.opt_state.lr)))
        step_fn = jax.jit(T.make_train_step(model, tx, config, schedule, adapter),
                          in_shardings=(shardings, bs, *extra_shard), out_shardings=(shardings, None),
                          donate_argnums=0)
        eval_fn = jax.jit(T.make_eval_step(model, table, adapter), in_shardings=(shardings, bs, *extra_shard))
        if mask is not None:
            mask = jax.device_put(mask, shardings.params)
            apply_mask = jax.jit(lambda s, m: s.replace(params=jax.tree.map(lambda p, k: p * k, s.params, m)),
                                 donate_argnums=0)

        curve, best, t_eval = [], {}, 0.0

        def do_eval(step):
            nonlocal t_eval
            t = time.perf_counter()
            ev = evaluate(eval_fn, state, config.train.batch_size, eval_sets, bs, extra)
            v, te = bpb(ev["val"]), bpb(ev["test"])
            curve.append([step, round(v, 5), round(te, 5)])
            if not best or v < best["val_bpb"]:
                best.update(step=step, val_bpb=v, test_bpb=te, sums=ev, params=jax.device_get(state.params))
            t_eval += time.perf_counter() - t
            return ev

        last = do_eval(0)
        metrics, t0, i0 = None, None, 0
        for i in range(steps):
            state, metrics = step_fn(state, jax.device_put(batches(), bs), *extra)
            if mask is not None:
                state = apply_mask(state, mask)
            if i == min(4, steps - 1):
                jax.block_until_ready(metrics)
                t0, i0, e0 = time.perf_counter(), i, t_eval
            if (i + 1) % eval_every == 0 or i + 1 == steps:
                last = do_eval(i + 1)
        tps = None
        if steps > 1:
            jax.block_until_ready(state.params)
            elapsed = time.perf_counter() - t0 - (t_eval - e0)
            tps = int(config.train.batch_size) * int(config.data.seq_len) * (steps - 1 - i0) / max(elapsed, 1e-9)
        last_params = jax.device_get(state.params)
    res = {**info, "steps": steps, "eval_every": eval_every, "best_step": best["step"],
           "val_bpb": best["val_bpb"], "test_bpb": best["test_bpb"], "last_val_bpb": curve[-1][1],
           "last_test_bpb": curve[-1][2], "sums_best": best["sums"], "sums_last": last, "curve": curve,
           "train_loss": None if metrics is None else float(metrics["loss"]), "tokens_per_second": tps,
           "wall_s": round(time.perf_counter() - t_start, 1)}
    return best["params"], last_params, res


def _adapter(c, method: str, **keys):
    c.adapter.method, c.adapter.targets = method, TARGETS
    for k, v in keys.items():
        c.adapter[k] = v
    return c


def lr_grids(a) -> dict[str, list[float]]:
    """Per family the rates of its sweep: ``GRID`` around its centre, or ``--lrs``
    (``family=r1,r2,r3``, or ``r1,r2,r3`` for every family)."""
    centre = {"lora": a.lr, "poly": 4 * a.lr, "mhr_z": a.lr / 10, "scalearn": 3 * a.lr, "gate": a.gate_lr,
              "scratch": a.scratch_lr, "fewshot_lora": a.lr / 10, "fewshot_poly": 4 * a.lr / 10}
    grids = {f: [float(f"{c * g:.3g}") for g in GRID] for f, c in centre.items()}
    for item in a.lrs or []:
        fam, _, rates = item.rpartition("=")
        values = [float(r) for r in rates.split(",") if r.strip()]
        for f in ([fam] if fam else list(grids)):
            if f not in grids:
                raise SystemExit(f"--lrs {item!r}: unknown family {f!r}; known: {', '.join(grids)}")
            grids[f] = values
    return grids


def equal_size_dims(size: str, target: int, seq_len: int, batch: int) -> tuple[tuple, int]:
    """A narrower dense model of ``size``'s depth whose parameter count is nearest ``target``:
    (dims, count). Widths in steps of 4, head size half the width, MLP twice it."""
    import jax

    from routezoo import zoo
    from routezoo.training import train as T
    layers, d0, h, kv, _, _ = SIZES[size]
    best = None
    for d in range(8, d0 + 1, 4):
        dims = (layers, d, h, kv, d // h, 2 * d)
        c = base_config(size, seq_len, batch, 1, dims)
        shapes = jax.eval_shape(T.init_variables(zoo.build(c.model), c), jax.random.PRNGKey(0))["params"]
        n = _count(T.strip_boxes(shapes))
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (dims, n)
    return best


def magnitude_mask(params, compression: float):
    """1 for the largest ``ceil(c·n)`` magnitudes over all target matrices together (global
    magnitude pruning), 0 for the rest; 1 everywhere else."""
    from flax import traverse_util
    flat = traverse_util.flatten_dict(params, sep="/")
    targets = [p for p, v in flat.items() if TARGET_RE.search(p) and np.ndim(v) >= 2]
    mags = np.concatenate([np.abs(np.asarray(flat[p], np.float32)).ravel() for p in targets])
    keep = int(math.ceil(compression * mags.size))
    thr = np.partition(mags, mags.size - keep)[mags.size - keep]
    mask = {p: ((np.abs(np.asarray(v, np.float32)) >= thr) if p in targets else np.ones(np.shape(v))).astype(
        np.float32) for p, v in flat.items()}
    return traverse_util.unflatten_dict(mask, sep="/"), keep, mags.size


# --------------------------------------------------------------------------- bookkeeping


def _short(x):
    """Floats to 7 significant digits, in nested rows."""
    if isinstance(x, float):
        return float(f"{x:.7g}")
    if isinstance(x, dict):
        return {k: _short(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_short(v) for v in x]
    return x


def write_json(path: str, info: dict, rows: list[dict]) -> None:
    """``{'info', 'rows'}`` with one row per line (atomically: a cut-off run keeps the last)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write('{"info": ' + json.dumps(info) + ',\n "rows": [\n')
        f.write(",\n".join(json.dumps(_short(r)) for r in rows) + "\n]}\n")
    os.replace(tmp, path)


class Book:
    """The rows of one JSON, keyed by (method, lr, seed); written after every row."""

    def __init__(self, path: str, info: dict, resume: bool):
        self.path, self.info, self.rows = path, info, []
        if resume and os.path.exists(path):
            old = json.load(open(path))
            diff = {k: (old["info"][k], v) for k, v in info.items()   # a sweep may grow: rows carry their rate
                    if k in old["info"] and k not in ("seeds", "device", "jax", "lr_grids") and old["info"][k] != v}
            if diff:
                raise SystemExit(f"--resume: {path} was run with other settings: {diff}")
            self.rows = [r for r in old["rows"] if "error" not in r]
            grids = old["info"].get("lr_grids", {})   # the rates run so far, per family
            info["lr_grids"] = {f: sorted(set(grids.get(f, [])) | set(info["lr_grids"].get(f, [])))
                                for f in dict.fromkeys([*grids, *info["lr_grids"]])}

    @staticmethod
    def key(r) -> tuple:
        return r["method"], float(r["lr"]), int(r["seed"])

    def get(self, method, lr, seed):
        return next((r for r in self.rows if self.key(r) == (method, float(lr), int(seed))), None)

    def add(self, row) -> None:
        self.rows = [r for r in self.rows if self.key(r) != self.key(row)] + [row]
        write_json(self.path, self.info, self.rows)


class Cache:
    """Parameters that later rows start from, one ``.npz`` per (seed, method, lr)."""

    def __init__(self, root: str):
        self.root = root

    def _path(self, seed, method, lr) -> str:
        return os.path.join(self.root, str(seed), re.sub(r"[^A-Za-z0-9_.=-]+", "_", method) + f"@{lr:g}.npz")

    def save(self, seed, method, lr, params) -> None:
        from flax import traverse_util
        path = self._path(seed, method, lr)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path, **{k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()})

    def load(self, seed, method, lr):
        from flax import traverse_util
        path = self._path(seed, method, lr)
        if not os.path.exists(path):
            return None
        with np.load(path) as f:
            return traverse_util.unflatten_dict({k: f[k] for k in f.files}, sep="/")


# --------------------------------------------------------------------------- the run


def run(a) -> None:
    import jax
    data = dict(np.load(a.data))
    pad_id, batch = int(data["pad_id"]), int(data["batch"])
    seq_len = int(data["pretrain"].shape[1]) - 1
    train_tasks, heldout = str(data["train_tasks"]).split(","), str(data["heldout_tasks"]).split(",")
    all_tasks = list(dict.fromkeys(train_tasks + heldout))
    if a.ft_task not in all_tasks:
        raise SystemExit(f"--ft_task {a.ft_task!r} is not among the prepared tasks {all_tasks}")
    seeds = [int(s) for s in str(a.seeds).split(",") if s.strip()]
    parts = set(a.parts.split(","))
    if "library" in parts:
        parts.add("pertask")
    grids = lr_grids(a)
    task_rank = a.task_rank or a.skills * a.poly_rank
    info = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "size": a.size,
            "dataset": str(data.get("dataset", "stdlib")), "batch": batch, "seq_len": seq_len,
            "base_steps": a.base_steps, "ft_steps": a.ft_steps, "mt_steps": a.mt_steps,
            "fewshot_steps": a.fewshot_steps, "fewshot_rows": a.fewshot_rows, "gate_steps": a.gate_steps,
            "rps_steps": a.rps_steps, "rps_compression": a.rps_compression, "eval_every": a.eval_every,
            "fewshot_eval_every": a.fewshot_eval_every,
            "ft_task": a.ft_task, "train_tasks": train_tasks, "heldout_tasks": heldout, "r_eq": a.r_eq,
            "r_active": a.r_active, "poly_rank": a.poly_rank, "skills": a.skills, "heads": a.heads,
            "task_rank": task_rank, "lr_grids": grids, "seeds": seeds}
    book = Book(a.json, info, a.resume)
    cache = Cache(a.cache or os.path.splitext(a.json)[0] + ".params")
    split = {t: split_eval(data[f"eval/{t}"]) for t in all_tasks}

    def cfg(steps, dims=None):
        c = base_config(a.size, seq_len, batch, steps, dims)
        c.model.dtype, c.seed = a.dtype, seed   # the seed of the loop below: inits, dropout, MoS/RPS hashes
        c.adapter.mos_seed = c.adapter.rps_seed = seed
        c.optimizer.learning_rate, c.optimizer.weight_decay = 1.0, 0.0
        return c

    def ev(tasks):
        return {"token_bytes": data["token_bytes"], "pad_id": pad_id,
                "tasks": [(t, *split[t]) for t in tasks]}

    def lib_meta(c, name):
        return {"adapter": c.adapter.to_dict(), "base_fingerprint": None, "directory": name}

    for seed in seeds:
        print(f"=== seed {seed}", flush=True)

        def row(method, group, lr, note, make, keep=False, view=None):
            """One row: run ``make() -> (best params, last params, result)`` unless done; returns
            the best params when ``keep`` (from the cache when the row was done before)."""
            done = book.get(method, lr, seed)
            if done is not None:
                if not keep:
                    return None
                params = cache.load(seed, method, lr)
                if params is not None:
                    return params
            print(f"{method} (lr {lr:g}, seed {seed})", flush=True)
            try:
                best, _, res = make()
            except Exception as err:  # noqa: BLE001 - report and go on
                best, res = None, {"error": " ".join(str(err).split())[:400]}
            r = {"method": method, "group": group, "lr": float(lr), "seed": seed, "note": note,
                 "view": view, **res}
            book.add(r)
            if "error" in r:
                print(f"  ERROR {r['error'][:300]}", flush=True)
            else:
                print(f"  best val {r['val_bpb']:.4f} at step {r['best_step']} (test {r['test_bpb']:.4f}); "
                      f"last val {r['last_val_bpb']:.4f} test {r['last_test_bpb']:.4f}; {r['wall_s']} s", flush=True)
            if keep and best is not None:
                cache.save(seed, method, lr, best)
            return best

        def load(method, lr):
            """A kept row's best params (None when it failed or its cache is gone)."""
            return None if lr is None else cache.load(seed, method, lr)

        def pick(method, lrs):
            """The learning rate of ``method`` with the best validation on this seed."""
            have = [(book.get(method, lr, seed), lr) for lr in lrs]
            have = [(r["val_bpb"], lr) for r, lr in have if r is not None and "error" not in r]
            return min(have)[1] if have else None

        # ---- base
        base = row("base", "base", BASE_LR, "dense LM pre-trained on every package",
                   lambda: train_run(cfg(a.base_steps), None, TaskBatches([data["pretrain"]], batch, pad_id, seed),
                                     ev(all_tasks), a.base_steps, BASE_LR, a.eval_every), keep=True, view=all_tasks)

        # ---- single task
        if "single" in parts:
            r_eq, r_act = a.r_eq, a.r_active
            r_p = max(r_eq // 2, 1)
            r_s = max(r_eq - r_p, 1)
            for name, method, keys, fam, note in (
                    (f"lora r={r_eq}", "lora", {"rank": r_eq, "alpha": 2.0 * r_eq}, "lora",
                     "LoRA at MoS's parameter budget"),
                    (f"mos r={r_act} r_eq={r_eq}", "mos", {"rank": r_act, "alpha": 2.0 * r_act,
                                                         "mos_equiv_rank": r_eq, "mos_private_rank": 1,
                                                         "mos_shards_per_vector": 2}, "lora",
                     "MoS: active rank r, parameters of LoRA r_eq"),
                    (f"lora r={r_act}", "lora", {"rank": r_act, "alpha": 2.0 * r_act}, "lora",
                     "LoRA at MoS's active rank"),
                    (f"dora r={r_eq}", "dora", {"rank": r_eq, "alpha": 2.0 * r_eq}, "lora",
                     "DoRA: LoRA r_eq's parameters plus one magnitude per output unit"),
                    (f"pissa r={r_eq}", "pissa", {"rank": r_eq}, "lora",
                     "PiSSA: LoRA r_eq's trainable parameters from the top-r_eq SVD, scale 1; residual frozen"),
                    (f"hydra r_p={r_p} r_s={r_s}", "hydra", {"rank": r_p, "hydra_seq_rank": r_s, "hydra_scale": 2.0},
                     "lora", "Hydra: parallel + sequential branches, scale 2 (LoRA's alpha/r); about LoRA "
                             "r_eq's parameters")):
                for lr in grids[fam]:
                    row(name, f"single task ({a.ft_task})", lr, note,
                        lambda: train_run(_adapter(cfg(a.ft_steps), method, **keys), base,
                                          TaskBatches([data[f"train/{a.ft_task}"]], batch, pad_id, seed + 1),
                                          ev([a.ft_task]), a.ft_steps, lr, a.eval_every), view=[a.ft_task])

        # ---- per-task LoRA: the baseline and the library
        lora_keys = {"rank": task_rank, "alpha": 2.0 * task_rank}
        library = []
        if "pertask" in parts:
            for t in train_tasks:
                for lr in grids["lora"]:
                    row(f"lora task={t}", "per-task LoRA", lr, f"one LoRA on {t} only, evaluated on {t}",
                        lambda: train_run(_adapter(cfg(a.ft_steps), "lora", **lora_keys), base,
                                          TaskBatches([data[f"train/{t}"]], batch, pad_id, seed + 5), ev([t]),
                                          a.ft_steps, lr, a.eval_every), keep=True, view=[t])
                library.append(load(f"lora task={t}", pick(f"lora task={t}", grids["lora"])))

        # ---- multi-task, then few-shot on held-out tasks
        if "multi" in parts:
            mt_rows = [data[f"train/{t}"] for t in train_tasks]
            shots = [data[f"train/{t}"][:a.fewshot_rows] for t in heldout]
            common = {"rank": a.poly_rank, "poly_skills": a.skills, "num_tasks": len(train_tasks)}
            mt_lora = {"rank": a.skills * a.poly_rank, "alpha": 2.0 * a.skills * a.poly_rank}
            trained = {}
            for name, method, keys, fam in (("poly", "poly", common, "poly"),
                                            ("mhr", "mhr", {**common, "mhr_heads": a.heads}, "poly"),
                                            ("lora (multi-task)", "lora", mt_lora, "lora")):
                for lr in grids[fam]:
                    row(name, "multi-task (train tasks)", lr, f"{len(train_tasks)} tasks mixed",
                        lambda: train_run(_adapter(cfg(a.mt_steps), method, **keys), base,
                                          TaskBatches(mt_rows, batch, pad_id, seed + 2), ev(train_tasks),
                                          a.mt_steps, lr, a.eval_every), keep=True, view=train_tasks)
                lr = pick(name, grids[fam])
                trained[name] = (lr, load(name, lr))
            few = {**common, "num_tasks": len(heldout)}
            for name, source, method, keys, fam, note in (
                    ("poly few-shot", "poly", "poly", few, "fewshot_poly", "skills + new router rows fine-tuned"),
                    ("mhr few-shot", "mhr", "mhr", {**few, "mhr_heads": a.heads}, "fewshot_poly",
                     "skills + new router rows"),
                    ("mhr_z few-shot", "mhr", "mhr_z", {**few, "mhr_heads": a.heads}, "mhr_z",
                     "router only; skills frozen"),
                    ("mhr_mu few-shot", "mhr", "mhr_mu", {**few, "mhr_heads": a.heads}, "fewshot_poly",
                     "skill average, no router"),
                    ("lora few-shot (from multi-task)", "lora (multi-task)", "lora", mt_lora, "fewshot_lora",
                     "multi-task LoRA continued"),
                    ("lora few-shot (from scratch)", None, "lora", mt_lora, "fewshot_lora", "no multi-task stage")):
                src_lr, src = trained.get(source, (None, None))
                if source is not None and src is None:
                    continue
                sources = None if source is None else {"previous": (src, {})}
                for lr in grids[fam]:
                    row(name, "few-shot (held-out tasks)", lr,
                        note + ("" if source is None else f"; from {source} at lr {src_lr:g}"),
                        lambda: train_run(_adapter(cfg(a.fewshot_steps), method, **keys), base,
                                          TaskBatches(shots, batch, pad_id, seed + 3), ev(heldout),
                                          a.fewshot_steps, lr, a.fewshot_eval_every, sources), view=heldout)
            src_lr, src = trained.get("lora (multi-task)", (None, None))
            if src is not None:
                row("lora (multi-task), zero-shot", "zero-shot (held-out tasks)", 0.0,
                    f"the multi-task LoRA (lr {src_lr:g}) on the held-out tasks, untrained there",
                    lambda: train_run(_adapter(cfg(1), "lora", **mt_lora), base, None, ev(heldout), 0, 0.0,
                                      a.eval_every, {"previous": (src, {})}), view=heldout)

        # ---- library methods over the per-task LoRAs
        if "library" in parts and all(p is not None for p in library):
            k = len(train_tasks)
            lora_cfg = _adapter(cfg(1), "lora", **lora_keys)
            lib_sources = {"library": [(p, lib_meta(lora_cfg, t)) for p, t in zip(library, train_tasks)]}
            names = ",".join(train_tasks)
            for lr in grids["scalearn"]:
                row("scalearn", f"transfer ({a.ft_task})", lr,
                    f"per-feature scales over the {k} per-task LoRAs ({a.ft_task}'s included), trained on {a.ft_task}",
                    lambda: train_run(_adapter(cfg(a.ft_steps), "scalearn", library=names), base,
                                      TaskBatches([data[f"train/{a.ft_task}"]], batch, pad_id, seed + 1),
                                      ev([a.ft_task]), a.ft_steps, lr, a.eval_every, lib_sources), view=[a.ft_task])

            def uniform(p):
                import jax.numpy as jnp
                return {**p, "omega": jax.tree.map(lambda w: jnp.full_like(w, 1.0 / k), p["omega"])}
            for view_name, tasks in (("held-out", heldout), ("held-in", train_tasks)):
                row(f"library mean ({view_name})", "zero-shot (held-out tasks)" if view_name == "held-out"
                    else "held-in routing (train tasks)", 0.0,
                    f"the mean of the {k} per-task LoRAs' outputs (ScaLearn's combination at omega = 1/{k}), untrained",
                    lambda: untrained(train_run(_adapter(cfg(1), "scalearn", library=names), base, None, ev(tasks),
                                                0, 0.0, a.eval_every, lib_sources, edit=uniform)), view=tasks)
            # PHATGOOSE gates: one per per-task LoRA, at each gate learning rate
            gate_cfg = lambda: _adapter(cfg(a.gate_steps), "phatgoose_gate", library="lora", **lora_keys)  # noqa: E731
            gates = {}
            for lr in grids["gate"]:
                entries = []
                for t, p in zip(train_tasks, library):
                    entries.append(row(
                        f"phatgoose_gate task={t}", "phatgoose gates", lr, f"the sigmoid gate of {t}'s LoRA (frozen)",
                        lambda: train_run(gate_cfg(), base, TaskBatches([data[f"train/{t}"]], batch, pad_id, seed + 4),
                                          ev([t]), a.gate_steps, lr, a.eval_every,
                                          {"library": [(p, lib_meta(lora_cfg, t))]}), keep=True, view=[t]))
                if all(e is not None for e in entries):
                    gates[lr] = {"library": [(e, lib_meta(gate_cfg(), t)) for e, t in zip(entries, train_tasks)]}
            # GLIDER's global router input: the base's task similarities (per target task)
            sim = {}
            if gates:
                sim = task_similarities(cfg(1), base, data, all_tasks, train_tasks, batch, pad_id)
                print("GLIDER g (cosine to " + ",".join(train_tasks) + "): " +
                      "; ".join(f"{t} " + ",".join(f"{g:.3f}" for g in v) for t, v in sim.items()), flush=True)
            for lr, src in gates.items():
                for view_name, tasks in (("held-out", heldout), ("held-in", train_tasks)):
                    group = "zero-shot (held-out tasks)" if view_name == "held-out" else "held-in routing (train tasks)"
                    row(f"phatgoose ({view_name})", group, lr,
                        f"zero-shot top-2 routing among the {k} gated LoRAs (gates trained at this lr)",
                        lambda: train_run(_adapter(cfg(1), "phatgoose", library=names), base, None, ev(tasks), 0,
                                          0.0, a.eval_every, src), view=tasks)
                    lam = 3.0 if view_name == "held-out" else 100.0
                    row(f"glider lambda={lam:g} ({view_name})", group, lr,
                        f"PHATGOOSE's local router + {lam:g} x the task similarity (the paper's {view_name} lambda)",
                        lambda: per_task_eval(tasks, lambda t: train_run(
                            _adapter(cfg(1), "glider", library=names, glider_lambda=lam,
                                     glider_task_similarity=",".join(f"{g:.6f}" for g in sim[t])),
                            base, None, ev([t]), 0, 0.0, a.eval_every, src), {t: sim[t] for t in tasks}), view=tasks)

        # ---- compressed from scratch: RPS, a dense model of equal size, a magnitude-pruned model
        if "rps" in parts:
            c_rps = a.rps_compression
            pre = lambda: TaskBatches([data["pretrain"]], batch, pad_id, seed + 6)  # noqa: E731
            rps_cfg = lambda steps: _adapter(cfg(steps), "rps", rps_compression=c_rps)  # noqa: E731
            n_rps = rps_count(rps_cfg(1))
            dims, n_dense = equal_size_dims(a.size, n_rps, seq_len, batch)
            half = a.rps_steps // 2
            for lr in grids["scratch"]:
                row(f"rps c={c_rps:g}", "compressed from scratch (all tasks)", lr,
                    f"STABLE-RPS: every target matrix from one shared array of {c_rps:g} x their size; "
                    f"{n_rps:,} trained parameters",
                    lambda: train_run(rps_cfg(a.rps_steps), None, pre(), ev(all_tasks), a.rps_steps, lr,
                                      a.eval_every), view=all_tasks)
                row(f"dense equal size (d={dims[1]})", "compressed from scratch (all tasks)", lr,
                    f"a narrower dense model: {dims}, {n_dense:,} parameters",
                    lambda: train_run(cfg(a.rps_steps, dims), None, pre(), ev(all_tasks), a.rps_steps, lr,
                                      a.eval_every), view=all_tasks)
                row(f"magnitude-pruned c={c_rps:g}", "compressed from scratch (all tasks)", lr,
                    f"dense for {half} steps, the largest {c_rps:g} of the target weights kept (global magnitude), "
                    f"{a.rps_steps - half} steps masked; reported over the masked steps",
                    lambda: pruned_run(cfg, pre(), ev(all_tasks), a.rps_steps, half, lr, a.eval_every, c_rps),
                    view=all_tasks)

    print_summary(book.rows, a)


def untrained(out):
    """An evaluation of a method's combination with its own parameters fixed: 0 trained."""
    best, last, res = out
    return best, last, {**res, "params_trainable": 0}


def per_task_eval(tasks, make_one, similarity):
    """A row whose adapter differs per task (GLIDER's bias): ``make_one(task)`` each, the
    sums joined; ``similarity`` (each task's ``g``) is recorded."""
    parts = [make_one(t)[2] for t in tasks]
    res = dict(parts[0], task_similarity=similarity)
    for key in ("sums_best", "sums_last"):
        res[key] = {s: {t: p[key][s][t] for p, t in zip(parts, tasks)} for s in ("val", "test")}
    res["val_bpb"], res["test_bpb"] = bpb(res["sums_best"]["val"]), bpb(res["sums_best"]["test"])
    res["last_val_bpb"], res["last_test_bpb"] = res["val_bpb"], res["test_bpb"]
    res["curve"] = [[0, round(res["val_bpb"], 5), round(res["test_bpb"], 5)]]
    res["wall_s"] = round(sum(p["wall_s"] for p in parts), 1)
    return None, None, res


def pruned_run(cfg, batches, eval_sets, steps, half, lr, eval_every, compression):
    """Dense for ``half`` steps, global magnitude pruning to ``compression`` of the target
    weights, then ``steps - half`` steps with the mask (a fresh optimizer)."""
    _, dense, first = train_run(cfg(half), None, batches, eval_sets, half, lr, eval_every)
    mask, kept, n = magnitude_mask(dense, compression)
    import jax
    pruned = jax.tree.map(lambda p, m: np.asarray(p) * m, dense, mask)
    best, last, res = train_run(cfg(steps - half), None, batches, eval_sets, steps - half, lr, eval_every,
                                init_params=pruned, mask=mask)
    res["best_step"] += half
    res["curve"] = [[s + half, v, t] for s, v, t in res["curve"]]
    res.update(dense_phase_curve=first["curve"], kept_target_weights=kept, target_weights=n,
               wall_s=round(res["wall_s"] + first["wall_s"], 1))
    return best, last, res


def rps_count(config) -> int:
    """RPS's trainable parameters (shared array + dense leftovers) for ``config``."""
    import jax

    from routezoo import zoo
    from routezoo.layers import adapters as adapter_lib
    from routezoo.training import train as T
    adapter = adapter_lib.from_config(T.adapter_config(config))
    shapes = jax.eval_shape(T.init_variables(zoo.build(config.model), config), jax.random.PRNGKey(0))["params"]
    return int(adapter.count(shapes))


def task_similarities(config, base, data, tasks, library_tasks, batch, pad_id, rows=32) -> dict[str, list]:
    """GLIDER's ``g`` for each target task: the base's cosine similarities of the task's mean
    final hidden state to each library task's (``phatgoose.task_similarity``), from the
    first ``rows`` training rows of each."""
    import jax
    from flax import linen as nn

    from routezoo import zoo
    from routezoo.layers.adapters import phatgoose
    from routezoo.training import train as T
    model = zoo.build(config.model)
    mesh, rules = T.mesh_and_rules(config)

    def batches(t):
        r = data[f"train/{t}"][:rows].astype(np.int32)
        return [{"inputs": r[i:i + batch, :-1], "weights": (r[i:i + batch, 1:] != pad_id).astype(np.float32)}
                for i in range(0, len(r), batch)]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return {t: [float(g) for g in phatgoose.task_similarity(model, base, batches(t),
                                                                [batches(u) for u in library_tasks])]
                for t in tasks}


# --------------------------------------------------------------------------- summary


def _derived_rows(rows) -> list[dict]:
    """The per-task LoRA baseline as one row per (lr, seed): every training task's own LoRA
    (``lora task=T``) on its own task, at each one's best-validation checkpoint, summed."""
    out = []
    per = [r for r in rows if r["method"].startswith("lora task=") and "error" not in r]
    tasks = sorted({r["method"][len("lora task="):] for r in per})
    for lr in sorted({r["lr"] for r in per}):
        for seed in sorted({r["seed"] for r in per}):
            got = [r for r in per if r["lr"] == lr and r["seed"] == seed]
            if len(got) != len(tasks) or not tasks:
                continue
            sums = {k: {s: {t: v for r in got for t, v in r[k][s].items()} for s in ("val", "test")}
                    for k in ("sums_best", "sums_last")}
            out.append({"method": "lora per-task (own task)", "group": "multi-task (train tasks)", "lr": lr,
                        "seed": seed, "view": tasks, "params_trainable": sum(r["params_trainable"] for r in got),
                        "val_bpb": bpb(sums["sums_best"]["val"]), "test_bpb": bpb(sums["sums_best"]["test"]),
                        "last_val_bpb": bpb(sums["sums_last"]["val"]), "last_test_bpb": bpb(sums["sums_last"]["test"]),
                        "best_step": float(np.mean([r["best_step"] for r in got])), **sums})
    return out


def summarize(rows) -> tuple[list[dict], float]:
    """Per method: the learning rate with the best mean validation over the seeds that ran
    every rate, and there the test bits per byte (mean, std, min, max), the last step's, the
    best step, and the spread over seeds of the gain over each seed's base on the same tasks.
    Also the noise band: the median of those spreads."""
    rows = [r for r in rows if "error" not in r]
    base = {r["seed"]: r for r in rows if r["method"] == "base"}
    rows = rows + _derived_rows(rows)
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        lrs = sorted({r["lr"] for r in mine})
        seeds = sorted({r["seed"] for r in mine})
        full = [lr for lr in lrs if {r["seed"] for r in mine if r["lr"] == lr} == set(seeds)]
        if not full:
            continue
        best_lr = min(full, key=lambda lr: np.mean([r["val_bpb"] for r in mine if r["lr"] == lr]))
        at = sorted((r for r in mine if r["lr"] == best_lr), key=lambda r: r["seed"])
        test = np.array([r["test_bpb"] for r in at])
        gains = [r["test_bpb"] - bpb(base[r["seed"]]["sums_best"]["test"], r.get("view"))
                 for r in at if r["seed"] in base and r.get("view")]
        out.append({"method": method, "group": at[0]["group"], "lr": best_lr, "lrs": lrs,
                    "edge": len(lrs) > 1 and best_lr in (lrs[0], lrs[-1]), "seeds": [r["seed"] for r in at],
                    "params_trainable": at[0].get("params_trainable"), "test": test.tolist(),
                    "mean": float(test.mean()), "std": float(test.std(ddof=1)) if len(test) > 1 else 0.0,
                    "min": float(test.min()), "max": float(test.max()),
                    "last": float(np.mean([r["last_test_bpb"] for r in at])),
                    "best_step": float(np.mean([r["best_step"] for r in at])),
                    "base": [bpb(base[r["seed"]]["sums_best"]["test"], r.get("view")) for r in at
                             if r["seed"] in base and r.get("view")],
                    "gain_std": float(np.std(gains, ddof=1)) if len(gains) > 1 else None})
    spreads = [s["gain_std"] for s in out if s["gain_std"] is not None and s["method"] != "base"]
    return out, float(np.median(spreads)) if spreads else float("nan")


def claims(a) -> list[tuple[str, str, str, str, str]]:
    """(paper, claim, kind, method A, method B), A and B paired by seed. ``beats``: A's test
    bits per byte below B's; ``close``: A no worse than B beyond the noise."""
    r_eq, r_act, ft = a["r_eq"], a["r_active"], a["ft_task"]
    r_p = max(r_eq // 2, 1)
    hydra = f"hydra r_p={r_p} r_s={max(r_eq - r_p, 1)}"
    c = f"{a['rps_compression']:g}"
    return [
        ("MoS", f"MoS beats LoRA at r_eq={r_eq}", "beats", f"mos r={r_act} r_eq={r_eq}", f"lora r={r_eq}"),
        ("MoS", f"MoS approaches LoRA at r={r_act}", "close", f"mos r={r_act} r_eq={r_eq}", f"lora r={r_act}"),
        ("DoRA", "DoRA beats LoRA at the same rank", "beats", f"dora r={r_eq}", f"lora r={r_eq}"),
        ("PiSSA", "PiSSA beats LoRA at the same rank", "beats", f"pissa r={r_eq}", f"lora r={r_eq}"),
        ("Hydra", "Hydra beats LoRA at matched parameters", "beats", hydra, f"lora r={r_eq}"),
        ("MHR", "MHR beats Poly (few-shot, held-out)", "beats", "mhr few-shot", "poly few-shot"),
        ("Poly", "Poly beats the multi-task LoRA (few-shot, held-out)", "beats", "poly few-shot",
         "lora few-shot (from multi-task)"),
        ("MHR", "MHR-z close behind MHR (few-shot)", "close", "mhr_z few-shot", "mhr few-shot"),
        ("MHR", "MHR-mu close to MHR (few-shot)", "close", "mhr_mu few-shot", "mhr few-shot"),
        ("ScaLearn", f"ScaLearn beats the target-only adapter ({ft})", "beats", "scalearn", f"lora task={ft}"),
        ("PHATGOOSE", "PHATGOOSE beats merging (library mean), held-out", "beats", "phatgoose (held-out)",
         "library mean (held-out)"),
        ("PHATGOOSE", "PHATGOOSE beats multi-task training, held-out", "beats", "phatgoose (held-out)",
         "lora (multi-task), zero-shot"),
        ("GLIDER", "GLIDER beats PHATGOOSE held-in", "beats", "glider lambda=100 (held-in)", "phatgoose (held-in)"),
        ("GLIDER", "GLIDER keeps PHATGOOSE's held-out quality", "close", "glider lambda=3 (held-out)",
         "phatgoose (held-out)"),
        ("RPS", f"RPS beats a dense model of equal size (c={c})", "beats", f"rps c={c}", None),
        ("RPS", f"RPS beats magnitude pruning (c={c})", "beats", f"rps c={c}", f"magnitude-pruned c={c}"),
    ]


def verdicts(rows, info, band) -> list[dict]:
    """Each claim: per-seed paired differences A - B (negative: A better) at each method's
    best learning rate. ``beats``: 'holds' when every seed has A better and the mean beats
    the noise band, 'reversed' when every seed has B better by a mean beyond the band, else
    'within the noise'. ``close``: 'fails' when every seed has A worse by a mean beyond the
    band, else 'holds'."""
    summ = {s["method"]: s for s in summarize(rows)[0]}
    out = []
    for paper, claim, kind, ma, mb in claims(info):
        if mb is None:   # the dense model of equal size: its name carries its width
            mb = next((m for m in summ if m.startswith("dense equal size")), None)
        if ma not in summ or mb not in summ:
            continue
        sa, sb = summ[ma], summ[mb]
        common = [s for s in sa["seeds"] if s in sb["seeds"]]
        d = np.array([sa["test"][sa["seeds"].index(s)] - sb["test"][sb["seeds"].index(s)] for s in common])
        if len(d) == 0:
            continue
        worse = bool(np.all(d > 0) and d.mean() > band)
        if kind == "close":
            v = "fails" if worse else "holds"
        elif np.all(d < 0) and -d.mean() > band:
            v = "holds"
        else:
            v = "reversed" if worse else "within the noise"
        out.append({"paper": paper, "claim": claim, "kind": kind, "a": ma, "b": mb, "diff": d.tolist(),
                    "mean": float(d.mean()), "verdict": v})
    return out


def print_summary(rows, a=None) -> None:
    info = json.load(open(a.json))["info"] if a is not None and os.path.exists(a.json) else None
    summ, band = summarize(rows)
    print(f"\nbits per byte on each method's test halves, at its best-validation checkpoint and the learning "
          f"rate with the best mean validation; mean ± std [min..max] over seeds; * = best rate at the edge "
          f"of the sweep\nnoise band (median over methods of the spread across seeds of a method's gain over "
          f"its seed's base): {band:.4f}")
    for group in dict.fromkeys(s["group"] for s in summ):
        ref = next((s["base"] for s in summ if s["group"] == group and s["base"]), None)
        print(f"\n{group}" + ("" if ref is None or group == "base" else f" (base, no adapter: {np.mean(ref):.4f})"))
        print(f"  {'method':34} {'trainable':>10} {'lr':>8} {'n':>2} {'test bpb':>17} {'[min..max]':>16} "
              f"{'last':>7} {'step':>6} {'gain sd':>7}")
        for s in (s for s in summ if s["group"] == group):
            tr, gs = s["params_trainable"], s["gain_std"]
            print(f"  {s['method']:34} {('-' if tr is None else f'{tr:,}'):>10} {s['lr']:8.3g}{'*' if s['edge'] else ' '}"
                  f"{len(s['seeds']):2d} {s['mean']:8.4f} ± {s['std']:.4f} [{s['min']:.4f}..{s['max']:.4f}] "
                  f"{s['last']:7.4f} {s['best_step']:6.0f} {('-' if gs is None else f'{gs:.4f}'):>7}")
    for r in rows:
        if "error" in r:
            print(f"ERROR {r['method']} lr {r['lr']:g} seed {r['seed']}: {r['error'][:200]}")
    if info is not None:
        print("\nclaims (A - B per seed; negative: A better)")
        for v in verdicts(rows, info, band):
            print(f"  {v['paper']:9} {v['claim']:52} {v['mean']:+.4f} ({', '.join(f'{x:+.4f}' for x in v['diff'])})"
                  f"  {v['verdict']}")


def merge(a) -> None:
    """Joins the JSON of several ``run`` calls (e.g. one per seed or machine) into one."""
    rows, info = [], None
    for path in a.inputs:
        d = json.load(open(path))
        if info is None:
            info = dict(d["info"])
        diff = {k: (info.get(k), v) for k, v in d["info"].items()
                if k not in ("seeds", "device", "jax") and info.get(k) != v}
        if diff or d["info"].get("device") != info.get("device"):
            raise SystemExit(f"{path}: run settings differ: {diff or d['info'].get('device')}")
        info["seeds"] = sorted(set(info["seeds"]) | set(d["info"]["seeds"]))
        keys = {Book.key(r) for r in rows}
        rows += [r for r in d["rows"] if Book.key(r) not in keys]
    write_json(a.json, info, rows)
    print_summary(rows, a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--out", default=".bench_data/adapters_256.npz")
    pp.add_argument("--dataset", default="", help="data.name of the corpus (default: the config's, stdlib)")
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
    pr.add_argument("--seeds", default="0,1,2", help="model init and batch order (the data stay the same)")
    pr.add_argument("--lr", type=float, default=1e-3, help="centre of the LoRA family's sweep (LR_FAMILIES)")
    pr.add_argument("--gate_lr", type=float, default=5e-3, help="centre of the PHATGOOSE gates' sweep")
    pr.add_argument("--scratch_lr", type=float, default=2e-3, help="centre of the from-scratch sweep (RPS)")
    pr.add_argument("--lrs", nargs="*", help="family=r1,r2,r3 (or r1,r2,r3 for every family) replaces a sweep")
    pr.add_argument("--eval_every", type=int, default=50)
    pr.add_argument("--fewshot_eval_every", type=int, default=10)
    pr.add_argument("--base_steps", type=int, default=1500)
    pr.add_argument("--ft_task", default="email")
    pr.add_argument("--ft_steps", type=int, default=300)
    pr.add_argument("--mt_steps", type=int, default=400)
    pr.add_argument("--fewshot_steps", type=int, default=100)
    pr.add_argument("--fewshot_rows", type=int, default=32)
    pr.add_argument("--gate_steps", type=int, default=100, help="PHATGOOSE gate training (the paper's 100)")
    pr.add_argument("--rps_steps", type=int, default=1500)
    pr.add_argument("--rps_compression", type=float, default=0.1)
    pr.add_argument("--r_eq", type=int, default=2)
    pr.add_argument("--r_active", type=int, default=8)
    pr.add_argument("--poly_rank", type=int, default=2)
    pr.add_argument("--skills", type=int, default=4)
    pr.add_argument("--heads", type=int, default=4)
    pr.add_argument("--task_rank", type=int, default=0, help="per-task LoRAs' rank (0: skills x poly_rank)")
    pr.add_argument("--parts", default="single,pertask,multi,library,rps",
                    help="single: LoRA, MoS, DoRA, PiSSA, Hydra on --ft_task; pertask: one LoRA per training task; "
                         "multi: multi-task then few-shot; library: ScaLearn, PHATGOOSE, GLIDER; rps: compressed "
                         "from scratch")
    pr.add_argument("--json", default="adapter_quality.json")
    pr.add_argument("--cache", default="", help="parameters later rows start from (default: beside --json)")
    pr.add_argument("--resume", action="store_true", help="keep the rows already in --json")
    pm = sub.add_parser("merge")
    pm.add_argument("inputs", nargs="+")
    pm.add_argument("--json", default="adapter_quality.json")
    a = p.parse_args()
    {"prepare": prepare, "run": run, "merge": merge}[a.cmd](a)


if __name__ == "__main__":
    main()
