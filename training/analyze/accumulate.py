"""Running counts of routing decisions over batches (numpy, on the host)."""

from __future__ import annotations

from typing import Any

import numpy as np

from routezoo.training.analyze.maths import top1_expert


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
