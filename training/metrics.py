"""Run outputs: ``metrics.jsonl``, TensorBoard events, plots, and the progress bar.

Every write happens on process 0 only; other processes get no-op writers.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import numpy as np


def _scalar_items(metrics: Mapping[str, Any]):
    for k, v in metrics.items():
        a = np.asarray(v)
        if a.ndim == 0:
            yield k, float(a)
        else:
            for i, x in enumerate(a.reshape(-1)):
                yield f"{k}/{i}", float(x)


def to_jsonable(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        out[k] = a.item() if a.ndim == 0 else a.tolist()
    return out


class MetricWriter:
    """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
            self._tb = EventFileWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **to_jsonable(metrics)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        from tensorboard.compat.proto import event_pb2, summary_pb2
        values = [summary_pb2.Summary.Value(tag=k, simple_value=v)
                  for k, v in _scalar_items(metrics) if math.isfinite(v)]
        self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary_pb2.Summary(value=values)))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; for a step logged twice (resumed run), the last."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    by_key: dict[tuple, dict] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                r = json.loads(line)
                by_key[(r["step"], "eval_loss" in r)] = r
    return [by_key[k] for k in sorted(by_key)]


def plot_metrics(workdir: str) -> list[str]:
    """Writes ``plots/loss.png`` (train and eval loss) and, for MoE runs,
    ``plots/expert_load.png`` (load per expert per MoE layer over training)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    if not records:
        return []
    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    written = []
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step"); ax.set_ylabel("loss (nats/token)"); ax.legend(); ax.grid(alpha=0.3)
    path = os.path.join(workdir, "plots", "loss.png")
    fig.tight_layout(); fig.savefig(path, dpi=100); plt.close(fig)
    written.append(path)

    load_keys = sorted({k for r in records for k in r if k.endswith("/load") and isinstance(r[k], list)})
    if load_keys:
        fig, axes = plt.subplots(len(load_keys), 1, figsize=(6, 2.2 * len(load_keys)), squeeze=False)
        for ax, key in zip(axes[:, 0], load_keys):
            rows = [(r["step"], r[key]) for r in records if key in r]
            steps = [s for s, _ in rows]
            load = np.asarray([v for _, v in rows])
            for e in range(load.shape[1]):
                ax.plot(steps, load[:, e], lw=1)
            ax.axhline(1.0 / load.shape[1], color="k", ls="--", lw=0.8)
            ax.set_title(key.replace("moe/", ""), fontsize=9); ax.set_ylabel("fraction")
        axes[-1, 0].set_xlabel("step")
        path = os.path.join(workdir, "plots", "expert_load.png")
        fig.tight_layout(); fig.savefig(path, dpi=100); plt.close(fig)
        written.append(path)
    return written


class Progress:
    """A progress bar (tqdm) with step, loss, tokens/s and ETA, on process 0 only."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)

    def update_to(self, step: int, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
