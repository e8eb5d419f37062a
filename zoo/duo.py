"""Duo-LLM stage 2: the oracle route of every token under a compute budget, by exhaustive search.

Letters: ``B`` batch, ``L`` length, ``p`` evaluated positions, ``Z`` Duo layers (the MoE
slots of the model, in layer order), ``u`` routes evaluated, ``q`` evaluations per chunk,
``j`` work items (evaluations in all), ``V`` vocab.

A route is one option per Duo layer, ``r ∈ {0 big, 1 small, 2 skip}^Z``; its cost is
``Σ_l cost(r_l)`` in units of the big module (big 1, small ``small_dim/expert_dim``, skip 0,
:func:`routezoo.layers.moe.duo.option_costs`). :func:`oracle_routes` finds, for every token
position ``t``, the route within ``budget`` that minimises the loss at ``t`` (the
next-token cross-entropy of the prediction made at ``t``), by trying every such route
(Alizadeh et al. 2024, "Duo-LLM: A Framework for Studying Adaptive Computation in Large
Language Models", arXiv:2410.10846, stage 2; the paper's exact search is unverified).

The choice made here, as the method card asks to state it: changing token ``t``'s route
changes its keys and values, hence later tokens' outputs, so routes of different tokens
are not independent. The search fixes every other token's route to ``context_route``
while it searches token ``t``'s: each evaluation is one forward pass with token ``t`` on
the candidate route and every other token on the context route. Tokens after ``t`` do not
affect the loss at ``t`` (causal attention), so only the prefix's context matters. The
routes found per token are therefore each optimal given that context, not jointly
optimal for the sequence.

Cost of the search: ``B·p·u`` forward passes of length ``L``, batched ``batch_size`` at a
time through one jitted function; meant for small models and short sequences (the
paper's setting: a 12-layer model). :func:`summarize_oracle` condenses the result: use of
big modules by layer and by position bucket (the paper reports that earlier tokens use
big modules more).

Stage-2 recipe (a run trained with ``moe.router=duo``)::

    from routezoo.training.train import load_trained
    from routezoo.zoo.duo import oracle_routes, summarize_oracle
    config, model, state = load_trained(WORKDIR)
    result = oracle_routes(model, {"params": state.params}, tokens, budget=1.0)
    print(summarize_oracle(result))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from routezoo.layers.moe.duo import BIG, OPTIONS, DuoRouter, option_costs

_EPS = 1e-9   # slack of the budget comparison (costs are sums of floats)


@dataclasses.dataclass(frozen=True)
class OracleResult:
    """What :func:`oracle_routes` returns (numpy arrays).

    Attributes:
      routes: int32 ``[B, p, Z]``: the best route of each token (0 big, 1 small, 2 skip per
        Duo layer); ties go to the first candidate in lexicographic order (more big first).
      loss: float32 ``[B, p]``: the loss at each token on its best route.
      cost: float32 ``[B, p]``: the cost of the best route.
      candidates: int32 ``[u, Z]``: every route with cost <= budget, lexicographic order.
      candidate_loss: float32 ``[B, p, u]``: the loss at each token on each candidate.
      reference_loss: ``{'big', 'small', 'skip', 'context'}`` -> float32 ``[B, p]``: the
        loss at each token with that option in every layer ('context': its context route),
        every other token on the context route, whether or not within the budget. With
        ``context_route='big'``, ``'big'`` is the plain all-big model.
      reference_cost: the cost of each reference route (``'context'``: ``[B, p]``).
      positions: int32 ``[p]``: the positions evaluated.
      budget: the budget.
    """

    routes: np.ndarray
    loss: np.ndarray
    cost: np.ndarray
    candidates: np.ndarray
    candidate_loss: np.ndarray
    reference_loss: dict[str, np.ndarray]
    reference_cost: dict[str, Any]
    positions: np.ndarray
    budget: float


def model_costs(model: Any) -> tuple[float, float, float]:
    """(big, small, skip) costs of a ``DecoderLM`` with ``moe.router='duo'``."""
    cfg = model.cfg
    if not any(kind == "moe" for kind in _kinds(model)) or not issubclass(_router_class(cfg), DuoRouter):
        raise ValueError("Duo oracle: the model needs MoE slots with model.moe.router='duo'")
    return option_costs(int(cfg.moe.expert_dim), int(cfg.moe.duo_small_dim))


def _router_class(cfg: Any) -> type:
    from routezoo.layers.routers import ROUTERS
    return ROUTERS.get(str(cfg.moe.router), type(None))


def _kinds(model: Any) -> tuple[str, ...]:
    from routezoo.zoo.lm import ffn_kinds
    return ffn_kinds(model.cfg)


def count_candidates(num_layers: int, costs: tuple[float, float, float], budget: float) -> int:
    """Number of routes in ``{0,1,2}^Z`` with cost <= ``budget`` (exact, without listing them)."""
    m = int(num_layers)
    total = 0
    for nb in range(m + 1):
        for ns in range(m - nb + 1):
            if nb * costs[0] + ns * costs[1] + (m - nb - ns) * costs[2] <= budget + _EPS:
                total += math.comb(m, nb) * math.comb(m - nb, ns)
    return total


def candidate_routes(num_layers: int, costs: tuple[float, float, float], budget: float,
                     max_candidates: int = 4096) -> np.ndarray:
    """Every route with cost <= ``budget``, int32 ``[u, Z]`` in lexicographic order.

    Raises ``ValueError`` (one line, with the numbers) when ``u > max_candidates``."""
    m = int(num_layers)
    n = count_candidates(m, costs, budget)
    if n > max_candidates:
        raise ValueError(f"Duo oracle: {n} routes of {m} layers fit budget {budget} (of {3 ** m}), more "
                         f"than max_candidates={max_candidates}; lower the budget or raise max_candidates")
    if n == 0:
        raise ValueError(f"Duo oracle: no route of {m} layers fits budget {budget} (the cheapest costs "
                         f"{m * min(costs)})")
    cheapest = min(costs)
    out: list[tuple[int, ...]] = []

    def extend(prefix: tuple[int, ...], spent: float) -> None:
        if len(prefix) == m:
            out.append(prefix)
            return
        rest = (m - len(prefix) - 1) * cheapest
        for option in range(len(OPTIONS)):
            if spent + costs[option] + rest <= budget + _EPS:
                extend(prefix + (option,), spent + costs[option])

    extend((), 0.0)
    return np.asarray(out, np.int32).reshape(len(out), m)


def oracle_routes(model: Any, variables: Any, tokens: Any, *, budget: float, targets: Any = None,
                  context_route: Any = "big", max_candidates: int = 4096,
                  batch_size: int = 64) -> OracleResult:
    """The best route of every token under ``budget`` (see the module docstring).

    Args:
      model: a :class:`~routezoo.zoo.lm.DecoderLM` with ``model.moe.router='duo'`` (any
        ``duo_mode``: routes are given from outside).
      variables: its variables (``{'params': ...}``).
      tokens: int ``[B, L]``: the input sequences.
      budget: the largest route cost allowed, in big modules (``1.0``: one big module,
        or up to four small ones at the default small width ``expert_dim // 4``).
      targets: int ``[B, L]``, the token each position predicts; ``None``: the next token
        (``tokens[:, 1:]``), positions ``0 .. L-2`` (``p = L - 1``).
      context_route: the route of every token other than the one searched: ``'big'``,
        ``'small'``, ``'skip'`` (that option in every layer) or int ``[Z, B, L]`` (e.g. a
        trained router's routes).
      max_candidates: refuse (``ValueError``) budgets with more routes than this.
      batch_size: forward passes per call of the jitted evaluation (``q``).
    """
    costs = model_costs(model)
    m = sum(kind == "moe" for kind in _kinds(model))
    tokens = np.asarray(tokens, np.int32)
    b, l = tokens.shape
    if targets is None:
        targets = np.concatenate([tokens[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
        positions = np.arange(l - 1, dtype=np.int32)
    else:
        targets = np.asarray(targets, np.int32)
        if targets.shape != (b, l):
            raise ValueError(f"Duo oracle: targets {targets.shape} must have the tokens' shape {(b, l)}")
        positions = np.arange(l, dtype=np.int32)
    if isinstance(context_route, str):
        if context_route not in OPTIONS:
            raise ValueError(f"Duo oracle: context_route={context_route!r}; allowed: {', '.join(OPTIONS)} "
                             f"or int routes [M, B, L]")
        context = np.full((m, b, l), OPTIONS.index(context_route), np.int32)
    else:
        context = np.asarray(context_route, np.int32)
        if context.shape != (m, b, l):
            raise ValueError(f"Duo oracle: context_route {context.shape} must be [M, B, L] = {(m, b, l)}")

    candidates = candidate_routes(m, costs, budget, max_candidates)  # [u, Z]
    uniform = {name: np.full((m,), i, np.int32) for i, name in enumerate(OPTIONS)}
    # Routes to evaluate for every token: the candidates, then the uniform references.
    vecs = np.concatenate([candidates, np.stack(list(uniform.values()))], axis=0)  # [u + 3, Z]
    n_t, n_v = len(positions), len(vecs)
    bi, ti, vi = np.meshgrid(np.arange(b), positions, np.arange(n_v), indexing="ij")  # [B, p, u+3]
    job_b, job_t, job_vec = bi.reshape(-1), ti.reshape(-1), vecs[vi.reshape(-1)]
    if not isinstance(context_route, str):   # token t on its own context route: the all-context pass
        cb, ct = np.meshgrid(np.arange(b), positions, indexing="ij")
        job_b = np.concatenate([job_b, cb.reshape(-1)])
        job_t = np.concatenate([job_t, ct.reshape(-1)])
        job_vec = np.concatenate([job_vec, context[:, cb.reshape(-1), ct.reshape(-1)].T])
    losses = _evaluate(model, variables, tokens, targets, context, job_b, job_t, job_vec, batch_size)

    grid = losses[: b * n_t * n_v].reshape(b, n_t, n_v)
    cand_loss = grid[..., : len(candidates)]  # [B, p, u]
    best = np.argmin(cand_loss, axis=-1)  # [B, p]; first minimum on ties
    cost_of = lambda r: np.sum(np.asarray(costs, np.float32)[r], axis=-1)
    reference = {name: grid[..., len(candidates) + i] for i, name in enumerate(OPTIONS)}
    reference_cost: dict[str, Any] = {name: float(cost_of(vec)) for name, vec in uniform.items()}
    if isinstance(context_route, str):
        reference["context"] = reference[context_route]
        reference_cost["context"] = reference_cost[context_route]
    else:
        reference["context"] = losses[b * n_t * n_v:].reshape(b, n_t)
        reference_cost["context"] = cost_of(np.moveaxis(context[:, :, positions], 0, -1))
    return OracleResult(routes=candidates[best], loss=np.take_along_axis(cand_loss, best[..., None], -1)[..., 0],
                        cost=cost_of(candidates[best]).astype(np.float32), candidates=candidates,
                        candidate_loss=cand_loss, reference_loss=reference, reference_cost=reference_cost,
                        positions=positions, budget=float(budget))


def _evaluate(model, variables, tokens, targets, context, job_b, job_t, job_vec, batch_size) -> np.ndarray:
    """Loss at position ``job_t[j]`` of sequence ``job_b[j]`` with that token on route
    ``job_vec[j]`` and every other token on ``context``; float32 ``[j]``."""
    l = tokens.shape[1]
    n = int(max(1, min(batch_size, len(job_b))))

    @jax.jit
    def chunk(variables, tokens, targets, context, jb, jt, jv):
        # tokens, targets [B, L]; context [Z, B, L]; jb, jt [q]; jv [q, Z]
        here = jnp.arange(l)[None, None, :] == jt[None, :, None]  # [1, q, L]
        routes = jnp.where(here, jv.T[:, :, None], context[:, jb, :])  # [Z, q, L]
        logits, _ = model.apply(variables, tokens[jb], routes=routes, deterministic=True)  # [q, L, V]
        at_t = jnp.take_along_axis(logits, jt[:, None, None], axis=1)[:, 0]  # [q, V]
        logp = jax.nn.log_softmax(at_t.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, targets[jb, jt][:, None], axis=-1)[:, 0]  # [q]

    args = [jnp.asarray(a) for a in (tokens, targets, context)]
    out = []
    for start in range(0, len(job_b), n):
        stop = min(start + n, len(job_b))
        pad = n - (stop - start)   # the last chunk repeats its first job; the copies are dropped
        sel = np.concatenate([np.arange(start, stop), np.full((pad,), start)])
        res = chunk(variables, *args, jnp.asarray(job_b[sel]), jnp.asarray(job_t[sel]),
                    jnp.asarray(job_vec[sel]))
        out.append(np.asarray(res)[: stop - start])
    return np.concatenate(out).astype(np.float32)


def summarize_oracle(result: OracleResult | Any, num_buckets: int = 4) -> dict[str, Any]:
    """Where the oracle (or any routes ``[B, p, Z]``) spends compute.

    Returns ``big_by_layer``, ``small_by_layer``, ``skip_by_layer`` (``[Z]``: fraction of
    tokens on that option in each Duo layer), ``big_by_position`` (``[num_buckets]``:
    fraction of (token, layer) pairs on big in each bucket of consecutive positions),
    ``position_buckets`` (first and last position of each bucket) and, for an
    :class:`OracleResult`, ``mean_loss``, ``mean_cost`` and ``mean_reference_loss`` (per
    reference) to see the gain.
    """
    routes = np.asarray(result.routes if isinstance(result, OracleResult) else result)
    if routes.ndim != 3:
        raise ValueError(f"summarize_oracle: routes must be [B, T, M], got shape {routes.shape}")
    positions = (result.positions if isinstance(result, OracleResult)
                 else np.arange(routes.shape[1]))
    buckets = [idx for idx in np.array_split(np.arange(routes.shape[1]), num_buckets) if len(idx)]
    out: dict[str, Any] = {f"{name}_by_layer": np.mean(routes == i, axis=(0, 1)) for i, name in enumerate(OPTIONS)}
    out["big_by_position"] = np.asarray([np.mean(routes[:, idx, :] == BIG) for idx in buckets])
    out["position_buckets"] = [(int(positions[idx[0]]), int(positions[idx[-1]])) for idx in buckets]
    if isinstance(result, OracleResult):
        out["mean_loss"] = float(np.mean(result.loss))
        out["mean_cost"] = float(np.mean(result.cost))
        out["mean_reference_loss"] = {k: float(np.mean(v)) for k, v in result.reference_loss.items()}
    return out
