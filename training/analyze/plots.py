"""The PNG plots of the routing analysis (matplotlib, Agg backend)."""

from __future__ import annotations

import math

import numpy as np

from routezoo.training.analyze.accumulate import RoutingAccumulator


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
