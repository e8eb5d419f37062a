"""Operations on the stacked experts of trained MoE layers, on parameter arrays (numpy).

Einsum letters: ``D`` embed, ``F`` expert_mlp (an expert's hidden units), ``E`` physical
experts (the stacked weights' leading axis), ``R`` router outputs (the router's width; with
an expert map ``m [R]`` router output ``r`` runs physical expert ``m[r]``), ``T`` tokens,
``K`` experts per token, ``N`` experts (or groups) kept, ``Z`` null experts.

An expert is the dict of its weights: ``wi`` ``[D, F]``, ``wo`` ``[F, D]`` and, for SwiGLU,
``wi_gate`` ``[D, F]``; a layer's experts are the same names stacked ``[E, ...]``
(:class:`routezoo.layers.moe.block.Experts`). The hidden axis is the last of ``wi`` /
``wi_gate`` and the first of ``wo``; permuting it the same way in all three never changes
what the expert computes (its activation is elementwise).

What is here (the commands in ``routezoo.training.transform`` read calibration data and
workdirs, then call these):

* :func:`linear_assignment`: exact maximum-weight assignment (Hungarian, O(n^3));
* :func:`neuron_alignment` / :func:`permute_neurons`: weight matching of one expert's hidden
  units to another's (MC-SMoE's permutation alignment);
* :func:`expert_usage`, :func:`physical_logits`, :func:`logit_similarity`,
  :func:`group_experts`: MC-SMoE's grouping: the ``N`` most used experts are the groups'
  dominant experts, every other expert joins the dominant one whose router logits over the
  calibration tokens are most similar;
* :func:`merge_experts`: one expert per group: ``mc_smoe`` (align to the dominant expert,
  average weighted by usage) or ``average`` (plain mean, no alignment);
* :func:`prune_experts`: keep the ``N`` most used experts and their router outputs;
* :func:`low_rank_plus_sparse`: ``W ≈ U V + S`` (MC-SMoE's compression);
* :func:`null_router_kernel` / :func:`null_k_range`: AdaMoE's null experts added to a
  trained top-k router.

References: Li et al. 2024, "Merge, Then Compress: Demystify Efficient SMoE with Hints from
Its Routing Policy" (ICLR 2024); Zeng et al. 2024, "AdaMoE: Token-Adaptive Routing with
Null Experts for Mixture-of-Experts Language Models".
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

MERGE_METHODS = ("mc_smoe", "average", "prune")
# hidden axis of each expert weight, per expert (without the leading expert axis)
HIDDEN_AXIS = {"wi": 1, "wi_gate": 1, "wo": 0}


# ------------------------------------------------------------------ assignment


def linear_assignment(score: np.ndarray) -> np.ndarray:
    """Maximum-weight perfect matching of a square ``score [n, n]``.

    Returns ``perm`` ``[n]`` (a permutation) maximising ``Σ_i score[i, perm[i]]``. Exact:
    the Hungarian method with potentials and shortest augmenting paths (one row added per
    round, ``O(n^3)``; numpy over the columns, so ``n^2`` Python steps).
    """
    a = np.asarray(score, np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"linear_assignment: need a square matrix, got shape {a.shape}")
    n = a.shape[0]
    if n == 0:
        return np.zeros((0,), np.int64)
    cost = np.zeros((n + 1, n + 1))
    cost[1:, 1:] = a.max() - a            # minimise; non-negative costs
    u = np.zeros(n + 1)                   # row potentials
    v = np.zeros(n + 1)                   # column potentials
    match = np.zeros(n + 1, np.int64)     # match[j]: row assigned to column j (0: none)
    way = np.zeros(n + 1, np.int64)
    for i in range(1, n + 1):
        match[0] = i
        j0 = 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, bool)
        while True:
            used[j0] = True
            i0 = match[j0]
            free = ~used
            free[0] = False
            cur = cost[i0] - u[i0] - v     # reduced costs of row i0
            better = free & (cur < minv)
            minv[better] = cur[better]
            way[better] = j0
            cand = np.where(free, minv, np.inf)
            j1 = int(np.argmin(cand))
            delta = cand[j1]
            u[match[used]] += delta
            v[used] -= delta
            minv[free] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:                          # augment along the path
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    perm = np.zeros(n, np.int64)
    perm[match[1:] - 1] = np.arange(n)
    return perm


# ------------------------------------------------------------------ neuron alignment


def _check_expert(expert: Mapping[str, np.ndarray]) -> int:
    if "wi" not in expert or "wo" not in expert:
        raise ValueError(f"an expert needs 'wi' and 'wo'; got {sorted(expert)}")
    f = np.shape(expert["wi"])[-1]
    for name, w in expert.items():
        if name not in HIDDEN_AXIS:
            raise ValueError(f"unknown expert weight {name!r}; known: {sorted(HIDDEN_AXIS)}")
        if np.shape(w)[HIDDEN_AXIS[name]] != f:
            raise ValueError(f"expert weight {name!r} {np.shape(w)} does not have {f} hidden units")
    return f


def neuron_alignment(ref: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray]) -> np.ndarray:
    """The permutation of ``other``'s hidden units that best matches ``ref``'s.

    Weight matching (MC-SMoE, after Git Re-Basin): the score of pairing ``ref``'s unit ``a``
    with ``other``'s unit ``b`` is the sum over the expert's weights of the inner product of
    the unit's weight vectors, ``Σ_D wi^ref[D, a] wi^other[D, b] (+ wi_gate the same) +
    Σ_D wo^ref[a, D] wo^other[b, D]``; the permutation maximises the total score
    (:func:`linear_assignment`).

    Returns:
      ``perm`` ``[F]``: unit ``a`` of the aligned expert is ``other``'s unit ``perm[a]``
      (apply with :func:`permute_neurons`).
    """
    f = _check_expert(ref)
    if _check_expert(other) != f or set(ref) != set(other):
        raise ValueError("neuron_alignment: the experts differ in weights or hidden width")
    score = np.zeros((f, f))
    for name in ref:
        a = np.moveaxis(np.asarray(ref[name], np.float64), HIDDEN_AXIS[name], 0).reshape(f, -1)
        b = np.moveaxis(np.asarray(other[name], np.float64), HIDDEN_AXIS[name], 0).reshape(f, -1)
        score += a @ b.T   # [F_ref, F_other]
    return linear_assignment(score)


def permute_neurons(expert: Mapping[str, np.ndarray], perm: np.ndarray) -> dict[str, np.ndarray]:
    """``expert`` with its hidden units reordered: new unit ``a`` = old unit ``perm[a]``."""
    _check_expert(expert)
    perm = np.asarray(perm)
    return {name: np.take(np.asarray(w), perm, axis=HIDDEN_AXIS[name]) for name, w in expert.items()}


# ------------------------------------------------------------------ routing statistics


def identity_map(num_outputs: int) -> np.ndarray:
    return np.arange(num_outputs, dtype=np.int32)


def expert_usage(indices: np.ndarray, expert_map: np.ndarray, num_experts: int,
                 valid: np.ndarray | None = None) -> np.ndarray:
    """Routed token copies per physical expert, ``[E]`` (float).

    Args:
      indices: int ``[T, K]`` router outputs chosen per token slot (``-1``: empty slot).
      expert_map: int ``[R]``, the physical expert of each router output.
      num_experts: ``E``.
      valid: optional bool ``[T]``: tokens to count (padding excluded).
    """
    idx = np.asarray(indices).reshape(-1, np.shape(indices)[-1])
    if valid is not None:
        idx = idx[np.asarray(valid).reshape(-1)]
    idx = idx[idx >= 0]
    phys = np.asarray(expert_map)[idx]
    return np.bincount(phys, minlength=num_experts).astype(np.float64)[:num_experts]


def physical_logits(logits: np.ndarray, expert_map: np.ndarray, num_experts: int) -> np.ndarray:
    """Router logits per physical expert ``[T, E]`` from logits per router output ``[T, R]``.

    ``log Σ_{r: m[r] = e} exp h_r`` (the log of the probability mass routed to ``e``, up to
    the softmax's normaliser): with the identity map (or a permutation) these are the
    logits themselves. An expert that no router output reaches gets a column of zeros.
    """
    h = np.asarray(logits, np.float64)
    m = np.asarray(expert_map)
    out = np.zeros((h.shape[0], num_experts))
    for e in range(num_experts):
        cols = h[:, m == e]
        if cols.shape[1]:
            top = cols.max(axis=1, keepdims=True)
            out[:, e] = (top + np.log(np.exp(cols - top).sum(axis=1, keepdims=True)))[:, 0]
    return out


def logit_similarity(logits: np.ndarray) -> np.ndarray:
    """``s(i, j) = (cos(h_{:,i}, h_{:,j}) + 1) / 2`` ``[E, E]`` between the logit columns of
    ``logits [T, E]`` over the calibration tokens (MC-SMoE's router-logit similarity)."""
    h = np.asarray(logits, np.float64)
    norm = np.linalg.norm(h, axis=0)
    unit = h / np.where(norm > 0, norm, 1.0)
    return (unit.T @ unit + 1.0) / 2.0


def top_by_usage(usage: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` most used experts (ties: the lower index first), in index order."""
    usage = np.asarray(usage, np.float64)
    order = np.argsort(-usage, kind="stable")
    return np.sort(order[:n])


def group_experts(usage: np.ndarray, similarity: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """MC-SMoE's grouping of one layer's ``E`` experts into ``N = num_groups`` groups.

    The ``N`` most used experts (:func:`top_by_usage`) are the dominant experts, one per
    group, groups numbered in the dominant experts' index order; every other expert joins
    the group whose dominant expert is most similar to it (``similarity [E, E]``; ties: the
    lower group).

    Returns:
      ``(dominant [N], group [E])``: the dominant expert of each group and each expert's group.
    """
    usage = np.asarray(usage, np.float64)
    e = usage.shape[0]
    if not 1 <= num_groups <= e:
        raise ValueError(f"num_groups={num_groups} must be between 1 and the {e} experts")
    dominant = top_by_usage(usage, num_groups)
    sim = np.asarray(similarity, np.float64)[:, dominant]   # [E, N]
    group = np.argmax(sim, axis=1)
    group[dominant] = np.arange(num_groups)
    return dominant, group.astype(np.int32)


# ------------------------------------------------------------------ merging and pruning


def _expert(experts: Mapping[str, np.ndarray], e: int) -> dict[str, np.ndarray]:
    return {name: np.asarray(w)[e] for name, w in experts.items()}


def merge_experts(experts: Mapping[str, np.ndarray], group: np.ndarray, dominant: np.ndarray,
                  usage: np.ndarray, method: str = "mc_smoe") -> tuple[dict[str, np.ndarray], dict]:
    """One expert per group from stacked ``experts`` (``{name: [E, ...]}``).

    Methods:
      ``mc_smoe``: each member is aligned to its group's dominant expert
        (:func:`neuron_alignment`), then ``W_g = Σ_{e∈g} u_e W_e / Σ_{e∈g} u_e`` with ``u``
        = ``usage``; a group whose members were never used gets the plain mean.
      ``average``: ``W_g`` = the plain mean of the members' weights, unaligned.

    Returns:
      ``({name: [N, ...]}, info)``, with ``info['weights']`` ``[E]`` (each expert's share of
      its group's average) and ``info['permutations']`` (``{expert: perm}`` of the aligned
      members).
    """
    if method not in ("mc_smoe", "average"):
        raise ValueError(f"merge method {method!r} is not a weight average; known: mc_smoe, average")
    group = np.asarray(group)
    dominant = np.asarray(dominant)
    usage = np.asarray(usage, np.float64)
    n = dominant.shape[0]
    shares = np.zeros(group.shape[0])
    perms: dict[int, np.ndarray] = {}
    merged: dict[str, list[np.ndarray]] = {name: [] for name in experts}
    for g in range(n):
        members = np.flatnonzero(group == g)
        if method == "mc_smoe" and usage[members].sum() > 0:
            w = usage[members] / usage[members].sum()
        else:
            w = np.full(members.shape[0], 1.0 / members.shape[0])
        shares[members] = w
        ref = _expert(experts, int(dominant[g]))
        acc = {name: np.zeros(np.shape(x), np.float64) for name, x in ref.items()}
        for e, we in zip(members, w):
            ex = _expert(experts, int(e))
            if method == "mc_smoe" and e != dominant[g]:
                perms[int(e)] = neuron_alignment(ref, ex)
                ex = permute_neurons(ex, perms[int(e)])
            for name in acc:
                acc[name] += we * np.asarray(ex[name], np.float64)
        for name in acc:
            merged[name].append(acc[name])
    out = {name: np.stack(ws).astype(np.asarray(experts[name]).dtype) for name, ws in merged.items()}
    return out, {"weights": shares, "permutations": perms}


def merged_expert_map(expert_map: np.ndarray, group: np.ndarray) -> np.ndarray:
    """The expert map after merging: router output ``r`` runs group ``group[m[r]]``."""
    return np.asarray(group)[np.asarray(expert_map)].astype(np.int32)


def prune_experts(experts: Mapping[str, np.ndarray], router_kernel: np.ndarray, expert_map: np.ndarray,
                  usage: np.ndarray, num_keep: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Keep the ``N = num_keep`` most used physical experts; drop the rest with the router
    outputs that reach them (the router's softmax then renormalises over the outputs left).

    Args:
      experts: ``{name: [E, ...]}``.
      router_kernel: ``[D, R]``.
      expert_map: ``[R]``.
      usage: ``[E]``.
      num_keep: ``N``.

    Returns:
      ``(experts {name: [N, ...]}, router kernel [D, R'], expert map [R'], kept router
      outputs [R'])``; kept experts and router outputs stay in their order.
    """
    e = np.shape(usage)[0]
    if not 1 <= num_keep <= e:
        raise ValueError(f"num_keep={num_keep} must be between 1 and the {e} experts")
    keep = top_by_usage(usage, num_keep)
    new_index = np.full(e, -1)
    new_index[keep] = np.arange(num_keep)
    m = np.asarray(expert_map)
    outputs = np.flatnonzero(new_index[m] >= 0)
    pruned = {name: np.asarray(w)[keep] for name, w in experts.items()}
    return pruned, np.asarray(router_kernel)[:, outputs], new_index[m[outputs]].astype(np.int32), outputs


# ------------------------------------------------------------------ compression


def low_rank_plus_sparse(w: np.ndarray, rank: int, density: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``W ≈ U V + S`` for a matrix ``w [m, n]`` (MC-SMoE's compression of merged experts).

    ``U V`` is the truncated SVD at ``rank`` (the best rank-``r`` approximation in
    Frobenius norm); ``S`` keeps the ``round(density · m · n)`` largest-magnitude entries
    of the residual ``W - U V`` (ties: the lower flat index) and is zero elsewhere. Full
    rank (``min(m, n)``) or ``density = 1`` reconstruct ``W`` up to rounding.

    Returns:
      ``(U [m, r], V [r, n], S [m, n])``, ``U`` holding the singular values.
    """
    w = np.asarray(w, np.float64)
    if w.ndim != 2:
        raise ValueError(f"low_rank_plus_sparse: need a matrix, got shape {w.shape}")
    m, n = w.shape
    r = int(rank)
    if not 0 <= r <= min(m, n):
        raise ValueError(f"rank={r} must be between 0 and {min(m, n)}")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density={density} must be in [0, 1]")
    if r:
        uu, sv, vt = np.linalg.svd(w, full_matrices=False)
        u, v = uu[:, :r] * sv[:r], vt[:r]
    else:
        u, v = np.zeros((m, 0)), np.zeros((0, n))
    resid = w - u @ v
    nnz = int(round(density * m * n))
    s = np.zeros_like(w)
    if nnz:
        flat = np.argsort(-np.abs(resid).reshape(-1), kind="stable")[:nnz]
        s.reshape(-1)[flat] = resid.reshape(-1)[flat]
    return u, v, s


def compressed_size(shape: tuple[int, int], rank: int, density: float) -> int:
    """Values a factored store of :func:`low_rank_plus_sparse` holds: ``r (m + n)`` plus the
    sparse entries (their indices not counted)."""
    m, n = shape
    return int(rank) * (m + n) + int(round(density * m * n))


def rank_for_rate(shape: tuple[int, int], rate: float, density: float) -> int:
    """The largest rank whose factored store (:func:`compressed_size`) is at most ``rate``
    times the dense ``m · n`` values."""
    m, n = shape
    budget = rate * m * n - round(density * m * n)
    return int(max(0, min(min(m, n), np.floor(budget / (m + n)))))


# ------------------------------------------------------------------ null experts


def tiled_null_k(k: int, num_outputs: int, num_null: int) -> int:
    """The ``k`` that keeps a top-``k`` routing over ``R`` outputs unchanged once ``Z``
    tiled null columns are added (:func:`null_router_kernel`), whatever the order of equal
    logits: ``k (R + Z) / R``, defined when ``R`` divides ``Z``; ``ValueError`` otherwise."""
    return null_k_range(k, num_outputs, num_null)[1]


def null_k_range(k: int, num_outputs: int, num_null: int) -> tuple[int, int]:
    """``(lo, hi)``: with ``c = 1 + Z/R`` equal logits per router output (``R`` divides
    ``Z``), top-``k'`` over the ``R + Z`` columns selects exactly the original top-``k``
    real outputs for every ``lo = (k - 1) c + 1 <= k' <= hi = k c``, when equal logits are
    ordered real column first (the routers' stable top-k); ``k' = hi`` needs no order at
    all. ``ValueError`` when ``R`` does not divide ``Z``."""
    if num_null % num_outputs:
        raise ValueError(f"{num_null} null experts are not a multiple of the {num_outputs} router outputs")
    c = 1 + num_null // num_outputs
    return (k - 1) * c + 1, k * c


def null_router_kernel(kernel: np.ndarray, num_null: int) -> np.ndarray:
    """AdaMoE's null columns added to a router kernel ``[D, R]``: ``[D, R + Z]``.

    Null column ``j`` is a copy of real column ``j mod R`` (the authors' Mixtral fine-tune
    tiles the real rows). When ``R`` divides ``Z`` every router output has ``c = 1 + Z/R``
    equal logits, so top-``k'`` over ``R + Z`` for ``k'`` in :func:`null_k_range` picks,
    among the real outputs, exactly the original top ``k`` (``k' = c·k`` takes every copy
    of the top ``k``; a smaller ``k'`` relies on a tie going to the lower index, the real
    column before its null copies), and real weights renormalised over the selected real
    outputs are the original ones: the model computes what it did before. Fine-tuning then separates the null
    columns from their real ones (the load-balance loss acts on them differently).
    """
    kernel = np.asarray(kernel)
    r = kernel.shape[-1]
    cols = np.arange(num_null) % r
    return np.concatenate([kernel, kernel[:, cols]], axis=-1)
