"""Routing analytics of a trained MoE LM: ``routezoo analyze --workdir DIR [--steps N]``.

Loads the run's newest checkpoint (:func:`~routezoo.training.train.load_trained`), runs
the model in evaluation mode (``deterministic=True``) over ``N`` validation batches
(:func:`~routezoo.training.data.eval_batches`, default ``train.eval_steps``) and records
every MoE layer's routing decision per token. It writes to ``DIR/analysis/``:

=================================  =========================================================
``load.csv``, ``load_counts.csv``  rows = MoE layers, one column per expert: fraction /
                                   number of routed token copies (``-1`` slots not counted,
                                   before any capacity drop; the ``load`` statistic the
                                   model logs). ``load.png``: heatmap layers x experts.
``experts_per_token.csv``          tokens using ``n = 0..K`` experts, per layer; ``routed``
                                   (the router's decision) and, with capacity dispatch,
                                   ``kept@eval`` / ``kept@train`` (after capacity drops).
                                   ``experts_per_token.png``.
``token_specialisation.csv``       per token id seen: count, entropy (nats) of its expert
                                   distribution at each layer (over its routed copies), its
                                   most frequent expert and that expert's share.
``token_specialisation_top.csv``   the ``--top`` most / least specialised token ids (lowest /
                                   highest entropy averaged over layers) among those seen at
                                   least ``--min-count`` times, decoded. ``token_entropy.png``.
``expert_top_tokens.csv``          per layer and expert, its ``--top`` most frequent token ids
                                   (decoded), their share of the expert's copies and the
                                   share of the token's copies that go to this expert.
``drop_by_position.csv``           drop rate of token copies per position in the sequence,
                                   per layer, for each setting: capacity dispatch: ``eval``
                                   (``eval_capacity_factor``, what this forward pass did)
                                   and ``train`` (``capacity_factor``), dropless: one
                                   ``dropless`` setting (0 everywhere). ``drop_by_position.png``.
``affinity.csv``                   P(top-1 expert j at the next MoE layer | top-1 expert i
                                   at this one) per adjacent pair of MoE layers; top-1 = the
                                   token's valid slot with the largest combine weight, before
                                   capacity drops. Rows of unused source experts are empty.
                                   ``affinity_layer{a}_layer{b}.png``: one heatmap per pair.
``summary.json``                   key numbers per layer (load imbalance, experts per token,
                                   drop rates overall / first half / second half of the
                                   sequence, mutual information between token id and expert)
                                   and per layer pair (affinity mutual information).
=================================  =========================================================

Only non-padding tokens (input id != pad id) are counted; padding still takes capacity in
the forward pass, as it does in the model. Dropped copies are recomputed from the captured
routing with the dispatcher's own rule (:func:`routezoo.layers.moe.capacity.capacity_slots`)
and capacity (:func:`routezoo.layers.routers.base.expert_capacity`).

Routing decisions are read without changing the model: Flax's ``capture_intermediates``
records the output (a :class:`~routezoo.layers.routers.base.Routing`) of every router call.
Entropies are in nats; ``H(E|token)`` is a plug-in estimate (biased low for rare tokens).
Single-process only.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import re
import sys
import unicodedata
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from routezoo.layers.routers import Router, Routing, expert_capacity

USAGE = """usage: routezoo analyze --workdir DIR [--steps N] [--top N] [--min-count N] [--out DIR]

  --workdir DIR: a training workdir (config.json + checkpoints/); its newest checkpoint
      is analysed.
  --steps N: validation batches to run (default: the run's train.eval_steps).
  --top N: token ids listed per expert and most/least specialised token ids (default 10).
  --min-count N: a token id needs this many occurrences to enter the most/least
      specialised lists (default 10).
  --out DIR: output folder (default: WORKDIR/analysis).

Writes CSV tables, PNG plots and summary.json (see routezoo.training.analyze).
"""


class AnalyzeError(Exception):
    """A problem with the workdir or the model, reported as one line (exit 2)."""


# ----------------------------------------------------------------------- capture


def moe_layer_indices(model_cfg: Any) -> list[int]:
    """Indices of the layers whose feed-forward slot is an MoE."""
    from routezoo.zoo.lm import ffn_kinds
    return [i for i, kind in enumerate(ffn_kinds(model_cfg)) if kind == "moe"]


def _is_router_call(module: Any, method_name: str) -> bool:
    return method_name == "__call__" and isinstance(module, Router)


def _layer_of(path) -> int | None:
    for key in path:
        m = re.fullmatch(r"layer(\d+)", str(getattr(key, "key", "")))
        if m:
            return int(m.group(1))
    return None


def find_routings(intermediates: Any) -> dict[int, Routing]:
    """``{layer index: Routing}`` from a ``capture_intermediates`` tree.

    Per layer the outermost router call is kept (its first call, if the model ran the
    layer more than once); routers outside ``layer{i}`` modules are numbered in order.
    """
    leaves = jax.tree_util.tree_flatten_with_path(
        intermediates, is_leaf=lambda x: isinstance(x, Routing))[0]
    found: dict[int, tuple[int, Routing]] = {}
    extra = 0
    for path, leaf in leaves:
        if not isinstance(leaf, Routing):
            continue
        layer = _layer_of(path)
        if layer is None:
            layer, extra = 10_000 + extra, extra + 1
        depth = len(path)
        if layer not in found or depth < found[layer][0]:
            found[layer] = (depth, leaf)
    return {layer: r for layer, (_, r) in sorted(found.items())}


def capture_routing(model: Any, variables: dict[str, Any], tokens: jax.Array, *,
                    deterministic: bool = True, rngs: dict[str, jax.Array] | None = None):
    """Runs ``model`` on ``tokens [B, L]`` and returns ``(logits, aux, {layer: Routing})``.

    The model is unchanged: the routers' outputs are captured with Flax's
    ``capture_intermediates``. ``Routing.indices`` / ``weights`` are ``[B·L, K]``.
    """
    (logits, aux), state = model.apply(variables, tokens, deterministic=deterministic, rngs=rngs,
                                       capture_intermediates=_is_router_call,
                                       mutable=["intermediates"])
    return logits, aux, find_routings(state["intermediates"])


def dropped_mask(indices: jax.Array, priority: jax.Array | None, *, num_experts: int,
                 group_size: int, capacity: int, fill: str = "token") -> jax.Array:
    """bool ``[T, K]``: routed copies (``indices >= 0``) that capacity dispatch drops.

    Same rule as the dispatcher: :func:`routezoo.layers.moe.capacity.capacity_slots` per
    routing group of ``group_size`` consecutive tokens, ``capacity`` slots per expert.
    """
    from routezoo.layers.moe.capacity import capacity_slots
    t, k = indices.shape
    g = t // group_size
    idx = jnp.asarray(indices).reshape(g, group_size, k)
    prio = None if priority is None else jnp.asarray(priority).reshape(g, group_size)
    slot, _ = jax.vmap(functools.partial(capacity_slots, num_experts=num_experts,
                                         capacity=capacity, fill=fill))(idx, prio)
    return ((idx >= 0) & (slot >= num_experts * capacity)).reshape(t, k)


def drop_settings(moe_cfg: Any, group_size: int, k: int) -> list[tuple[str, float | None, int | None]]:
    """``(name, capacity_factor, capacity)`` of each drop setting analysed.

    Capacity dispatch: ``eval`` (``eval_capacity_factor``) and ``train``
    (``capacity_factor``); dropless (or expert choice, which never drops): ``dropless``.
    """
    if str(moe_cfg.dispatch) != "capacity" or str(moe_cfg.router) == "expert_choice":
        return [("dropless", None, None)]
    e, mc = int(moe_cfg.num_experts), int(moe_cfg.min_capacity)
    return [(name, float(cf), expert_capacity(group_size, e, k, float(cf), mc))
            for name, cf in (("eval", moe_cfg.eval_capacity_factor), ("train", moe_cfg.capacity_factor))]


def make_forward(model: Any, moe_cfg: Any, seq_len: int) -> Any:
    """Jitted ``(params, model_state, inputs [B, L]) -> {layer: decisions}``.

    ``decisions``: ``indices`` / ``weights`` ``[B, L, K]``, ``dropped`` ``{setting: bool
    [B, L, K]}`` and ``dropped_fraction_diff``: |the model's ``dropped_fraction`` statistic
    - the recomputed one| for the setting this pass ran (a check of the recomputation).
    """
    e = int(moe_cfg.num_experts)
    s = int(moe_cfg.group_size) or seq_len

    def forward(params, model_state, inputs):
        b, l = inputs.shape
        _, aux, routings = capture_routing(model, {"params": params, **model_state}, inputs)
        out = {}
        for layer, r in routings.items():
            k = r.indices.shape[-1]
            dropped = {}
            for name, _, c in drop_settings(moe_cfg, s, k):
                if c is None or r.expert_indices is not None:
                    d = jnp.zeros(r.indices.shape, bool)
                else:
                    d = dropped_mask(r.indices, r.priority, num_experts=e, group_size=s, capacity=c,
                                     fill=str(moe_cfg.capacity_fill))
                dropped[name] = d.reshape(b, l, k)
            # the setting this forward pass ran (eval or dropless), over all tokens, padding
            # included, as the model's own statistic counts: a check of the recomputation
            valid = r.indices >= 0
            ran = dropped[next(iter(dropped))].reshape(-1, k)
            recomputed = jnp.sum(ran & valid) / jnp.maximum(jnp.sum(valid), 1)
            stat = aux["stats"].get(f"layer{layer}/dropped_fraction", jnp.zeros((), jnp.float32))
            out[layer] = {"indices": r.indices.reshape(b, l, k),
                          "weights": r.weights.astype(jnp.float32).reshape(b, l, k),
                          "dropped": dropped,
                          "dropped_fraction_diff": jnp.abs(recomputed - stat)}
        return out

    return jax.jit(forward)


# ------------------------------------------------------------------- accumulate


class _PairCounter:
    """Counts of int64 keys, kept sparse (unique keys and their counts)."""

    def __init__(self) -> None:
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, keys: np.ndarray) -> None:
        if keys.size:
            self._parts.append(np.unique(keys.astype(np.int64), return_counts=True))
        if len(self._parts) > 32:
            self._parts = [self.result()]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        keys = np.concatenate([p[0] for p in self._parts])
        counts = np.concatenate([p[1] for p in self._parts])
        u, inv = np.unique(keys, return_inverse=True)
        return u, np.bincount(inv, weights=counts, minlength=len(u)).astype(np.int64)


def top1_expert(indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Expert of the valid slot with the largest weight (first on ties), -1 if none."""
    w = np.where(indices >= 0, weights, -np.inf)
    slot = np.argmax(w, axis=-1)
    top = np.take_along_axis(indices, slot[..., None], axis=-1)[..., 0]
    return np.where(np.any(indices >= 0, axis=-1), top, -1)


class RoutingAccumulator:
    """Running counts over batches of routing decisions (numpy, on the host)."""

    def __init__(self, layers: list[int], num_experts: int, vocab_size: int, seq_len: int,
                 settings: list[str], pad_id: int) -> None:
        self.layers, self.e, self.v, self.l = list(layers), num_experts, vocab_size, seq_len
        self.settings, self.pad_id = list(settings), pad_id
        n = len(layers)
        self.k: int | None = None
        self.tokens = 0
        self.batches = 0
        self.token_count = np.zeros(vocab_size, np.int64)
        self.load = np.zeros((n, num_experts), np.int64)
        self.kept = {s: np.zeros((n, num_experts), np.int64) for s in settings}
        self.pos_copies = np.zeros((n, seq_len), np.int64)
        self.pos_dropped = {s: np.zeros((n, seq_len), np.int64) for s in settings}
        self.hist: dict[str, np.ndarray] = {}
        self.token_expert = [_PairCounter() for _ in layers]
        self.affinity = np.zeros((max(n - 1, 0), num_experts, num_experts), np.int64)
        self.dropped_fraction_diff = 0.0

    def _hist(self, kind: str, counts: np.ndarray, li: int) -> None:
        if kind not in self.hist:
            self.hist[kind] = np.zeros((len(self.layers), self.k + 1), np.int64)
        self.hist[kind][li] += np.bincount(counts, minlength=self.k + 1)[: self.k + 1]

    def add(self, inputs: np.ndarray, decisions: dict[int, dict[str, Any]]) -> None:
        inputs = np.asarray(inputs)
        mask = inputs != self.pad_id  # [B, L]
        self.batches += 1
        self.tokens += int(mask.sum())
        self.token_count += np.bincount(inputs[mask], minlength=self.v)[: self.v]
        e = self.e
        prev_top = None
        for li, layer in enumerate(self.layers):
            d = decisions[layer]
            idx = np.asarray(d["indices"]).astype(np.int64)  # [B, L, K]
            self.k = idx.shape[-1] if self.k is None else self.k
            valid = (idx >= 0) & mask[..., None]
            self.load[li] += np.bincount(idx[valid], minlength=e)[:e]
            self._hist("routed", valid.sum(-1)[mask], li)
            self.pos_copies[li] += valid.sum(axis=(0, 2))
            keys = (inputs[..., None].astype(np.int64) * e + idx)[valid]
            self.token_expert[li].add(keys)
            for s in self.settings:
                drop = np.asarray(d["dropped"][s]) & valid
                kept = valid & ~drop
                self.kept[s][li] += np.bincount(idx[kept], minlength=e)[:e]
                self.pos_dropped[s][li] += drop.sum(axis=(0, 2))
                if s != "dropless":
                    self._hist(f"kept@{s}", kept.sum(-1)[mask], li)
            self.dropped_fraction_diff = max(self.dropped_fraction_diff,
                                             float(np.asarray(d["dropped_fraction_diff"])))
            top = top1_expert(idx, np.asarray(d["weights"]))
            if prev_top is not None:
                both = mask & (prev_top >= 0) & (top >= 0)
                self.affinity[li - 1] += np.bincount(prev_top[both] * e + top[both],
                                                     minlength=e * e)[: e * e].reshape(e, e)
            prev_top = top


# ----------------------------------------------------------------------- tables


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Entropy in nats of distributions along ``axis`` (0 log 0 = 0)."""
    p = np.asarray(p, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=axis)


def token_text(tokenizer: Any, token_id: int) -> str:
    """Readable text of one token id: control ids by name, bytes and controls escaped."""
    from routezoo.training.data import BYTE_OFFSET, ByteTokenizer
    if token_id == tokenizer.pad_id:
        return "<pad>"
    if token_id == tokenizer.eos_id:
        return "<eos>"
    if isinstance(tokenizer, ByteTokenizer):
        b = token_id - BYTE_OFFSET
        if 32 <= b < 127:
            return chr(b)
        return {9: "\\t", 10: "\\n", 13: "\\r"}.get(b, f"<0x{b:02X}>")
    text = tokenizer.decode([token_id])
    if not text or "\ufffd" in text:
        return f"<id {token_id}>"
    out = []
    for ch in text:
        if ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf"):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def _write_csv(path: str, header: list[str], rows: list[list[Any]]) -> None:
    def fmt(x):
        if isinstance(x, (float, np.floating)):
            return "" if not math.isfinite(float(x)) else repr(float(x))
        if isinstance(x, np.integer):
            return int(x)
        return x
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            w.writerow([fmt(x) for x in row])


def _token_tables(acc: RoutingAccumulator):
    """Per layer: dense ``[V_seen, E]`` counts of copies per (token id, expert)."""
    seen = np.flatnonzero(acc.token_count)
    pos = np.full(acc.v, -1, np.int64)
    pos[seen] = np.arange(len(seen))
    tables = []
    for counter in acc.token_expert:
        keys, counts = counter.result()
        t = np.zeros((len(seen), acc.e), np.int64)
        if keys.size:
            np.add.at(t, (pos[keys // acc.e], keys % acc.e), counts)
        tables.append(t)
    return seen, tables


# ------------------------------------------------------------------------ plots


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _heatmap(path: str, matrix: np.ndarray, *, title: str, xlabel: str, ylabel: str,
             yticklabels: list[str], colorbar: str, vmax: float | None = None) -> None:
    plt = _plt()
    rows, cols = matrix.shape
    fig, ax = plt.subplots(figsize=(min(3 + 0.45 * cols, 20), min(1.5 + 0.45 * rows, 16)))
    im = ax.imshow(np.nan_to_num(matrix, nan=0.0), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if cols <= 64:
        ax.set_xticks(range(cols))
        ax.tick_params(axis="x", labelsize=7)
    if rows <= 64:
        ax.set_yticks(range(rows))
        ax.set_yticklabels(yticklabels, fontsize=7)
    if rows * cols <= 256:
        hi = np.nanmax(matrix) if np.isfinite(matrix).any() else 0.0
        for i in range(rows):
            for j in range(cols):
                if np.isfinite(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if matrix[i, j] > 0.6 * (vmax or hi or 1) else "white")
    fig.colorbar(im, ax=ax, label=colorbar)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_experts_per_token(path: str, acc: RoutingAccumulator, names: list[str]) -> None:
    plt = _plt()
    kinds = list(acc.hist)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.5), squeeze=False)
    n = np.arange(acc.k + 1)
    width = 0.8 / max(len(names), 1)
    for ax, kind in zip(axes[0], kinds):
        h = acc.hist[kind] / np.maximum(acc.hist[kind].sum(-1, keepdims=True), 1)
        for li, name in enumerate(names):
            ax.bar(n + (li - (len(names) - 1) / 2) * width, h[li], width, label=name)
        ax.set_xticks(n)
        ax.set_xlabel("experts per token")
        ax.set_ylabel("fraction of tokens")
        ax.set_title(kind, fontsize=10)
    if len(names) <= 12:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_token_entropy(path: str, ent: np.ndarray, names: list[str], num_experts: int,
                        min_count: int) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    bins = np.linspace(0, math.log(num_experts), 31)
    for li, name in enumerate(names):
        if ent.shape[0]:
            ax.hist(ent[:, li], bins=bins, histtype="step", label=name)
    ax.axvline(math.log(num_experts), color="gray", ls="--", lw=1)
    ax.set_xlabel("entropy of the token id's expert distribution (nats; dashed: log E)")
    ax.set_ylabel(f"token ids (seen >= {min_count}x)")
    ax.set_title("token-id specialisation (low = always the same experts)", fontsize=10)
    if len(names) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_drop(path: str, acc: RoutingAccumulator, names: list[str], settings: list[tuple]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    x = np.arange(acc.l)
    for si, (s, cf, c) in enumerate(settings):
        rate = acc.pos_dropped[s] / np.maximum(acc.pos_copies, 1)
        for li, name in enumerate(names):
            label = f"{name} {s}" + (f" (cf {cf:g}, C={c})" if cf is not None else "")
            ax.plot(x, rate[li], styles[si % 4], color=colors[li % len(colors)], lw=1, label=label)
    ax.set_xlabel("position in the sequence")
    ax.set_ylabel("dropped fraction of token copies")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("token-copy drop rate by position", fontsize=10)
    if len(names) * len(settings) <= 16:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------ report


def _mutual_information(joint: np.ndarray) -> float:
    """I(X; Y) in nats of a joint count matrix."""
    total = joint.sum()
    if total == 0:
        return 0.0
    p = joint / total
    return float(entropy(p.sum(1)) + entropy(p.sum(0)) - entropy(p.reshape(-1)))


def write_report(acc: RoutingAccumulator, out_dir: str, *, tokenizer: Any, settings: list[tuple],
                 meta: dict[str, Any], top: int = 10, min_count: int = 10) -> dict[str, Any]:
    """Writes the tables, plots and ``summary.json`` of ``acc`` to ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    e, names = acc.e, [f"layer{i}" for i in acc.layers]
    experts = [f"expert_{j}" for j in range(e)]
    files = []

    def path(name):
        files.append(name)
        return os.path.join(out_dir, name)

    # 1. load
    copies = acc.load.sum(-1)
    load = acc.load / np.maximum(copies[:, None], 1)
    _write_csv(path("load.csv"), ["layer", "copies", *experts],
               [[n, int(c), *row] for n, c, row in zip(names, copies, load)])
    _write_csv(path("load_counts.csv"), ["layer", "copies", *experts],
               [[n, int(c), *row] for n, c, row in zip(names, copies, acc.load)])
    _heatmap(path("load.png"), load, title=f"fraction of routed token copies per expert "
             f"(uniform = {1 / e:.3g})", xlabel="expert", ylabel="MoE layer", yticklabels=names,
             colorbar="load")

    # 2. experts per token
    rows = []
    for kind, h in acc.hist.items():
        for li, n in enumerate(names):
            tot = max(int(h[li].sum()), 1)
            mean = float((h[li] * np.arange(acc.k + 1)).sum() / tot)
            rows.append([n, kind, mean, *h[li]])
    _write_csv(path("experts_per_token.csv"), ["layer", "kind", "mean", *[str(i) for i in range(acc.k + 1)]], rows)
    _plot_experts_per_token(path("experts_per_token.png"), acc, names)

    # 3. token-id specialisation
    seen, tables = _token_tables(acc)
    counts = acc.token_count[seen]
    tok_ent = np.stack([entropy(t / np.maximum(t.sum(-1, keepdims=True), 1)) for t in tables], -1) \
        if tables else np.zeros((len(seen), 0))
    mean_ent = tok_ent.mean(-1) if tok_ent.shape[1] else np.zeros(len(seen))
    text = {int(v): token_text(tokenizer, int(v)) for v in seen}
    order = np.lexsort((seen, -counts))
    header = ["token_id", "token", "count", "mean_entropy"]
    for n in names:
        header += [f"{n}/entropy", f"{n}/top_expert", f"{n}/top_share"]
    rows = []
    for r in order:
        row = [int(seen[r]), text[int(seen[r])], int(counts[r]), float(mean_ent[r])]
        for li in range(len(names)):
            t = tables[li][r]
            row += [float(tok_ent[r, li]), int(np.argmax(t)), float(t.max() / max(t.sum(), 1))]
        rows.append(row)
    _write_csv(path("token_specialisation.csv"), header, rows)

    frequent = np.flatnonzero(counts >= min_count)
    # ties (e.g. the log k floor of top-k routing) go to the more frequent token id
    most = frequent[np.lexsort((seen[frequent], -counts[frequent], mean_ent[frequent]))]
    least = frequent[np.lexsort((seen[frequent], -counts[frequent], -mean_ent[frequent]))]
    top_rows = []
    for kind, picks in (("most", most[:top]), ("least", least[:top])):
        for rank, r in enumerate(picks):
            top_rows.append([kind, rank + 1, int(seen[r]), text[int(seen[r])], int(counts[r]),
                             float(mean_ent[r]),
                             " ".join(f"{n}:{int(np.argmax(tables[li][r]))}" for li, n in enumerate(names))])
    _write_csv(path("token_specialisation_top.csv"),
               ["kind", "rank", "token_id", "token", "count", "mean_entropy", "top_expert_per_layer"], top_rows)
    _plot_token_entropy(path("token_entropy.png"), tok_ent[frequent], names, e, min_count)

    rows = []
    for li, n in enumerate(names):
        t = tables[li]
        for j in range(e):
            col = t[:, j]
            total = max(int(col.sum()), 1)
            best = np.lexsort((seen, -col))[:top]
            for rank, r in enumerate(best):
                if col[r] == 0:
                    break
                rows.append([n, j, rank + 1, int(seen[r]), text[int(seen[r])], int(col[r]),
                             float(col[r] / total), float(col[r] / max(t[r].sum(), 1))])
    _write_csv(path("expert_top_tokens.csv"), ["layer", "expert", "rank", "token_id", "token", "count",
                                               "share_of_expert", "share_of_token"], rows)

    # 4. drop rate by position
    rows = []
    for s, cf, c in settings:
        for li, n in enumerate(names):
            for p in range(acc.l):
                cp, dr = int(acc.pos_copies[li, p]), int(acc.pos_dropped[s][li, p])
                rows.append([s, "" if cf is None else cf, "" if c is None else c, n, p, cp, dr,
                             dr / cp if cp else float("nan")])
    _write_csv(path("drop_by_position.csv"), ["setting", "capacity_factor", "capacity", "layer", "position",
                                              "copies", "dropped", "drop_rate"], rows)
    _plot_drop(path("drop_by_position.png"), acc, names, settings)

    # 5. inter-layer affinity (top-1)
    rows, affinity_summary = [], {}
    for pi in range(len(names) - 1):
        a, b = names[pi], names[pi + 1]
        joint = acc.affinity[pi]
        row_tot = joint.sum(-1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            cond = np.where(row_tot > 0, joint / np.maximum(row_tot, 1), np.nan)
        for i in range(e):
            for j in range(e):
                rows.append([a, b, i, j, int(joint[i, j]), float(cond[i, j])])
        _heatmap(path(f"affinity_{a}_{b}.png"), cond, vmax=1.0,
                 title=f"P(top-1 expert at {b} | top-1 expert at {a})",
                 xlabel=f"expert at {b}", ylabel=f"expert at {a}", yticklabels=[str(i) for i in range(e)],
                 colorbar="probability")
        total = max(int(joint.sum()), 1)
        affinity_summary[f"{a}->{b}"] = {
            "tokens": int(joint.sum()),
            "mutual_information": _mutual_information(joint),
            "top1_entropy_next": float(entropy(joint.sum(0) / total)),
            # accuracy of predicting the next layer's top-1 expert from this layer's
            "predictability": float(joint.max(-1).sum() / total),
        }
    _write_csv(path("affinity.csv"), ["from_layer", "to_layer", "from_expert", "to_expert", "count",
                                      "probability"], rows)

    # summary
    half = acc.l // 2
    layers = {}
    for li, n in enumerate(names):
        t = tables[li]
        h_e = float(entropy(load[li]))
        h_cond = float((t.sum(-1) * entropy(t / np.maximum(t.sum(-1, keepdims=True), 1))).sum()
                       / max(t.sum(), 1))
        routed = acc.hist["routed"][li]
        drop = {}
        for s, cf, c in settings:
            d, cp = acc.pos_dropped[s][li], acc.pos_copies[li]
            drop[s] = {"capacity_factor": cf, "capacity": c,
                       "drop_rate": float(d.sum() / max(cp.sum(), 1)),
                       "first_half": float(d[:half].sum() / max(cp[:half].sum(), 1)),
                       "second_half": float(d[half:].sum() / max(cp[half:].sum(), 1))}
        layers[n] = {
            "copies": int(copies[li]),
            "load_max_over_mean": float(load[li].max() * e),
            "load_min_over_mean": float(load[li].min() * e),
            "load_cv": float(load[li].std() / max(load[li].mean(), 1e-12)),
            "unused_experts": int((acc.load[li] == 0).sum()),
            "experts_per_token": float((routed * np.arange(acc.k + 1)).sum() / max(routed.sum(), 1)),
            "tokens_without_expert": float(routed[0] / max(routed.sum(), 1)),
            "expert_entropy": h_e,
            "token_conditional_entropy": h_cond,
            "token_mutual_information": h_e - h_cond,
            "token_information_fraction": (h_e - h_cond) / h_e if h_e > 0 else 0.0,
            "drop": drop,
        }
    mean = lambda key: float(np.mean([v[key] for v in layers.values()]))  # noqa: E731
    summary = {
        **meta,
        "tokens": int(acc.tokens),
        "batches": int(acc.batches),
        "token_ids_seen": int(len(seen)),
        "slots_per_token": int(acc.k),
        "drop_settings": [{"name": s, "capacity_factor": cf, "capacity": c} for s, cf, c in settings],
        "mean_over_layers": {
            "load_max_over_mean": mean("load_max_over_mean"),
            "experts_per_token": mean("experts_per_token"),
            "token_information_fraction": mean("token_information_fraction"),
            **{f"drop_rate/{s}": float(np.mean([v["drop"][s]["drop_rate"] for v in layers.values()]))
               for s, _, _ in settings},
        },
        "layers": layers,
        "affinity": affinity_summary,
        "affinity_uses": "top-1 expert (the valid slot with the largest combine weight), before capacity drops",
        "entropy_units": "nats; token_conditional_entropy = H(expert | token id) over routed copies, "
                         "token_mutual_information = H(expert) - H(expert | token id)",
        "files": sorted(files + ["summary.json"]),
    }
    # |model's dropped_fraction - recomputed| in the forward pass analysed (should be ~0)
    summary["check_dropped_fraction_max_abs_diff"] = float(acc.dropped_fraction_diff)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=False)
    return summary


# ------------------------------------------------------------------------ driver


def read_run_config(workdir: str):
    """The resolved config of a run, read by :func:`training.train.read_workdir_config`;
    a missing ``config.json`` is an :class:`AnalyzeError`."""
    from routezoo.training.train import read_workdir_config
    try:
        return read_workdir_config(workdir)
    except FileNotFoundError as e:
        raise AnalyzeError(str(e)) from None


def analyze(workdir: str, *, steps: int | None = None, top: int = 10, min_count: int = 10,
            out_dir: str | None = None, log=print) -> dict[str, Any]:
    """Analyses the routing of ``workdir``'s newest checkpoint; returns the summary.

    Raises :class:`AnalyzeError` (one line) for a workdir without config, MoE layers or
    checkpoint.
    """
    from flax import linen as nn
    from jax.sharding import NamedSharding

    from routezoo.layers import sharding as shd
    from routezoo.training import data as data_lib
    from routezoo.training.train import load_trained, mesh_and_rules, to_global

    workdir = os.path.abspath(workdir)
    config = read_run_config(workdir)
    try:
        layers = moe_layer_indices(config.model)
    except ValueError as e:
        raise AnalyzeError(str(e)) from None
    if not layers:
        raise AnalyzeError(f"the model in {workdir} has no MoE layers (model.ffn={config.model.ffn!r}); "
                           f"routing analysis needs at least one")
    no_experts = {   # routers whose layers make no token-to-expert choices
        "soft": "moe.router='soft' (Soft MoE) makes no token-to-expert decisions to analyse "
                "(every token reaches every slot); its routing statistics are in metrics.jsonl",
        "duo": "moe.router='duo' (Duo-LLM) chooses big/small/skip, not experts; its option fractions are in "
               "metrics.jsonl and routezoo.zoo.duo.summarize_oracle analyses oracle routes",
    }
    if str(config.model.moe.router) in no_experts:
        raise AnalyzeError(no_experts[str(config.model.moe.router)])
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir) or not any(n.isdigit() for n in os.listdir(ckpt_dir)):
        raise AnalyzeError(f"no checkpoint in {ckpt_dir}")
    if jax.process_count() > 1:
        raise AnalyzeError("analyze runs in a single process")
    try:
        config, model, state = load_trained(workdir)
    except FileNotFoundError as e:
        raise AnalyzeError(" ".join(str(e).split())) from None
    if steps is not None:
        config.train.eval_steps = int(steps)
    moe_cfg = config.model.moe
    seq_len = int(config.data.seq_len)
    group = int(moe_cfg.group_size) or seq_len
    data_lib.ensure_dataset(config.data)
    tokenizer = data_lib.get_tokenizer(config.data)
    batches = data_lib.eval_batches(config)

    mesh, rules = mesh_and_rules(config)
    forward = make_forward(model, moe_cfg, seq_len)
    acc, settings = None, None
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batch_sharding = NamedSharding(mesh, shd.batch_spec(2))
        for local in batches:
            inputs = to_global({"inputs": local["inputs"]}, batch_sharding)["inputs"]
            decisions = jax.device_get(forward(state.params, state.model_state, inputs))
            if acc is None:
                k = next(iter(decisions.values()))["indices"].shape[-1]
                settings = drop_settings(moe_cfg, group, k)
                acc = RoutingAccumulator(sorted(decisions), int(moe_cfg.num_experts),
                                         int(config.model.vocab_size), seq_len,
                                         [s for s, _, _ in settings], tokenizer.pad_id)
            acc.add(local["inputs"], decisions)
    if acc is None:
        raise AnalyzeError("no validation batches to analyse (--steps must be >= 1)")
    missing = sorted(set(layers) - set(acc.layers))
    if missing:
        raise AnalyzeError(f"no routing captured for MoE layer(s) {missing}")
    meta = {
        "workdir": workdir,
        "checkpoint_step": int(jax.device_get(state.step)),
        "router": str(moe_cfg.router),
        "dispatch": str(moe_cfg.dispatch),
        "num_experts": int(moe_cfg.num_experts),
        "k": int(moe_cfg.k),
        "moe_layers": [f"layer{i}" for i in acc.layers],
        "seq_len": seq_len,
        "group_size": group,
    }
    out_dir = out_dir or os.path.join(workdir, "analysis")
    summary = write_report(acc, out_dir, tokenizer=tokenizer, settings=settings, meta=meta,
                           top=top, min_count=min_count)
    m = summary["mean_over_layers"]
    drops = ", ".join(f"drop rate ({k.split('/')[1]}) {v:.3g}" for k, v in m.items() if k.startswith("drop_rate/"))
    log(f"analysed {summary['tokens']} tokens ({summary['batches']} batches) at step "
        f"{summary['checkpoint_step']}: max load / mean {m['load_max_over_mean']:.3g}, experts per token "
        f"{m['experts_per_token']:.3g}, token-id information {m['token_information_fraction']:.3g} of "
        f"H(expert), {drops}; outputs in {out_dir}")
    return summary


def main(argv: list[str]) -> int:
    """``routezoo analyze`` flags -> exit code (2 with one line on stderr for any problem)."""
    import argparse

    def fail(message: str) -> int:
        print(f"routezoo: error: analyze: {message}", file=sys.stderr)
        return 2

    if any(a in ("-h", "--help", "-help") for a in argv):
        print(USAGE)
        return 0

    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise SystemExit(fail(message))

    def positive(v: str) -> int:
        n = int(v)
        if n < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
        return n

    parser = _Parser(prog="routezoo analyze", add_help=False)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=positive, default=None)
    parser.add_argument("--top", type=positive, default=10)
    parser.add_argument("--min-count", "--min_count", dest="min_count", type=positive, default=10)
    parser.add_argument("--out", default=None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:   # flag errors: one line, already printed by fail()
        return int(e.code or 0)
    try:
        analyze(args.workdir, steps=args.steps, top=args.top, min_count=args.min_count, out_dir=args.out)
    except AnalyzeError as e:
        return fail(" ".join(str(e).split()))
    return 0
