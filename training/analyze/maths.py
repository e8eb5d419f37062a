"""Information measures of the routing analysis: entropies, mutual information, top-1
experts and the per-token expert tables.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Entropy in nats of distributions along ``axis`` (0 log 0 = 0)."""
    p = np.asarray(p, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=axis)


def _mutual_information(joint: np.ndarray) -> float:
    """I(X; Y) in nats of a joint count matrix."""
    total = joint.sum()
    if total == 0:
        return 0.0
    p = joint / total
    return float(entropy(p.sum(1)) + entropy(p.sum(0)) - entropy(p.reshape(-1)))


def top1_expert(indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Expert of the valid slot with the largest weight (first on ties), -1 if none."""
    w = np.where(indices >= 0, weights, -np.inf)
    slot = np.argmax(w, axis=-1)
    top = np.take_along_axis(indices, slot[..., None], axis=-1)[..., 0]
    return np.where(np.any(indices >= 0, axis=-1), top, -1)


def _token_tables(acc: Any):
    """Per layer: dense ``[V_seen, E]`` counts of copies per (token id, expert) of a
    :class:`~routezoo.training.analyze.accumulate.RoutingAccumulator`."""
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
