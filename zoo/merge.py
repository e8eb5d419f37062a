"""Merging fine-tuned models without training: the task vectors of several fine-tunings of
one base, combined into one model.

Notation: ``θ0`` the base's parameters, ``θ_t`` those of the fine-tune on task ``t``,
``τ_t = θ_t − θ0`` its task vector, ``λ`` the scale, ``n`` the entries of a vector.
Everything is elementwise (no einsum letters).

Methods (:data:`METHODS`; :func:`merge` runs one by name):

- ``task_arithmetic``: Ilharco et al. 2023, "Editing Models with Task Arithmetic":
  ``θ = θ0 + λ Σ_t τ_t``. The paper picks ``λ`` on held-out validation data; without one,
  ``λ = 0.4`` is the setting used for it in the TIES-Merging paper's comparison, the default
  here.
- ``ties``: Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models":
  (1) *trim*: each ``τ_t`` keeps its ``round(d·n)`` entries of largest magnitude, counted over
  the whole vector (every parameter together), the others become 0 (``d = 0.2``, the paper's
  top-20%); (2) *elect*: the merged sign of an entry is ``γ = sgn(Σ_t τ̂_t)``, the sign with
  the larger total magnitude; (3) *disjoint mean*: the mean of the trimmed entries whose sign
  is ``γ`` (the others, and zeros, do not count; 0 where none agrees);
  ``θ = θ0 + λ τ_m`` with ``λ = 1`` (the paper's value without validation data).
- ``dare``: Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from
  Homologous Models as a Free Lunch": each entry of each ``τ_t`` is dropped with probability
  ``p`` and the survivors are multiplied by ``1/(1 − p)``, so every entry keeps its expected
  value; the sparse vectors are then combined by task arithmetic (``combine='task_arithmetic'``)
  or by TIES's elect and disjoint mean (``combine='ties'``; the drop takes the place of the
  trim). ``density = 1 − p``: ``p = 0.9`` (density 0.1), the drop rate the paper shows
  fine-tunes survive; ``λ = 1``, the top of the paper's search range ``[0.5, 1]``.
- ``breadcrumbs``: Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model
  Merging with Sparse Masks": per layer (here: per parameter tensor) each ``τ_t`` loses the
  entries whose magnitude is among the smallest ``β`` fraction (``bottom``) or the largest
  ``1 − γ`` fraction (``top``), then task arithmetic. The paper's values: ``β = 0.85`` and
  ``γ = 0.993`` (``bottom = 0.85``, ``top = 0.007``: 14.3% of each tensor kept). The paper
  picks ``λ`` on validation data; 0.3 here.

All arithmetic runs on the host in float64 and the result is cast back to the base's dtypes,
so merging a single task vector at scale 1 with the identity settings (TIES and DARE at
density 1, Breadcrumbs with nothing masked) returns the fine-tuned parameters bit for bit.

Trees are any pytrees of arrays with one structure (Flax parameter dicts); JAX or numpy leaves
in, numpy leaves out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np

Tree = Any


# --------------------------------------------------------------------------- trees


def _flat(tree: Tree) -> tuple[list[str], list[np.ndarray], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = ["/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in p)
             for p, _ in leaves]
    return paths, [np.asarray(x) for _, x in leaves], treedef


def check_compatible(base: Tree, others: Sequence[Tree], names: Sequence[str] | None = None) -> None:
    """Raises ``ValueError`` (one line, naming the first differing parameter) unless every
    tree of ``others`` has ``base``'s paths and shapes."""
    paths, leaves, _ = _flat(base)
    want = dict(zip(paths, (x.shape for x in leaves)))
    for i, other in enumerate(others):
        name = names[i] if names else f"tree {i}"
        o_paths, o_leaves, _ = _flat(other)
        got = dict(zip(o_paths, (x.shape for x in o_leaves)))
        for p in sorted(set(want) | set(got)):
            if p not in got:
                raise ValueError(f"{name} has no parameter {p} (the base has it)")
            if p not in want:
                raise ValueError(f"{name} has a parameter {p} the base does not have")
            if got[p] != want[p]:
                raise ValueError(f"{name}: parameter {p} has shape {list(got[p])}, the base's is {list(want[p])}")


def task_vector(finetuned: Tree, base: Tree) -> Tree:
    """``τ = θ_t − θ0`` in float64 (exact for float32 and bfloat16 parameters)."""
    check_compatible(base, [finetuned], ["the fine-tuned tree"])
    return jax.tree.map(lambda f, b: np.asarray(f, np.float64) - np.asarray(b, np.float64), finetuned, base)


def apply_vector(base: Tree, vector: Tree, scale: float = 1.0) -> Tree:
    """``θ0 + λ τ`` in float64, cast to the base's dtypes (numpy leaves)."""
    def add(b, v):
        b = np.asarray(b)
        return (b.astype(np.float64) + scale * np.asarray(v, np.float64)).astype(b.dtype)
    return jax.tree.map(add, base, vector)


def _map_leaves(fn: Callable[[list[np.ndarray]], np.ndarray], vectors: Sequence[Tree]) -> Tree:
    """A tree whose leaf at each position is ``fn`` of the vectors' leaves there."""
    flats = [jax.tree_util.tree_flatten(v) for v in vectors]
    treedef = flats[0][1]
    out = [fn([f[0][i] for f in flats]) for i in range(len(flats[0][0]))]
    return jax.tree_util.tree_unflatten(treedef, out)


# --------------------------------------------------------------------------- sparsification


def _count(fraction: float, n: int) -> int:
    return int(min(max(round(fraction * n), 0), n))


def trim(vector: Tree, density: float) -> Tree:
    """TIES's trim: the ``round(density·n)`` entries of largest magnitude over the whole
    vector kept, every other entry 0 (``n`` all entries of all leaves; ties at the
    threshold broken by position)."""
    paths, leaves, treedef = _flat(vector)
    sizes = [x.size for x in leaves]
    magnitude = np.concatenate([np.abs(np.asarray(x, np.float64)).ravel() for x in leaves]) if leaves else np.zeros(0)
    n = magnitude.size
    k = _count(density, n)
    keep = np.zeros(n, bool)
    if k == n:
        keep[:] = True
    elif k > 0:
        keep[np.argpartition(-magnitude, k - 1, kind="introselect")[:k]] = True
    out, start = [], 0
    for x, size in zip(leaves, sizes):
        mask = keep[start:start + size].reshape(x.shape)
        out.append(np.where(mask, np.asarray(x, np.float64), 0.0))
        start += size
    return jax.tree_util.tree_unflatten(treedef, out)


def elect_sign(vectors: Sequence[Tree]) -> Tree:
    """TIES's elect: ``γ = sgn(Σ_t τ_t)`` per entry (+1, −1, or 0 where the masses cancel)."""
    return _map_leaves(lambda xs: np.sign(sum(np.asarray(x, np.float64) for x in xs)), vectors)


def disjoint_mean(vectors: Sequence[Tree], sign: Tree) -> Tree:
    """TIES's disjoint merge: per entry, the mean of the vectors' entries whose sign is the
    elected ``sign`` (zeros never count); 0 where none agrees."""
    def mean(xs_and_sign):
        *xs, s = xs_and_sign
        xs = np.stack([np.asarray(x, np.float64) for x in xs])
        agree = (np.sign(xs) == s) & (xs != 0)
        count = agree.sum(0)
        return np.where(count > 0, np.where(agree, xs, 0.0).sum(0) / np.maximum(count, 1), 0.0)
    return _map_leaves(mean, [*vectors, sign])


def dare_drop(vector: Tree, density: float, rng: np.random.Generator) -> Tree:
    """DARE's drop and rescale: each entry kept with probability ``density`` (= 1 − p) and
    divided by it, else 0; ``E[result] = vector``. Leaves are drawn in path order from ``rng``."""
    paths, leaves, treedef = _flat(vector)
    out: list[np.ndarray | None] = [None] * len(leaves)
    for i in sorted(range(len(leaves)), key=lambda j: paths[j]):
        x = np.asarray(leaves[i], np.float64)
        keep = rng.random(x.shape) < density
        out[i] = np.where(keep, x / density, 0.0)
    return jax.tree_util.tree_unflatten(treedef, out)


def breadcrumbs_mask(vector: Tree, top: float, bottom: float) -> Tree:
    """Breadcrumbs' mask, per tensor of ``n`` entries: its ``round(bottom·n)`` entries of
    smallest magnitude and its ``round(top·n)`` of largest magnitude become 0 (ties broken
    by position), the rest kept."""
    def mask(x):
        x = np.asarray(x, np.float64)
        n = x.size
        lo, hi = _count(bottom, n), _count(top, n)
        order = np.argsort(np.abs(x).ravel(), kind="stable")
        keep = np.zeros(n, bool)
        keep[order[lo:n - hi]] = True
        return np.where(keep.reshape(x.shape), x, 0.0)
    return jax.tree.map(mask, vector)


def _sum(vectors: Sequence[Tree]) -> Tree:
    return _map_leaves(lambda xs: sum(np.asarray(x, np.float64) for x in xs), vectors)


# --------------------------------------------------------------------------- methods


def task_arithmetic(base: Tree, vectors: Sequence[Tree], *, scale: float = 0.4) -> Tree:
    """Task arithmetic (Ilharco et al. 2023): ``θ0 + λ Σ_t τ_t``."""
    return apply_vector(base, _sum(vectors), scale)


def ties(base: Tree, vectors: Sequence[Tree], *, density: float = 0.2, scale: float = 1.0) -> Tree:
    """TIES-Merging (Yadav et al. 2023): trim each vector to its top ``density`` by magnitude,
    elect the sign of larger total mass, disjoint mean, ``θ0 + λ τ_m``."""
    trimmed = [trim(v, density) for v in vectors]
    return apply_vector(base, disjoint_mean(trimmed, elect_sign(trimmed)), scale)


COMBINE = ("task_arithmetic", "ties")   # how DARE combines its sparse vectors


def dare(base: Tree, vectors: Sequence[Tree], *, density: float = 0.1, scale: float = 1.0, seed: int = 0,
         combine: str = "task_arithmetic") -> Tree:
    """DARE (Yu et al. 2024): drop each entry with probability ``p = 1 − density``, rescale
    the rest by ``1/(1 − p)``, then task arithmetic (``θ0 + λ Σ_t τ̃_t``) or, with
    ``combine='ties'``, TIES's elect and disjoint mean (``θ0 + λ τ_m``). Vector ``t`` draws
    its mask from ``numpy.random.default_rng([seed, t])``."""
    if combine not in COMBINE:
        raise ValueError(f"unknown DARE combine {combine!r}; allowed: {', '.join(COMBINE)}")
    dropped = [dare_drop(v, density, np.random.default_rng([seed, t])) for t, v in enumerate(vectors)]
    if combine == "ties":
        return apply_vector(base, disjoint_mean(dropped, elect_sign(dropped)), scale)
    return apply_vector(base, _sum(dropped), scale)


def breadcrumbs(base: Tree, vectors: Sequence[Tree], *, top: float = 0.007, bottom: float = 0.85,
                scale: float = 0.3) -> Tree:
    """Model Breadcrumbs (Davari & Belilovsky 2024): per tensor, mask the ``top`` fraction of
    largest and the ``bottom`` fraction of smallest magnitudes of each vector, then
    ``θ0 + λ Σ_t τ̂_t``."""
    return apply_vector(base, _sum([breadcrumbs_mask(v, top, bottom) for v in vectors]), scale)


@dataclasses.dataclass(frozen=True)
class Method:
    """A merging method: its function and its hyper-parameters with their defaults."""
    fn: Callable[..., Tree]
    defaults: dict[str, Any]
    paper: str


METHODS: dict[str, Method] = {
    "task_arithmetic": Method(task_arithmetic, {"scale": 0.4},
                              'Ilharco et al. 2023, "Editing Models with Task Arithmetic"'),
    "ties": Method(ties, {"density": 0.2, "scale": 1.0},
                   'Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models"'),
    "dare": Method(dare, {"density": 0.1, "scale": 1.0, "seed": 0, "combine": "task_arithmetic"},
                   'Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous '
                   'Models as a Free Lunch"'),
    "breadcrumbs": Method(breadcrumbs, {"top": 0.007, "bottom": 0.85, "scale": 0.3},
                          'Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with '
                          'Sparse Masks"'),
}


def hyperparameters(method: str, **given: Any) -> dict[str, Any]:
    """``method``'s hyper-parameters: its defaults updated by the ``given`` ones that are
    not ``None``; ``ValueError`` (one line, naming what is allowed) for an unknown method,
    a hyper-parameter the method does not take, or a value out of range."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; allowed: {', '.join(METHODS)}")
    defaults = METHODS[method].defaults
    given = {k: v for k, v in given.items() if v is not None}
    extra = sorted(set(given) - set(defaults))
    if extra:
        raise ValueError(f"{method} takes no {', '.join(extra)}; its hyper-parameters: {', '.join(defaults)}")
    hp = {**defaults, **given}
    if "scale" in hp and not math.isfinite(float(hp["scale"])):
        raise ValueError(f"scale must be a finite number, got {hp['scale']}")
    if "density" in hp and not 0.0 < float(hp["density"]) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {hp['density']}")
    for key in ("top", "bottom"):
        if key in hp and not 0.0 <= float(hp[key]) < 1.0:
            raise ValueError(f"{key} must be in [0, 1), got {hp[key]}")
    if "top" in hp and float(hp["top"]) + float(hp["bottom"]) >= 1.0:
        raise ValueError(f"top + bottom must be below 1 (they mask that fraction of each tensor), got "
                         f"{hp['top']} + {hp['bottom']}")
    if "combine" in hp and hp["combine"] not in COMBINE:
        raise ValueError(f"unknown combine {hp['combine']!r}; allowed: {', '.join(COMBINE)}")
    return hp


def merge(method: str, base: Tree, vectors: Sequence[Tree], **hyper: Any) -> Tree:
    """``base`` with the task ``vectors`` merged by ``method`` (:data:`METHODS`), its
    hyper-parameters the defaults updated by ``hyper`` (``None`` values ignored)."""
    hp = hyperparameters(method, **hyper)
    if not vectors:
        raise ValueError("no task vector to merge")
    check_compatible(base, vectors, [f"task vector {t + 1}" for t in range(len(vectors))])
    return METHODS[method].fn(base, list(vectors), **hp)


__all__ = ["COMBINE", "METHODS", "Method", "apply_vector", "breadcrumbs", "breadcrumbs_mask", "check_compatible",
           "dare", "dare_drop", "disjoint_mean", "elect_sign", "hyperparameters", "merge", "task_arithmetic",
           "task_vector", "ties", "trim"]
