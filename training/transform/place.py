"""``routezoo transform place``: experts placed on the devices of the ``expert`` mesh axis by
their inter-layer affinity and load.

    routezoo transform place --from RUN --workdir OUT --config.transform.devices=4

ExFlow (Yao et al. 2024, "Exploiting Inter-Layer Expert Affinity for Accelerating
Mixture-of-Experts Model Inference") observes that a token's expert at one MoE layer
predicts its expert at the next, and places experts so that consecutive-layer routes stay
on one GPU; MoETuner (Go & Mahajan 2025) adds the load per device to the objective.
Here, per MoE layer ``l`` with ``E`` (physical) experts and ``N = devices`` devices (the
``expert`` mesh axis shards the stacked experts in ``N`` contiguous blocks of ``E/N``:
slot ``s`` lives on device ``s // (E/N)``):

1. **Statistics** on ``calibration_batches`` batches of the training split, from the
   routing the model makes (:func:`routezoo.training.analyze.make_forward`; padding
   excluded), in physical experts (through the source's expert map): the load
   ``load[l, e]`` (routed copies), the copy-pair matrix ``C[l, i, j]`` (for every token,
   every pair of its copies at layer ``l`` on ``i`` and at layer ``l+1`` on ``j``: ``K²``
   pairs a token) and the top-1 affinity of ``routezoo analyze``
   (:func:`~routezoo.training.analyze.top1_expert`).
2. **Objective** of a placement ``dev[l, e]`` (each device holds ``E/N`` experts of each
   layer): ``J = X / P + balance · mean_l (max_d load_ld / mean_d load_ld - 1)`` with ``X``
   the copy pairs whose two experts sit on different devices, ``P`` all copy pairs and
   ``load_ld`` the copies device ``d`` receives at layer ``l``.
3. **Solver** (``solver='greedy'``): layer 0 by longest-processing-time (experts by
   decreasing load, each onto the least-loaded device with a free slot); each later layer
   expert by expert, in decreasing order of their incoming pair mass, onto the device with a
   free slot that maximises ``C``-mass from the previous layer's experts there minus
   ``balance`` times the device's relative load. Then (``refine``) steepest-descent local
   search over swaps of two experts of one layer on different devices, using the exact
   change of ``J`` (pair mass to both neighbouring layers, the layer's max load), until no
   swap improves. The search starts from the greedy placement and from the source's
   current one; when no swap helps, exchanging the whole expert sets of two devices in one
   layer is tried too (a block move). The better result is kept, so the placement is never
   worse than leaving the experts where they are (on ``J``); it is a local optimum, not
   always the global one. ``solver='exact'``: ``J`` is a sum of per-layer and
   consecutive-layer terms, so dynamic programming over the layers on every balanced
   placement of a layer finds the optimum (small layers only: at most 3,000 placements a
   layer, e.g. 8 experts on 2 or 4 devices). ``solver='identity'`` keeps the current
   placement (a report, and a copy of the model). ``solver='auto'`` (the default): exact
   where it is small enough, else greedy.
4. **Applied** through the expert map: each layer's physical experts move to their new
   slots (stable within a device), the stacked expert parameters are permuted with them and
   ``model.moe.expert_map`` sends every router output to its expert's new slot (one map per
   MoE layer when the layers differ, which runs the stack unscanned). The router, its
   state and every other parameter are unchanged, so the model's outputs are the same
   (bit for bit on one device, up to float reordering when the layout changes).

The report, before and after: ``cross_device_fraction`` (of copy pairs, and of top-1
transitions), ``load_max_over_mean`` per layer, and the rows and bytes the ragged exchange
(:func:`routezoo.layers.moe.exchange.ragged_exchange_rows`) would move on a mesh of ``N``
devices on ``expert`` for the calibration batches, their rows split over the devices as
the batch axis splits them. Note: routezoo's dropless exchange returns every token copy
to its token's device after each layer, so its bytes do not depend on which experts
follow which (only on the load per device); the cross-device fraction is what an
ExFlow-style dispatch, which leaves tokens where their last expert ran, would save.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from routezoo.training.transform import TransformError, TransformResult, register

OPTIONS = {"devices": 0, "calibration_batches": 4, "solver": "auto", "balance": 0.1, "refine": True}
SOLVERS = ("auto", "greedy", "exact", "identity")


# ------------------------------------------------------------------ statistics


def copy_pairs(a: np.ndarray, b: np.ndarray, num_experts: int) -> np.ndarray:
    """``[E, E]`` counts of (copy at layer l on ``i``, copy at layer l+1 on ``j``) pairs over
    tokens: ``a``, ``b`` int ``[T, K]`` experts (``-1``: no copy)."""
    out = np.zeros((num_experts, num_experts), np.int64)
    for ka in range(a.shape[1]):
        for kb in range(b.shape[1]):
            ok = (a[:, ka] >= 0) & (b[:, kb] >= 0)
            np.add.at(out, (a[ok, ka], b[ok, kb]), 1)
    return out


def routing_statistics(config, params, model_state, batches, maps: list[np.ndarray], devices: int,
                       pad_id: int) -> dict[str, Any]:
    """Physical-expert statistics of the model on ``batches`` (module docstring, step 1).

    Args:
      config: the model's config; params / model_state: its unscanned trees.
      batches: host batches ``{'inputs': [B, L]}``.
      maps: per MoE layer, the physical expert of each router output.
      devices: ``N``; the batch rows split into ``N`` contiguous blocks (the token shards).
      pad_id: padding token id (not counted).

    Returns:
      ``{'layers', 'load' [M, E], 'pairs' [M-1, E, E], 'top1' [M-1, E, E],
      'shard_counts' [M, N, E] (copies each token shard sends each expert), 'tokens'}``.
    """
    import jax

    from routezoo import zoo
    from routezoo.training.analyze import make_forward, top1_expert
    from routezoo.zoo import stack
    e = int(config.model.moe.num_experts)
    seq_len = int(config.data.seq_len)
    model = zoo.build(stack.with_scan(config.model, False))
    forward = make_forward(model, config.model.moe, seq_len)
    load = pairs = top1 = shard_counts = None
    tokens = 0
    layers: list[int] = []
    for batch in batches:
        inputs = np.asarray(batch["inputs"])
        decisions = jax.device_get(forward(params, dict(model_state), inputs))
        layers = sorted(decisions)
        m, (b, length) = len(layers), inputs.shape
        if b % devices:
            raise TransformError(f"train.batch_size={b} rows do not split over devices={devices}; give a batch "
                                 f"size divisible by {devices} (--config.train.batch_size)")
        if load is None:
            load = np.zeros((m, e), np.int64)
            pairs = np.zeros((max(m - 1, 0), e, e), np.int64)
            top1 = np.zeros((max(m - 1, 0), e, e), np.int64)
            shard_counts = np.zeros((m, devices, e), np.int64)
        mask = inputs != pad_id
        tokens += int(mask.sum())
        shard = np.broadcast_to((np.arange(b) // (b // devices))[:, None], (b, length))[mask]
        prev = prev_top = None
        for li, layer in enumerate(layers):
            logical = np.asarray(decisions[layer]["indices"]).astype(np.int64)            # [B, L, K]
            table = np.asarray(maps[li], np.int64)
            phys = np.where(logical >= 0, table[np.clip(logical, 0, len(table) - 1)], -1)[mask]   # [T, K]
            ok = phys >= 0
            load[li] += np.bincount(phys[ok], minlength=e)[:e]
            np.add.at(shard_counts[li], (np.broadcast_to(shard[:, None], phys.shape)[ok], phys[ok]), 1)
            top = top1_expert(logical, np.asarray(decisions[layer]["weights"]))[mask]
            top = np.where(top >= 0, table[np.clip(top, 0, len(table) - 1)], -1)
            if prev is not None:
                pairs[li - 1] += copy_pairs(prev, phys, e)
                both = (prev_top >= 0) & (top >= 0)
                np.add.at(top1[li - 1], (prev_top[both], top[both]), 1)
            prev, prev_top = phys, top
    if load is None:
        raise TransformError("no calibration batches (calibration_batches must be >= 1)")
    return {"layers": layers, "load": load, "pairs": pairs, "top1": top1, "shard_counts": shard_counts,
            "tokens": tokens}


# ------------------------------------------------------------------ objective and solver


def devices_of_slots(num_experts: int, devices: int) -> np.ndarray:
    """int ``[E]``: the device of each physical slot (contiguous blocks of ``E/N``)."""
    return np.arange(num_experts) // (num_experts // devices)


def cross_fraction(dev: np.ndarray, pairs: np.ndarray) -> float:
    """Share of the pairs ``pairs [M-1, E, E]`` whose experts sit on different devices under
    ``dev [M, E]`` (0 without pairs)."""
    total = float(pairs.sum())
    if total == 0:
        return 0.0
    cross = sum(float(p[dev[l][:, None] != dev[l + 1][None, :]].sum()) for l, p in enumerate(pairs))
    return cross / total


def device_loads(dev_row: np.ndarray, load_row: np.ndarray, devices: int) -> np.ndarray:
    return np.bincount(dev_row, weights=load_row.astype(np.float64), minlength=devices)


def imbalance(dev: np.ndarray, load: np.ndarray, devices: int) -> np.ndarray:
    """Per layer ``max_d load / mean_d load`` (1 = balanced; 1 for a layer without load)."""
    out = []
    for row, lrow in zip(dev, load):
        dl = device_loads(row, lrow, devices)
        out.append(float(dl.max() / dl.mean()) if dl.sum() > 0 else 1.0)
    return np.asarray(out)


def objective(dev: np.ndarray, pairs: np.ndarray, load: np.ndarray, devices: int, balance: float) -> float:
    """``J`` of the module docstring."""
    return cross_fraction(dev, pairs) + balance * float(np.mean(imbalance(dev, load, devices) - 1.0))


def _greedy(pairs: np.ndarray, load: np.ndarray, devices: int, balance: float) -> np.ndarray:
    m, e = load.shape
    per = e // devices
    total_pairs = max(float(pairs.sum()), 1.0)
    dev = np.zeros((m, e), np.int64)
    for l in range(m):
        lrow = load[l].astype(np.float64)
        mean = max(lrow.sum() / devices, 1e-12)
        free = np.full(devices, per)
        dl = np.zeros(devices)
        if l == 0:
            order = np.argsort(-lrow, kind="stable")
            aff = np.zeros((e, devices))
        else:
            p = pairs[l - 1].astype(np.float64)                              # [E_prev, E]
            aff = np.stack([p[dev[l - 1] == d].sum(0) for d in range(devices)], axis=1)   # [E, N]
            order = np.argsort(-(p.sum(0) + 1e-9 * lrow), kind="stable")
        for j in order:
            score = aff[j] / total_pairs - balance * (dl + lrow[j]) / mean / m
            score = np.where(free > 0, score, -np.inf)
            d = int(np.argmax(score))
            dev[l, j], free[d], dl[d] = d, free[d] - 1, dl[d] + lrow[j]
    return dev


def _refine(dev: np.ndarray, pairs: np.ndarray, load: np.ndarray, devices: int, balance: float,
            max_rounds: int = 10_000) -> np.ndarray:
    """Steepest-descent swaps of two experts of one layer on different devices (exact ΔJ)."""
    dev = dev.copy()
    m, e = load.shape
    total_pairs = max(float(pairs.sum()), 1.0)
    onehot = lambda row: np.eye(devices)[row]                               # noqa: E731  [E, N]
    for _ in range(max_rounds):
        best = (-1e-12, None)
        for l in range(m):
            g = np.zeros((e, devices))                                          # same-device pair mass of j on d
            if l > 0:
                g += pairs[l - 1].T.astype(np.float64) @ onehot(dev[l - 1])
            if l < m - 1:
                g += pairs[l].astype(np.float64) @ onehot(dev[l + 1])
            d = dev[l]
            gain = g[np.arange(e)[:, None], d[None, :]] + g[np.arange(e)[None, :], d[:, None]] \
                - g[np.arange(e), d][:, None] - g[np.arange(e), d][None, :]      # [a, b]: mass kept gained
            lrow = load[l].astype(np.float64)
            dl = device_loads(d, lrow, devices)
            mean = dl.mean()
            if mean > 0 and balance > 0:
                delta = lrow[None, :] - lrow[:, None]                            # a <- b's load on d_a
                new_da = dl[d][:, None] + delta
                new_db = dl[d][None, :] - delta
                others = np.array([np.max(np.where(np.isin(np.arange(devices), [x, y]), -np.inf, dl))
                                   if devices > 2 else -np.inf for x in range(devices) for y in range(devices)]
                                  ).reshape(devices, devices)[d[:, None], d[None, :]]
                new_max = np.maximum(np.maximum(new_da, new_db), others)
                d_imb = (new_max - dl.max()) / mean / m
            else:
                d_imb = np.zeros((e, e))
            d_j = -gain / total_pairs + balance * d_imb
            d_j = np.where(d[:, None] != d[None, :], d_j, np.inf)
            a, b = np.unravel_index(int(np.argmin(d_j)), d_j.shape)
            if d_j[a, b] < best[0]:
                best = (float(d_j[a, b]), (l, int(a), int(b)))
        if best[1] is not None:
            l, a, b = best[1]
            dev[l, a], dev[l, b] = dev[l, b], dev[l, a]
            continue
        # no single swap helps: try exchanging the whole expert sets of two devices in one
        # layer (a block move that realigns a layer with its neighbours)
        now = objective(dev, pairs, load, devices, balance)
        moved = False
        for l in range(m):
            for x in range(devices):
                for y in range(x + 1, devices):
                    trial = dev.copy()
                    trial[l] = np.where(dev[l] == x, y, np.where(dev[l] == y, x, dev[l]))
                    if objective(trial, pairs, load, devices, balance) < now - 1e-12:
                        dev, moved = trial, True
                        now = objective(dev, pairs, load, devices, balance)
        if not moved:
            break
    return dev


EXACT_MAX_STATES = 3000   # balanced placements of one layer the exact solver enumerates at most


def balanced_rows(num_experts: int, devices: int) -> np.ndarray:
    """Every placement of one layer with ``E/N`` experts per device, int ``[S, E]``."""
    per = num_experts // devices
    rows: list[list[int]] = []

    def fill(row, free):
        if len(row) == num_experts:
            rows.append(list(row))
            return
        for d in range(devices):
            if free[d]:
                free[d] -= 1
                fill(row + [d], free)
                free[d] += 1
                if len(rows) > EXACT_MAX_STATES:
                    return
    fill([], [per] * devices)
    return np.asarray(rows, np.int64)


def solve_exact(pairs: np.ndarray, load: np.ndarray, devices: int, *, balance: float = 0.1) -> np.ndarray:
    """The placement of least ``J``: ``J`` is a sum of per-layer terms (load balance) and
    terms of consecutive layers (pairs), so dynamic programming over the layers (Viterbi)
    on every balanced placement of a layer finds the optimum. Only for small layers
    (at most :data:`EXACT_MAX_STATES` placements: e.g. 8 experts on 2 or 4 devices)."""
    m, e = load.shape
    rows = balanced_rows(e, devices)
    if len(rows) > EXACT_MAX_STATES:
        raise ValueError(f"{e} experts on {devices} devices have more than {EXACT_MAX_STATES} placements per layer; "
                         "the exact solver is for small layers (use solver='greedy')")
    onehot = np.eye(devices)[rows]                                            # [S, E, N]
    total_pairs = max(float(pairs.sum()), 1.0)
    unary = np.stack([balance * (np.asarray([imbalance(r[None], load[l][None], devices)[0] for r in rows]) - 1) / m
                      for l in range(m)])                                     # [M, S]
    cost, back = unary[0].copy(), []
    for l in range(m - 1):
        p = pairs[l].astype(np.float64)
        x = np.einsum("aid,ij->ajd", onehot, p)                               # [S, E, N]
        same = np.einsum("ajd,bjd->ab", x, onehot)                            # [S_l, S_l+1] pairs kept
        trans = (p.sum() - same) / total_pairs
        step = cost[:, None] + trans
        back.append(np.argmin(step, axis=0))
        cost = step[back[-1], np.arange(len(rows))] + unary[l + 1]
    path = [int(np.argmin(cost))]
    for b in reversed(back):
        path.append(int(b[path[-1]]))
    return rows[path[::-1]]


def solve(pairs: np.ndarray, load: np.ndarray, devices: int, *, balance: float = 0.1, refine: bool = True,
          current: np.ndarray | None = None) -> np.ndarray:
    """A placement ``dev [M, E]`` (device of each physical expert of each layer, ``E/N`` per
    device) minimising ``J`` (module docstring): the greedy placement and ``current`` (the
    slots where the experts are now; default ``devices_of_slots``) each refined by swaps,
    the better kept (never worse than ``current`` on ``J``).

    Args:
      pairs: ``[M-1, E, E]`` copy pairs between consecutive MoE layers.
      load: ``[M, E]`` copies per expert.
      devices: ``N`` (divides ``E``).
      balance: the weight of the load imbalance in ``J``.
      refine: run the local search.
      current: the current placement ``[M, E]``.
    """
    m, e = load.shape
    if devices < 1 or e % devices:
        raise ValueError(f"devices={devices} must divide the {e} experts")
    if current is None:
        current = np.tile(devices_of_slots(e, devices), (m, 1))
    candidates = [current.copy(), _greedy(pairs, load, devices, balance)]
    if refine:
        candidates = [_refine(c, pairs, load, devices, balance) for c in candidates]
    costs = [objective(c, pairs, load, devices, balance) for c in candidates]
    return candidates[int(np.argmin(costs))]


def slots_of(dev_row: np.ndarray, devices: int) -> np.ndarray:
    """``new_slot[p]`` for each physical expert ``p`` placed on device ``dev_row[p]``: device
    ``d``'s experts fill slots ``[d·E/N, (d+1)·E/N)`` in their current order (a permutation)."""
    e = len(dev_row)
    per = e // devices
    order = np.lexsort((np.arange(e), dev_row))            # by device, then current slot
    slots = np.empty(e, np.int64)
    slots[order] = np.arange(e)
    if np.any(np.bincount(dev_row, minlength=devices) != per):
        raise ValueError(f"placement {dev_row.tolist()} does not put {per} experts on each of {devices} devices")
    return slots


# ------------------------------------------------------------------ the transform


def _exchange_report(shard_counts: np.ndarray, dev: np.ndarray, devices: int, row_bytes: int) -> dict[str, Any]:
    """Ragged-exchange rows and bytes with the experts at ``dev`` (slots from :func:`slots_of`)."""
    from routezoo.layers.moe.exchange import ragged_exchange_rows
    cross, recv_max, total = [], [], []
    for l, counts in enumerate(shard_counts):
        slots = slots_of(dev[l], devices)
        moved = np.zeros_like(counts)
        moved[:, slots] = counts                           # copies by the slot their expert now holds
        rows = ragged_exchange_rows(moved, devices)        # [sender, receiver]
        cross.append(int(rows.sum() - np.trace(rows)))
        total.append(int(rows.sum()))
        recv_max.append(int(rows.sum(0).max()))
    return {"rows_cross_device": cross, "rows_total": total, "max_rows_received": recv_max,
            "bytes_cross_device_both_ways": int(2 * sum(cross) * row_bytes)}


def _summary(dev, stats, devices, row_bytes) -> dict[str, Any]:
    imb = imbalance(dev, stats["load"], devices)
    return {"cross_device_fraction": cross_fraction(dev, stats["pairs"]),
            "cross_device_fraction_top1": cross_fraction(dev, stats["top1"]),
            "load_max_over_mean": [float(x) for x in imb],
            "load_max_over_mean_mean": float(np.mean(imb)),
            "ragged_exchange": _exchange_report(stats["shard_counts"], dev, devices, row_bytes)}


@register("place", options=OPTIONS, needs_moe=True,
          summary="ExFlow/MoETuner: experts onto the expert-axis devices by inter-layer affinity and load")
def place(source, opts, ctx):
    """The ``place`` transform (module docstring)."""
    import jax.numpy as jnp

    from routezoo.layers.moe.block import format_expert_maps, layer_expert_maps
    from routezoo.layers.routers import Router, router_class
    config = source.copy_config()
    moe = config.model.moe
    e = int(moe.num_experts)
    devices = int(opts["devices"]) or int(config.mesh.get("expert", 1))
    if devices <= 1:
        raise TransformError("place needs the number of devices of the expert mesh axis: "
                             "--config.transform.devices=N (N > 1, dividing model.moe.num_experts)")
    if e % devices:
        divisors = [n for n in range(2, e + 1) if e % n == 0]
        raise TransformError(f"devices={devices} does not divide model.moe.num_experts={e}; allowed: {divisors}")
    if opts["solver"] not in SOLVERS:
        raise TransformError(f"solver={opts['solver']!r} is unknown; known: {list(SOLVERS)}")
    if opts["balance"] < 0:
        raise TransformError(f"balance={opts['balance']} must be >= 0")
    cls = router_class(str(moe.router))
    if not cls.makes_expert_choices or getattr(cls.build_block, "__func__", None) is not Router.build_block.__func__:
        raise TransformError(f"moe.router={moe.router!r} has no stacked experts behind a token-to-expert router "
                             "to place; place works on the sparse MoE block")
    layers = source.moe_layers
    maps = [np.asarray(m, np.int64) for m in layer_expert_maps(moe, len(layers))]
    from routezoo.training import data as data_lib
    data_lib.ensure_dataset(config.data)
    pad = data_lib.get_tokenizer(config.data).pad_id
    batches = ctx.batches(int(opts["calibration_batches"]), config)
    stats = routing_statistics(config, source.params, source.model_state, batches, maps, devices, pad)
    current = np.tile(devices_of_slots(e, devices), (len(layers), 1))
    if opts["solver"] == "identity":
        dev = current
    elif opts["solver"] == "exact" or (opts["solver"] == "auto"
                                       and len(balanced_rows(e, devices)) <= EXACT_MAX_STATES):
        try:
            dev = solve_exact(stats["pairs"], stats["load"], devices, balance=float(opts["balance"]))
        except ValueError as err:
            raise TransformError(str(err)) from None
    else:
        dev = solve(stats["pairs"], stats["load"], devices, balance=float(opts["balance"]),
                    refine=bool(opts["refine"]), current=current)
    from routezoo.zoo.lm import resolve_dtype
    row_bytes = int(config.model.d_model) * jnp.dtype(resolve_dtype(config.model.dtype)).itemsize   # compute dtype

    params = dict(source.params)                            # the source's trees are not changed
    new_maps = []
    for li, layer in enumerate(layers):
        slots = slots_of(dev[li], devices)                  # old physical slot -> new slot
        inv = np.argsort(slots)                             # new slot -> old physical slot
        params[f"layer{layer}"] = dict(params[f"layer{layer}"])
        block = params[f"layer{layer}"]["moe"] = dict(params[f"layer{layer}"]["moe"])
        block["experts"] = {k: np.asarray(w)[inv] for k, w in block["experts"].items()}
        new_maps.append(slots[maps[li]])
    identity = all(np.array_equal(m, np.arange(e)) for m in new_maps)
    moe.expert_map = "" if identity and not str(source.config.model.moe.expert_map).strip() \
        else format_expert_maps(new_maps)
    solver = opts["solver"] if opts["solver"] != "auto" else (
        "exact" if len(balanced_rows(e, devices)) <= EXACT_MAX_STATES else "greedy")
    report = {"devices": devices, "solver": solver, "balance": float(opts["balance"]),
              "refine": bool(opts["refine"]), "calibration_batches": len(batches), "tokens": stats["tokens"],
              "moe_layers": layers, "objective_before": objective(current, stats["pairs"], stats["load"], devices,
                                                                   float(opts["balance"])),
              "objective_after": objective(dev, stats["pairs"], stats["load"], devices, float(opts["balance"])),
              "before": _summary(current, stats, devices, row_bytes),
              "after": _summary(dev, stats, devices, row_bytes),
              "placement": [[int(d) for d in row] for row in dev],
              "expert_map": str(moe.expert_map)}
    b, a = report["before"], report["after"]
    ctx.log(f"place on {devices} devices: cross-device copy pairs {b['cross_device_fraction']:.3f} -> "
            f"{a['cross_device_fraction']:.3f}, load max/mean {b['load_max_over_mean_mean']:.3f} -> "
            f"{a['load_max_over_mean_mean']:.3f}")
    return TransformResult(config, params, source.model_state, report)


__all__ = ["EXACT_MAX_STATES", "OPTIONS", "SOLVERS", "balanced_rows", "solve_exact", "copy_pairs", "cross_fraction", "devices_of_slots", "imbalance", "objective",
           "place", "routing_statistics", "slots_of", "solve"]
