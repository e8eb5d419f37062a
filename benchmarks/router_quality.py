"""Router quality leaderboard: every causal router of the zoo trained on the same tokens, at
several seeds, in one shared setting and in each paper's own setting.

    # 1. fix the data (CPU is fine; needs the routezoo data stack): packed rows of a corpus
    #    (--dataset: stdlib, the default, or shakespeare), the batches `routezoo train` reads
    python benchmarks/router_quality.py prepare --out .bench_data/rq_stdlib_512.npz
    # 2. train and evaluate: one call per group (or per few setups), resumable; one JSON per
    #    (setup, seed) row in --out_dir, written as soon as the row is done
    python benchmarks/router_quality.py run --data .bench_data/rq_stdlib_512.npz --group general \
        --seeds 0,1,2 --out_dir benchmarks/results/router_quality_medium_stdlib --resume
    # 3. join the rows of every call: a table per corpus and group (mean and spread over seeds,
    #    the noise band, rows still pending), curves with a band per group
    python benchmarks/router_quality.py merge benchmarks/results/router_quality_medium_* \
        --md router_quality_medium.md --json router_quality_medium.json --plot_dir benchmarks/results

``--seed_batch S`` trains S seeds of a setup at a time as one vectorised program
(``routezoo.training.seeds``; each seed computes what its own run would, to rounding): more
of a GPU busy at this size, nothing gained on a CPU.

A row is one (setup, seed). The seed sets the parameter initialisation, the router's and
dropout's random streams (THOR's draws, jitter) and the training data: which batches of the
prepared train rows are read and in what order (a permutation of the batches by the seed).
All setups read the same batches at the same seed, so differences at one seed are paired;
the validation batches are the same for every row. A setup's seeds share one compiled step.

Setups (:func:`setups`), in two groups:

* ``general``: one shared setting for every router (``--size medium``: 8 layers, d_model 512,
  MoE in every layer with 8 SwiGLU experts of width ``F = 1024``, Switch load balance 0.01
  and z-loss 1e-3 per layer; the budget held equal is the active expert width per token
  ``k · expert_dim = 2F``), with a dense MLP of width ``2F`` (active width matched), a dense
  MLP of width ``E·F`` (total parameters matched to top-2's experts) and Switch top-1
  (experts ``2F`` wide). In this setting some methods' mechanisms are off or pinned; the
  ``papers`` group runs each of them in its own setting.
* ``papers``: AdaMoE, RMoE (two depths, 3x apart), SMoE-Dropout, THOR, top-p and UoE in the
  settings of their papers and code, each with the comparator its paper used (``ref``).

Reported per row: validation loss and bits per byte (curve every ``--eval_every`` steps),
total and active parameters, training FLOPs per token, training tokens/s, and on the
validation batches at the end, per MoE layer: the load of each expert (fraction of token
copies), from which the table shows max/min load and the coefficient of variation
(std/mean) of each layer (mean over layers and the worst layer), and the real experts per
token (mean over layers; null experts and empty top-p slots not counted).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import time

import numpy as np

SIZES = {
    # name: (layers, d_model, heads, kv_heads, head_dim, experts, expert_dim)
    "medium": (8, 512, 8, 2, 64, 8, 1024),
    "tiny": (2, 64, 2, 1, 32, 8, 64),          # CPU
}
DEEP = 3   # RMoE's depth test: the deep setups have DEEP x the size's layers (medium: 8 -> 24)

# RMoE's initial router logits times this (moe.recurrent_logit_scale) in its paper setting:
# the GRU output's RMS is about 0.25 where top-k's router reads a unit-RMS x, so its logits
# start about 3.6x smaller; 3.6 gives top-k's initial logit std (layers/routers/stateful.py).
RMOE_LOGIT_SCALE = 3.6

BASELINES = ("top_k", "dense", "dense_param_matched", "switch_top1", "top_k_mixtral", "top_k_mixtral_d24",
             "switch_top1_thor_layout", "top_k_every2")


# Each paper's claim as a comparison of two setups (the setup first): (paper, claim, setup,
# comparator). The summary gives the paired difference in bits per byte for each.
CLAIMS = (
    ("GShard / Switch (Lepikhin et al. 2020; Fedus et al. 2021)", "top-2 MoE beats a dense MLP of the same active width",
     "top_k", "dense"),
    ("Switch Transformers (Fedus et al. 2021)", "top-1 beats a dense MLP of the same active width", "switch_top1", "dense"),
    ("Hash layers (Roller et al. 2021)", "a fixed hash of the token id routes as well as Switch top-1", "hash", "switch_top1"),
    ("THOR (Zuo et al. 2022)", "random experts with consistency match or beat Switch, in THOR's setting",
     "thor_paper", "switch_top1_thor_layout"),
    ("THOR (Zuo et al. 2022)", "the same in the shared setting", "thor", "switch_top1"),
    ("SMoE-Dropout (Chen et al. 2023)", "all experts of the frozen-router MoE beat a parameter-matched dense model",
     "smoe_dropout_paper", "dense_param_matched"),
    ("AdaMoE (Zeng et al. 2024)", "null experts keep top-2's quality with fewer real experts per token",
     "adamoe_paper", "top_k_mixtral"),
    ("Top-p routing (Huang et al. 2024)", "beats top-2 with fewer experts per token, in its layout",
     "top_p_paper", "top_k_every2"),
    ("RMoE (Qiu et al. 2024)", "the recurrent router beats per-layer top-k (shallow)", "rmoe_paper_d8", "top_k_mixtral"),
    ("RMoE (Qiu et al. 2024)", "the recurrent router beats per-layer top-k (3x deeper)", "rmoe_paper_d24",
     "top_k_mixtral_d24"),
    ("Read-ME (Cai et al. 2024)", "one pre-computed route for all layers keeps top-k's quality", "pregate", "top_k"),
    ("UoE (Yang et al. 2025)", "beats the best MoE, the authors' operator", "uoe_authors", "top_k"),
    ("UoE (Yang et al. 2025)", "beats the best MoE, gates multiplying outputs", "uoe", "top_k"),
    ("UoE (Yang et al. 2025)", "selective attention against all heads (ablation)", "uoe_authors", "uoe_all_heads"),
)


def even_layers(n: int) -> str:
    """``model.ffn`` with MoE in layers 0, 2, 4, ... (THOR's and top-p's layout)."""
    return ",".join("moe" if i % 2 == 0 else "mlp" for i in range(n))


def setups(size: str) -> dict[str, dict]:
    """name -> {group, moe, model, note, ref}: ``moe``/``model`` override the size's base
    config (:func:`base_config`), ``ref`` is the row the setup is compared with."""
    layers, d, _, _, _, e, f = SIZES[size]
    deep = DEEP * layers
    r = d // 2   # RMoE's state width: 256 at d_model 512, as the authors' default
    # HF-Mixtral's router loss, the setting of RMoE's and AdaMoE's code: one balance loss of
    # weight 0.001 over all layers' tokens, i.e. 0.001 / Z per layer here (Z MoE layers,
    # each adding its own), and no z-loss
    def mix(z):
        return {"load_balance_coef": 1e-3 / z, "z_loss_coef": 0.0}

    def s(group, moe, model=None, note="", ref="top_k"):
        return {"group": group, "moe": moe, "model": model or {}, "note": note, "ref": ref}
    return {
        # ------------------------------------------------------------ the shared setting
        "top_k": s("general", {"router": "top_k", "k": 2}, note="top-2, load balance 0.01, z-loss 1e-3", ref=""),
        "dense": s("general", {}, {"ffn": "mlp", "mlp_dim": 2 * f}, f"dense MLP of width 2F={2 * f} (active width matched)"),
        "dense_param_matched": s("general", {}, {"ffn": "mlp", "mlp_dim": e * f},
                                 f"dense MLP of width E*F={e * f} (the experts' parameters; router's D*E not matched)"),
        "switch_top1": s("general", {"router": "top_k", "k": 1, "expert_dim": 2 * f},
                         note=f"Switch top-1, raw probability weight, experts 2F={2 * f} wide"),
        "hash": s("general", {"router": "hash", "k": 1, "expert_dim": 2 * f, "hash_vocab_size": 258},
                  note="k=1, experts 2F wide, balanced id -> expert table"),
        "thor": s("general", {"router": "thor", "k": 1, "expert_dim": 2 * f},
                  note="k=1, experts 2F wide, a draw per token, consistency 1, CE on one pass; eval: one expert per sequence"),
        "smoe_dropout": s("general", {"router": "smoe_dropout", "smoe_k_start": 1, "smoe_k_end": e, "smoe_eval_k": 2,
                                      "smoe_eval_sweep": "auto"}, note=f"k 1 -> {e} linear, frozen random router; eval k=2"),
        "top_p": s("general", {"router": "top_p", "top_p_threshold": 0.4, "top_p_max_k": 4},
                   note="p=0.4, at most 4 experts, dynamic loss 1e-4"),
        "null_experts": s("general", {"router": "null_experts", "k": 4, "num_null_experts": e},
                          note=f"top-4 over {e} real + {e} null experts"),
        "recurrent": s("general", {"router": "recurrent", "k": 2, "recurrent_dim": d // 4}, note=f"GRU state {d // 4}"),
        "pregate": s("general", {"router": "pregate", "k": 2, "pregate_dim": d // 4},
                     note=f"pre-gate width {d // 4}, one route for all layers"),
        "duo": s("general", {"router": "duo", "expert_dim": 2 * f, "duo_eval_sweep": "small,skip"},
                 note="big 2F / small / skip, random routing; eval all big"),
        "uoe": s("general", {"router": "uoe", "k": 2},
                 note="selective heads + top-2 of E MLP slices, gates multiply outputs"),
        # ------------------------------------------------------------ each paper's own setting
        "top_k_mixtral": s("papers", {"router": "top_k", "k": 2, **mix(layers)},
                           note=f"top-2, load balance 0.001 over all layers (0.001/{layers} per layer), no z-loss "
                                "(the HF-Mixtral setting of RMoE's and AdaMoE's code)",
                           ref=""),
        "adamoe_paper": s("papers", {"router": "null_experts", "k": 4, "num_null_experts": 2 * e, **mix(layers)},
                          note=f"AdaMoE: top-4 over {e} real + {2 * e} null, load balance as top_k_mixtral",
                          ref="top_k_mixtral"),
        "rmoe_paper_d8": s("papers", {"router": "recurrent", "k": 2, "recurrent_dim": r,
                                      "recurrent_logit_scale": RMOE_LOGIT_SCALE, **mix(layers)},
                           note=f"RMoE: GRU state {r}, initial logits x{RMOE_LOGIT_SCALE}, load balance as top_k_mixtral, "
                                f"{layers} layers",
                           ref="top_k_mixtral"),
        "top_k_mixtral_d24": s("papers", {"router": "top_k", "k": 2, **mix(deep)}, {"num_layers": deep},
                               note=f"top_k_mixtral at {deep} layers (0.001/{deep} per layer)", ref=""),
        "rmoe_paper_d24": s("papers", {"router": "recurrent", "k": 2, "recurrent_dim": r,
                                       "recurrent_logit_scale": RMOE_LOGIT_SCALE, **mix(deep)}, {"num_layers": deep},
                            note=f"rmoe_paper_d8 at {deep} layers", ref="top_k_mixtral_d24"),
        "smoe_dropout_paper": s("papers", {"router": "smoe_dropout", "smoe_k_start": e // 2, "smoe_k_end": e,
                                           "smoe_eval_k": e, "smoe_eval_sweep": "auto"},
                                note=f"SMoE-Dropout: k {e // 2} -> {e} linear, evaluated with all {e} experts",
                                ref="dense_param_matched"),
        "switch_top1_thor_layout": s("papers", {"router": "top_k", "k": 1, "num_experts": 2, "expert_dim": 2 * f,
                                                "z_loss_coef": 0.0}, {"ffn": even_layers(layers)},
                                     note="Switch top-1, 2 experts 2F wide in layers 0, 2, ..., load balance 0.01",
                                     ref=""),
        "thor_paper": s("papers", {"router": "thor", "k": 1, "num_experts": 2, "expert_dim": 2 * f,
                                   "thor_train_level": "batch", "thor_ce_both": True, "thor_consistency_coef": 2.5},
                        {"ffn": even_layers(layers)},
                        note="THOR: 2 experts 2F wide in layers 0, 2, ..., one draw per pass, mean CE of both passes + "
                             "2.5 x symmetric KL (the authors' CE1 + CE2 + 5 x symKL, halved); eval one expert per sequence",
                        ref="switch_top1_thor_layout"),
        "top_k_every2": s("papers", {"router": "top_k", "k": 2, "z_loss_coef": 0.0}, {"ffn": even_layers(layers)},
                          note="top-2 in layers 0, 2, ..., load balance 0.01, no z-loss", ref=""),
        "top_p_paper": s("papers", {"router": "top_p", "top_p_threshold": 0.4, "top_p_max_k": 0,
                                    "top_p_entropy_coef": 1e-4, "z_loss_coef": 0.0}, {"ffn": even_layers(layers)},
                         note="top-p: p=0.4 over all experts, load balance 0.01, dynamic loss 1e-4, layers 0, 2, ...",
                         ref="top_k_every2"),
        "uoe_authors": s("papers", {"router": "uoe", "k": 2, "uoe_gate_in_output": False},
                         note="UoE, the authors' operator: gates only select (heads and slices)"),
        "uoe_all_heads": s("papers", {"router": "uoe", "k": 2, "uoe_gate_in_output": False, "uoe_attention": "all"},
                           note="uoe_authors with heads attending over all tokens (outputs kept where chosen)"),
    }


def base_config(size: str, seq_len: int, batch: int, steps: int):
    from routezoo.configs import base
    c = base.get_config()
    layers, d, h, kv, hd, e, f = SIZES[size]
    m = c.model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = layers, d, h, kv, hd
    m.ffn, m.mlp_dim = "moe", 2 * f     # dense layers of mixed layouts at the MoE's active width
    m.moe.num_experts, m.moe.k, m.moe.expert_dim = e, 2, f
    m.moe.dispatch = "dropless"
    m.moe.smoe_k_steps = steps
    m.moe.smoe_eval_sweep = ""
    c.data.seq_len = seq_len
    c.train.batch_size, c.train.steps = batch, steps
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 2e-3, max(steps // 20, 1)
    return c


def setup_config(name: str, size: str, seq_len: int, batch: int, steps: int):
    """The config of setup ``name``; a key this checkout lacks is a one-line ``KeyError``."""
    spec = setups(size)[name]
    c = base_config(size, seq_len, batch, steps)
    for where, over in (("moe", spec["moe"]), ("model", spec["model"])):
        target = c.model.moe if where == "moe" else c.model
        missing = [k for k in over if k not in target]
        if missing:
            raise KeyError(f"model.{'moe.' if where == 'moe' else ''}{missing[0]} is not a config key of this checkout")
        target.update(over)
    return c


# --------------------------------------------------------------------------- data


def prepare(a) -> None:
    """Packed rows [N, L+1] (uint16) of the train split and of the validation split."""
    from routezoo.training import data as data_lib
    c = base_config("tiny", a.seq_len, a.batch, a.steps)
    c.data.name = a.dataset
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
                        batch=a.batch, dataset=a.dataset)
    print(f"wrote {a.out}: {a.dataset}, train {train.shape}, eval {len(evals)} batches, "
          f"{os.path.getsize(a.out) / 2**20:.1f} MiB")


def batches(rows: np.ndarray, batch: int, pad_id: int, order: np.ndarray | None = None):
    """The i-th batch (of ``order``, default in turn) of the packed rows, cycled."""
    n = rows.shape[0] // batch

    def get(i: int) -> dict[str, np.ndarray]:
        j = int(order[i % n]) if order is not None else i % n
        r = rows[j * batch:(j + 1) * batch].astype(np.int32)
        return {"inputs": r[:, :-1], "targets": r[:, 1:], "weights": (r[:, 1:] != pad_id).astype(np.float32)}
    return get, n


# --------------------------------------------------------------------------- training

STAT_KEY = re.compile(r"^layer(\d+)/(load|experts_per_token|real_experts_per_token|attn/load)$")


def train_setup(config, data, seeds: list[int], steps: int, eval_every: int, on_row, log=print,
                eval_batch: int = 64, seed_batch: int = 1) -> None:
    """Trains ``config`` once per seed; ``on_row(seed, result)`` after each group of seeds.

    ``seed_batch`` seeds at a time train as one vectorised program
    (:mod:`routezoo.training.seeds`: the state stacked on a seed axis, the step under
    ``jax.vmap``; each seed computes what its own run would, to rounding), so a small model
    fills more of the accelerator; groups of the same size share one compiled step.
    Validation runs on all prepared validation rows, ``eval_batch`` rows per call.
    """
    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from jax.sharding import NamedSharding

    from routezoo import zoo
    from routezoo.layers import sharding as shd
    from routezoo.layers.moe import validate_moe_config
    from routezoo.training.optim import make_optimizer
    from routezoo.training.seeds import create_stacked_state, stacked_shardings, stacked_step
    from routezoo.training.train import (cross_entropy, describe_model, eval_variants, make_train_step,
                                         mesh_and_rules, state_shardings)

    if "moe" in zoo.ffn_kinds(config.model):
        validate_moe_config(config.model.moe, causal=True, mesh_shape={})
    mesh, rules = mesh_and_rules(config)
    model = zoo.build(config.model)
    tx, schedule = make_optimizer(config.optimizer, steps)
    pad_id = int(data["pad_id"])
    b = int(config.train.batch_size)
    eb = min(eval_batch, data["eval"].shape[0])
    eval_get, n_eval = batches(data["eval"], eb, pad_id)
    if n_eval * eb != data["eval"].shape[0]:
        raise ValueError(f"--eval_batch {eval_batch} does not divide the {data['eval'].shape[0]} validation rows")
    if seed_batch < 1:
        raise ValueError(f"--seed_batch must be at least 1, got {seed_batch}")
    table = jnp.asarray(data["token_bytes"], jnp.float32)

    def make_eval(m):
        def ev(state, batch):
            logits, aux = m.apply({"params": state.params, **state.model_state}, batch["inputs"], deterministic=True)
            nll, _ = cross_entropy(logits, batch["targets"], batch["weights"])
            stats = {k: v for k, v in aux.get("stats", {}).items() if STAT_KEY.match(k)}
            return {"nll": nll.sum(), "tokens": batch["weights"].sum(),
                    "bytes": (table[batch["targets"]] * batch["weights"]).sum(), "stats": stats}
        # every seed of the stack on the same validation batch
        return lambda state, batch: jax.vmap(ev, in_axes=(0, None))(state, batch)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, shardings, boxed = state_shardings(model, tx, config, mesh, rules)
        info = describe_model(boxed, config)
        bs = NamedSharding(mesh, shd.batch_spec(2))   # validation batches (shared by the seeds)
        sbs, sst = stacked_shardings(bs), stacked_shardings(shardings)   # train batches and state, per seed
        step_fn = jax.jit(stacked_step(make_train_step(model, tx, config, schedule)), in_shardings=(sst, sbs),
                          out_shardings=(sst, None), donate_argnums=0)
        eval_fn = jax.jit(make_eval(model), in_shardings=(sst, bs))
        variant_fns = {s: jax.jit(make_eval(m), in_shardings=(sst, bs)) for s, m in eval_variants(config).items()}

        def evaluate(state, fn, n_seeds, with_stats=False) -> list[dict]:
            s = [{"nll": 0.0, "tokens": 0.0, "bytes": 0.0} for _ in range(n_seeds)]
            layer_stats: list[dict[int, dict[str, list]]] = [{} for _ in range(n_seeds)]
            for i in range(n_eval):
                out = jax.device_get(fn(state, jax.device_put(eval_get(i), bs)))
                for j in range(n_seeds):
                    for k in s[j]:
                        s[j][k] += float(out[k][j])
                    for k, v in out["stats"].items():
                        layer, name = STAT_KEY.match(k).groups()
                        layer_stats[j].setdefault(int(layer), {}).setdefault(name, []).append(
                            np.asarray(v[j], np.float64))
            res = [{"eval_loss": t["nll"] / t["tokens"], "eval_bits_per_byte": t["nll"] / math.log(2) / t["bytes"]}
                   for t in s]
            if with_stats:
                for r, st in zip(res, layer_stats):
                    r.update(summarize_layer_stats(st))
            return res

        t_compile = None
        for g0 in range(0, len(seeds), seed_batch):
            group = seeds[g0:g0 + seed_batch]
            n = len(group)
            state = create_stacked_state(model, tx, config, shardings, group)
            readers = [batches(data["train"], b, pad_id,
                               np.random.default_rng(int(seed)).permutation(len(data["train"]) // b))
                       for seed in group]
            n_train = readers[0][1]

            def train_batch(i):   # seed j reads its own order of the train batches
                parts = [get(i) for get, _ in readers]
                return {k: np.stack([p[k] for p in parts]) for k in parts[0]}

            curves, t_eval, t0, i0, metrics = [[] for _ in group], 0.0, None, 0, None
            tc = time.perf_counter()
            for i in range(steps):
                state, metrics = step_fn(state, jax.device_put(train_batch(i), sbs))
                if i == 0 and t_compile is None:
                    jax.block_until_ready(metrics)
                    t_compile = time.perf_counter() - tc
                if i == 19 or (i == 0 and steps <= 20):
                    jax.block_until_ready(metrics)
                    t0, i0 = time.perf_counter(), i
                if (i + 1) % eval_every == 0 or i + 1 == steps:
                    jax.block_until_ready(metrics)   # the training steps' time stays out of t_eval
                    te = time.perf_counter()
                    evs = evaluate(state, eval_fn, n, with_stats=i + 1 == steps)
                    if t0 is not None:
                        t_eval += time.perf_counter() - te
                    loss = np.asarray(jax.device_get(metrics["loss"]))
                    for j, seed in enumerate(group):
                        curves[j].append({"step": i + 1, "loss": float(loss[j]), "eval_loss": evs[j]["eval_loss"],
                                          "eval_bits_per_byte": evs[j]["eval_bits_per_byte"]})
                        log(f"  seed {seed} step {i + 1}: loss {float(loss[j]):.4f} "
                            f"bpb {evs[j]['eval_bits_per_byte']:.4f}")
            jax.block_until_ready(state.params)
            elapsed = time.perf_counter() - t0 - t_eval
            variants = {s: evaluate(state, fn, n) for s, fn in variant_fns.items()}
            host = jax.device_get(metrics)
            for j, seed in enumerate(group):
                last = {k: float(np.mean(v[j])) for k, v in host.items() if np.ndim(v) == 1}
                # each seed's share of the group's throughput (the group trains n x the tokens)
                on_row(seed, {**info, **evs[j], "curve": curves[j], "compile_s": t_compile,
                              "tokens_per_second": b * int(config.data.seq_len) * (steps - 1 - i0) / max(elapsed, 1e-9),
                              "seeds_in_program": n, "train_batches_available": n_train,
                              "eval_variants": {s: v[j] for s, v in variants.items()}, "last_train_metrics": last})


def summarize_layer_stats(layer_stats: dict[int, dict[str, list]]) -> dict:
    """Per MoE layer, over the validation batches: the load of each expert (each batch's
    load weighted by its token copies), experts per token; the imbalance of each layer."""
    loads, heads, ept = [], [], []
    for layer in sorted(layer_stats):
        st = layer_stats[layer]
        per_tok = st.get("real_experts_per_token") or st.get("experts_per_token")
        if per_tok:
            ept.append(float(np.mean(per_tok)))
        if "load" in st:
            w = np.asarray(per_tok) if per_tok else np.ones(len(st["load"]))
            counts = np.sum(np.stack(st["load"]) * w[:, None], axis=0)
            loads.append((counts / max(counts.sum(), 1e-12)).tolist())
        if "attn/load" in st:
            heads.append(np.mean(np.stack(st["attn/load"]), axis=0).tolist())
    return {"moe_layers": sorted(layer_stats), "layer_loads": loads, "head_loads": heads,
            "experts_per_token_layers": ept,
            "real_experts_per_token": float(np.mean(ept)) if ept else None, **imbalance(loads)}


def imbalance(loads: list[list[float]]) -> dict:
    """max/min load and coefficient of variation of each layer's load vector; mean and worst."""
    if not loads:
        return {}
    ratio = [max(l) / min(l) if min(l) > 0 else math.inf for l in loads]
    cv = [float(np.std(l) / np.mean(l)) for l in loads]
    return {"load_max_min": ratio, "load_cv": cv,
            "load_max_min_mean": float(np.mean(ratio)), "load_max_min_worst": float(max(ratio)),
            "load_cv_mean": float(np.mean(cv)), "load_cv_worst": float(max(cv))}


def row_path(out_dir: str, name: str, seed: int) -> str:
    return os.path.join(out_dir, f"{name}__seed{seed}.json")


def run(a) -> None:
    import jax
    data = dict(np.load(a.data))
    corpus = str(data.get("dataset", "stdlib"))
    seq_len, batch = int(data["train"].shape[1]) - 1, int(data["batch"])
    steps = a.steps or (2000 if a.size == "medium" else 600)
    eval_every = a.eval_every or max(steps // 10, 1)
    out_dir = a.out_dir or os.path.join("benchmarks", "results", f"router_quality_{a.size}_{corpus}")
    os.makedirs(out_dir, exist_ok=True)
    table = setups(a.size)
    if a.setups:
        names = a.setups.split(",")
    else:
        names = [n for n, s in table.items() if a.group in ("all", s["group"])]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown setup(s) {unknown}; known: {list(table)}")
    seeds = [int(s) for s in a.seeds.split(",")]
    info = {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform, "jax": jax.__version__,
            "size": a.size, "corpus": corpus, "steps": steps, "batch": batch, "seq_len": seq_len,
            "tokens": steps * batch * seq_len, "eval_tokens": int(data["eval"].shape[0]) * seq_len,
            "dtype": a.dtype, "tag": a.tag}

    def done(name, seed):
        p = row_path(out_dir, name, seed)
        return a.resume and os.path.exists(p) and "error" not in json.load(open(p))

    for name in names:
        todo = [s for s in seeds if not done(name, s)]
        if not todo:
            continue
        spec = table[name]
        print(f"{name} (seeds {todo}): {spec['note']}", flush=True)

        def write(seed, r, name=name, spec=spec):
            r.update(setup=name, seed=seed, group=spec["group"], note=spec["note"], ref=spec["ref"], info=info)
            json.dump(r, open(row_path(out_dir, name, seed), "w"), indent=1)
            if "error" not in r:
                print(f"  {name} seed {seed}: bpb {r['eval_bits_per_byte']:.4f}, real experts/token "
                      f"{r.get('real_experts_per_token')}, tok/s {r['tokens_per_second']:.0f}", flush=True)
        try:
            c = setup_config(name, a.size, seq_len, batch, steps)
            c.model.dtype = a.dtype
            train_setup(c, data, todo, steps, eval_every, write, log=print if a.verbose else (lambda *_: None),
                        eval_batch=a.eval_batch, seed_batch=a.seed_batch)
        except Exception as err:  # noqa: BLE001 - record the error and go on with the next setup
            msg = f"{type(err).__name__}: {' '.join(str(err).split())[:400]}"
            print(f"  {name}: ERROR {msg}", flush=True)
            for s in todo:
                if not (os.path.exists(row_path(out_dir, name, s)) and "error" not in json.load(open(row_path(out_dir, name, s)))):
                    write(s, {"error": msg})


# --------------------------------------------------------------------------- summary


def load_rows(paths: list[str]) -> list[dict]:
    files = []
    for p in paths:
        files += sorted(glob.glob(os.path.join(p, "*__seed*.json"))) if os.path.isdir(p) else [p]
    return [json.load(open(f)) for f in files]


def kendall_tau(a: list[float], b: list[float]) -> float:
    n, s = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            s += np.sign(a[i] - a[j]) * np.sign(b[i] - b[j])
    return float(s / max(n * (n - 1) / 2, 1))


def paired_by_seed(a: dict, b: dict) -> dict[int, float]:
    """``{seed: a's bits per byte - b's}`` over the seeds both setups ran, in ``a``'s order."""
    return {s: a["bpb"][a["seeds"].index(s)] - b["bpb"][b["seeds"].index(s)] for s in a["seeds"] if s in b["seeds"]}


def summarize(rows: list[dict], size: str) -> dict:
    """Per corpus: per setup mean/spread over seeds, the noise band, differences against
    each setup's ``ref``, and how settled the ranking of each group is."""
    table = setups(size)
    out = {}
    for corpus in sorted({r["info"]["corpus"] for r in rows}, key=lambda c: (c != "stdlib", c)):
        rs = [r for r in rows if r["info"]["corpus"] == corpus and r["info"]["size"] == size]
        info = next(r["info"] for r in rs)
        per = {}
        for name, spec in table.items():
            ok = sorted((r for r in rs if r["setup"] == name and "error" not in r), key=lambda r: r["seed"])
            errs = [r["error"] for r in rs if r["setup"] == name and "error" in r]
            if not ok:
                per[name] = {"status": "error" if errs else "pending", "error": errs[0] if errs else None,
                             "group": spec["group"], "note": spec["note"], "ref": spec["ref"]}
                continue
            bpb = np.array([r["eval_bits_per_byte"] for r in ok])
            mean_of = lambda k: (float(np.mean([r[k] for r in ok])) if all(r.get(k) is not None for r in ok)
                                 else None)
            steps = [p["step"] for p in ok[0]["curve"]]
            curves = np.array([[p["eval_bits_per_byte"] for p in r["curve"]] for r in ok if len(r["curve"]) == len(steps)])
            per[name] = {
                "status": "done", "group": spec["group"], "note": spec["note"], "ref": spec["ref"],
                "seeds": [r["seed"] for r in ok], "bpb": bpb.tolist(), "bpb_mean": float(bpb.mean()),
                "bpb_min": float(bpb.min()), "bpb_max": float(bpb.max()),
                "bpb_std": float(bpb.std(ddof=1)) if len(bpb) > 1 else None,
                "eval_loss_mean": mean_of("eval_loss"),
                "params_total": ok[0]["params_total"], "params_active": ok[0]["params_active"],
                "flops_per_token_train": ok[0]["flops_per_token_train"],
                "tokens_per_second": mean_of("tokens_per_second"),
                "real_experts_per_token": mean_of("real_experts_per_token"),
                "load_max_min_mean": mean_of("load_max_min_mean"), "load_max_min_worst": mean_of("load_max_min_worst"),
                "load_cv_mean": mean_of("load_cv_mean"), "load_cv_worst": mean_of("load_cv_worst"),
                "eval_variants": {s: float(np.mean([r["eval_variants"][s]["eval_bits_per_byte"] for r in ok]))
                                  for s in ok[0].get("eval_variants", {})},
                "curve_steps": steps, "curve_mean": curves.mean(0).tolist(), "curve_min": curves.min(0).tolist(),
                "curve_max": curves.max(0).tolist(),
            }
        ranges = {n: per[n]["bpb_max"] - per[n]["bpb_min"] for n in BASELINES
                  if per.get(n, {}).get("status") == "done" and len(per[n]["seeds"]) > 1}
        band = max(ranges.values()) if ranges else None
        top_std = per.get("top_k", {}).get("bpb_std")

        def verdict(delta: float) -> str | None:
            return None if band is None else ("beyond" if abs(delta) > band else "within")

        for name, p in per.items():
            ref = per.get(p["ref"]) if p["ref"] else None
            if p["status"] == "done" and ref and ref["status"] == "done":
                p["delta"] = p["bpb_mean"] - ref["bpb_mean"]
                p["delta_paired"] = list(paired_by_seed(p, ref).values())
                p["verdict"] = verdict(p["delta"])
        claims = []
        for paper, claim, a_name, b_name in CLAIMS:
            pa, pb = per.get(a_name, {}), per.get(b_name, {})
            c = {"paper": paper, "claim": claim, "setup": a_name, "ref": b_name}
            if pa.get("status") == "done" and pb.get("status") == "done":
                c.update(delta=pa["bpb_mean"] - pb["bpb_mean"], paired=list(paired_by_seed(pa, pb).values()),
                         experts=(pa["real_experts_per_token"], pb["real_experts_per_token"]))
                c["verdict"] = verdict(c["delta"])
            claims.append(c)
        growth = [c for c in claims if c["setup"] in ("rmoe_paper_d8", "rmoe_paper_d24") and "paired" in c]
        if len(growth) == 2:   # RMoE: does the gain grow with depth (difference of the paired differences)
            d8, d24 = growth
            g8, g24 = (paired_by_seed(per[c["setup"]], per[c["ref"]]) for c in (d8, d24))
            delta = d24["delta"] - d8["delta"]
            claims.append({"paper": d8["paper"], "claim": "the gain grows with depth (deep minus shallow difference)",
                           "setup": f"{d24['setup']} - {d24['ref']}", "ref": f"{d8['setup']} - {d8['ref']}",
                           "delta": delta, "paired": [g24[s] - g8[s] for s in g24 if s in g8],
                           "experts": None, "verdict": verdict(delta)})
        settle = {}
        for group in ("general", "papers"):
            done = [n for n, p in per.items() if p["group"] == group and p["status"] == "done"]
            if len(done) < 3:
                continue
            steps = per[done[0]]["curve_steps"]
            done = [n for n in done if per[n]["curve_steps"] == steps]
            final = [per[n]["curve_mean"][-1] for n in done]
            at = {}
            for frac in (0.5, 0.75):
                j = max(0, int(round(frac * len(steps))) - 1)
                mid = [per[n]["curve_mean"][j] for n in done]
                swaps = [(x, y) for i, x in enumerate(done) for y in done[i + 1:]
                         if np.sign(per[x]["curve_mean"][j] - per[y]["curve_mean"][j])
                         != np.sign(per[x]["curve_mean"][-1] - per[y]["curve_mean"][-1])
                         and band is not None and abs(per[x]["curve_mean"][-1] - per[y]["curve_mean"][-1]) > band]
                at[str(steps[j])] = {"kendall_tau": kendall_tau(mid, final), "swaps_beyond_noise": swaps}
            settle[group] = at
        out[corpus] = {"info": info, "setups": per, "noise_band": band, "baseline_ranges": ranges, "claims": claims,
                       "top_k_2std": None if top_std is None else 2 * top_std, "settle": settle}
    return out


def fmt(v, spec=".3f", none="-"):
    if v is None:
        return none
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def markdown(summary: dict, size: str) -> str:
    lines = []
    for corpus, s in summary.items():
        info = s["info"]
        lines.append(f"### {size}, corpus `{corpus}`\n")
        lines.append(f"{info['steps']} steps of {info['batch']} x {info['seq_len']} tokens "
                     f"({info['tokens'] / 1e6:.2f}M tokens), validation {info['eval_tokens']:,} tokens; "
                     f"device {info['device']}, jax {info['jax']}.")
        band = s["noise_band"]
        rng = ", ".join(f"{n} {v:.3f}" for n, v in s["baseline_ranges"].items())
        lines.append(f"Noise band: **{fmt(band)}** bits per byte, the largest seed range (max - min) among the "
                     f"baseline rows ({rng}); 2 x top_k's std: {fmt(s['top_k_2std'])}. A difference against the "
                     f"row's `ref` larger than the band is marked **beyond**, otherwise *within*.\n")
        for group in ("general", "papers"):
            per = {n: p for n, p in s["setups"].items() if p["group"] == group}
            lines.append(f"**{group}**\n")
            lines.append("| setup | bits/byte mean | min..max (std) | vs ref (paired per seed) | ref | total / active params "
                         "| real experts/token | load max/min mean (worst layer) | load CV mean (worst) | tokens/s | seeds |")
            lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
            done = sorted((n for n, p in per.items() if p["status"] == "done"), key=lambda n: per[n]["bpb_mean"])
            for n in done:
                p = per[n]
                d = p.get("delta")
                vs = "-" if d is None else (f"{d:+.3f} " + ("**beyond**" if p.get("verdict") == "beyond" else "*within*")
                                            + " (" + ", ".join(f"{x:+.3f}" for x in p["delta_paired"]) + ")")
                lines.append(
                    f"| `{n}` | {p['bpb_mean']:.3f} | {p['bpb_min']:.3f}..{p['bpb_max']:.3f} ({fmt(p['bpb_std'])}) | {vs} "
                    f"| {p['ref'] or '-'} | {p['params_total'] / 1e6:.2f}M / {p['params_active'] / 1e6:.2f}M "
                    f"| {fmt(p['real_experts_per_token'], '.2f')} "
                    f"| {fmt(p['load_max_min_mean'], '.2f')} ({fmt(p['load_max_min_worst'], '.2f')}) "
                    f"| {fmt(p['load_cv_mean'], '.2f')} ({fmt(p['load_cv_worst'], '.2f')}) "
                    f"| {fmt(p['tokens_per_second'], ',.0f')} | {len(p['seeds'])} |")
            for n, p in per.items():
                if p["status"] != "done":
                    why = "pending" if p["status"] == "pending" else f"pending (error: {p['error'][:120]})"
                    lines.append(f"| `{n}` | {why} | | | {p['ref'] or '-'} | | | | | | 0 |")
            lines.append("")
            notes = "; ".join(f"`{n}`: {per[n]['note']}" for n in per)
            lines.append(f"Setups: {notes}.\n")
            extra = [f"`{n}`@{k}: {v:.3f}" for n in done for k, v in per[n]["eval_variants"].items()]
            if extra:
                lines.append("Extra evaluations of the same weights (bits/byte, mean over seeds): " + ", ".join(extra) + ".\n")
            st = s["settle"].get(group)
            if group == "papers":
                lines.append("**each paper's claim** (difference in bits per byte, setup minus comparator; "
                             "negative: the setup is better)\n")
                lines.append("| paper | claim | setup vs comparator | difference (paired per seed) | noise | "
                             "real experts/token |")
                lines.append("| --- | --- | --- | --- | --- | --- |")
                for c in s["claims"]:
                    if "delta" not in c:
                        lines.append(f"| {c['paper']} | {c['claim']} | `{c['setup']}` vs `{c['ref']}` | pending | | |")
                        continue
                    ex = c.get("experts")
                    ex = "-" if not ex else f"{fmt(ex[0], '.2f')} vs {fmt(ex[1], '.2f')}"
                    lines.append(f"| {c['paper']} | {c['claim']} | `{c['setup']}` vs `{c['ref']}` | {c['delta']:+.3f} ("
                                 + ", ".join(f"{x:+.3f}" for x in c["paired"]) + f") | {c['verdict'] or '-'} | {ex} |")
                lines.append("")
            if st:
                lines.append("Ranking against the end (mean over seeds): " + "; ".join(
                    f"at step {k}: Kendall tau {v['kendall_tau']:.2f}, pairs swapping with a final gap beyond noise: "
                    + (", ".join(f"{x}/{y}" for x, y in v["swaps_beyond_noise"]) or "none") for k, v in st.items()) + ".\n")
    return "\n".join(lines)


def plot(summary: dict, size: str, plot_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for corpus, s in summary.items():
        for group in ("general", "papers"):
            per = {n: p for n, p in s["setups"].items() if p["group"] == group and p["status"] == "done"}
            if not per:
                continue
            fig, ax = plt.subplots(figsize=(8, 5))
            colors = plt.cm.tab20.colors
            lo = min(min(p["curve_min"]) for p in per.values())
            finals = sorted(p["curve_mean"][-1] for p in per.values())
            for i, (n, p) in enumerate(sorted(per.items(), key=lambda kv: kv[1]["bpb_mean"])):
                col = colors[(2 * i) % 20 + (i >= 10)]
                ls = "--" if n in BASELINES else "-"
                ax.plot(p["curve_steps"], p["curve_mean"], color=col, ls=ls, lw=1.3,
                        label=f"{n} ({p['bpb_mean']:.3f})")
                ax.fill_between(p["curve_steps"], p["curve_min"], p["curve_max"], color=col, alpha=0.18, lw=0)
            ax.set_xlabel("step")
            ax.set_ylabel("validation bits per byte (mean over seeds, band min..max)")
            ax.set_ylim(lo - 0.05, finals[-1] + 3 * max(finals[-1] - finals[0], 0.1))
            ax.set_title(f"router quality, {size}, {corpus}, {group}")
            ax.legend(fontsize=7, ncol=2)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = os.path.join(plot_dir, f"router_quality_{size}_{corpus}_{group}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def merge(a) -> None:
    """Joins the row JSONs of several ``run`` calls: summary JSON, markdown tables, plots."""
    rows = load_rows(a.inputs)
    if not rows:
        raise SystemExit("no rows found")
    sizes = {r["info"]["size"] for r in rows}
    if len(sizes) > 1:
        raise SystemExit(f"rows of several sizes {sorted(sizes)}: merge one size at a time")
    size = sizes.pop()
    for corpus in {r["info"]["corpus"] for r in rows}:
        rs = [r for r in rows if r["info"]["corpus"] == corpus]
        keys = ("steps", "batch", "seq_len", "dtype")
        first = rs[0]["info"]
        bad = [r for r in rs if any(r["info"][k] != first[k] for k in keys)]
        if bad:
            raise SystemExit(f"{corpus}: rows with other settings than {first} (e.g. {bad[0]['setup']} seed "
                             f"{bad[0]['seed']}: {bad[0]['info']})")
    summary = summarize(rows, size)
    md = markdown(summary, size)
    print(md)
    if a.md:
        open(a.md, "w").write(md + "\n")
    if a.json:
        json.dump(summary, open(a.json, "w"), indent=1)
    if a.plot_dir:
        for p in plot(summary, size, a.plot_dir):
            print("wrote", p)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--out", default=".bench_data/rq_stdlib_512.npz")
    pp.add_argument("--dataset", default="stdlib", help="data.name: stdlib | shakespeare | ...")
    pp.add_argument("--seq_len", type=int, default=512)
    pp.add_argument("--batch", type=int, default=16)
    pp.add_argument("--steps", type=int, default=2000)
    pp.add_argument("--eval_batches", type=int, default=16)
    pr = sub.add_parser("run")
    pr.add_argument("--data", default=".bench_data/rq_stdlib_512.npz")
    pr.add_argument("--group", default="all", choices=("general", "papers", "all"))
    pr.add_argument("--setups", "--routers", default="", help="comma-separated setups (instead of --group)")
    pr.add_argument("--seeds", default="0,1,2")
    pr.add_argument("--size", default="medium", choices=sorted(SIZES))
    pr.add_argument("--steps", type=int, default=0, help="0: 2000 (medium), 600 (tiny)")
    pr.add_argument("--eval_every", type=int, default=0, help="0: a tenth of the steps")
    pr.add_argument("--eval_batch", type=int, default=64, help="validation rows per call (must divide them)")
    pr.add_argument("--dtype", default="auto")
    pr.add_argument("--seed_batch", type=int, default=1,
                    help="seeds trained together as one vectorised program (each seed computes what its own "
                         "run would, to rounding); more fills a GPU better at this size")
    pr.add_argument("--out_dir", default="", help="row JSONs; default benchmarks/results/router_quality_SIZE_CORPUS")
    pr.add_argument("--resume", action="store_true", help="skip rows already in --out_dir (rows with errors rerun)")
    pr.add_argument("--tag", default="", help="free text stored with every row (e.g. the commit)")
    pr.add_argument("--verbose", action="store_true", help="print every evaluation")
    pm = sub.add_parser("merge")
    pm.add_argument("inputs", nargs="+", help="--out_dir folders or row JSON files")
    pm.add_argument("--md", default="")
    pm.add_argument("--json", default="")
    pm.add_argument("--plot_dir", default="")
    a = p.parse_args()
    {"prepare": prepare, "run": run, "merge": merge}[a.cmd](a)


if __name__ == "__main__":
    main()
