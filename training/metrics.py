"""Run outputs: ``metrics.jsonl``, TensorBoard events, plots, and the progress bar.

Every write happens on process 0 only; other processes get no-op writers.

``metrics.jsonl`` is strict JSON, one object per line: a non-finite value (a diverged
loss) is written as ``null``, never as the bare ``NaN``/``Infinity`` other parsers
refuse. A resumed run first cuts the file back to the steps its checkpoint covers
(:func:`truncate_metrics`) and marks the restart in TensorBoard (a ``SessionLog.START``
event at the first step it redoes, after which TensorBoard drops the older events from
that step on), so no step is recorded twice.
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


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def to_jsonable(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Plain Python values of ``metrics``; a non-finite float becomes ``None`` (JSON ``null``)."""
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        out[k] = _finite_or_none(a.item() if a.ndim == 0 else a.tolist())
    return out


def truncate_metrics(workdir: str, keep_below: int) -> int:
    """Drops the records of ``metrics.jsonl`` at steps ``>= keep_below`` (a resumed run
    writes them again); returns how many were dropped. The file is replaced atomically.
    A line that does not parse (a crash mid-write) is dropped too."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if step < keep_below:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


class MetricWriter:
    """Appends one JSON object per logged step and mirrors scalars to TensorBoard.

    Args:
      workdir: the run's directory.
      enabled: write at all (process 0).
      restart_step: the first step a resumed run writes again: when the workdir already
        holds TensorBoard events, a ``SessionLog.START`` event at this step tells
        TensorBoard to drop the older events from this step on.
    """

    def __init__(self, workdir: str, enabled: bool = True, restart_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
            tb_dir = os.path.join(workdir, "tensorboard")
            earlier = os.path.isdir(tb_dir) and any(n.startswith("events.out.tfevents") for n in os.listdir(tb_dir))
            self._tb = EventFileWriter(tb_dir)
            if earlier and restart_step is not None:
                from tensorboard.compat.proto import event_pb2
                self._tb.add_event(event_pb2.Event(
                    wall_time=time.time(), step=int(restart_step),
                    session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **to_jsonable(metrics)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
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
    """The records of ``metrics.jsonl``; for a step logged twice, the last. A line cut
    short by a crash is skipped."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    by_key: dict[tuple, dict] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
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
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
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
            load = np.asarray([[np.nan if x is None else x for x in v] for _, v in rows], float)
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
