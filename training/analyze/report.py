"""The CSV tables and ``summary.json`` of the routing analysis."""

from __future__ import annotations

import csv
import json
import math
import os
import unicodedata
from typing import Any

import numpy as np

from routezoo.training.analyze.accumulate import RoutingAccumulator
from routezoo.training.analyze.maths import _mutual_information, _token_tables, entropy
from routezoo.training.analyze.plots import _heatmap, _plot_drop, _plot_experts_per_token, _plot_token_entropy


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
