"""Polytropon (Poly) and Multi-Head Routing (MHR, MHR-z, MHR-mu): task-routed LoRA skills.

Einsum letters: ``B`` batch (examples), ``L`` tokens of an example, ``I`` a weight's
flattened input axes, ``O`` its output axes, ``h`` routing heads (splits), ``s`` skills,
``R`` rank, ``t`` tasks. ``i = I/h`` and ``o = O/h`` are one head's input and output block.

Ponti et al. 2023 ("Combining Parameter-efficient Modules for Task-level Generalisation",
arXiv 2202.13914) and Caccia et al. 2023 ("Multi-Head Adapter Routing for Cross-Task
Generalization", arXiv 2211.03831), following the behaviour of peft's
``tuners/poly`` and mttl's ``PolytroponSelector``. Every adapted weight holds an
inventory of ``s`` LoRA skills; a learned router ``Z [t, h·s]`` mixes them per task. MHR
splits the weight's input and output into ``h`` blocks that route independently::

    z  = Z[task].reshape(h, s)
    w~ = sigmoid((z + log u - log(1 - u)) / tau)   u ~ U(0, 1)   (training, relaxed Bernoulli)
    w~ = sigmoid(z)                                                (evaluation)
    w  = w~ / (sum_s w~ + 1e-12)                                   (per head, sums to 1)
    A_b[h] = sum_m w[h, m] A[h, m]   [i, R];   B_b[h] = sum_m w[h, m] B[h, m]   [R, o]
    y  = x W + (x A_b) B_b / R

where ``A_b [I, R]`` stacks the heads' blocks along the input and ``B_b [R, O]`` along the
output (peft's reshape): head ``h`` owns input block ``h`` of A and output block ``h`` of
B, and ``x A_b = sum_h x[block h] A_b[h]``. The scale is ``1/R``
(no alpha, unlike LoRA). ``h = 1`` is Poly. Init as peft: ``A`` kaiming-uniform per
(head, skill) on its ``[i, R]`` block, i.e. U(+-1/sqrt(i)); ``B = 0``; ``Z`` U(+-1e-3).

Methods (``adapter.method``):

* ``poly`` (h = 1) and ``mhr`` (h = ``adapter.mhr_heads``): train A, B and Z; Z's learning
  rate is ``adapter.poly_router_lr_mult`` times the adapters' (the card: 100x).
* ``mhr_z`` (few-shot, router only): A and B come from a trained ``poly``/``mhr`` run
  (``init.adapter_from``) and stay frozen (not in the optimizer state); a fresh Z for this
  run's tasks trains: ``h·s`` parameters per weight per task.
* ``mhr_mu`` (few-shot, no router): the mttl AverageSelector, constant ``w = 1/s``; A and B
  from the trained run, fine-tuned. With constant weights the adapter is one LoRA per
  weight (the skill average), so ``mhr_mu`` is a parameter-space method and merges into
  the base weights exactly; it needs no task ids.

``poly``/``mhr``/``mhr_z`` need the task id of every example (``bind(..., task_ids=)``, the
batch's ``task_id`` from ``data.tasks``) and act on activations (different examples,
different adapters); :meth:`Poly.merge_task` gives one task's merged weights for inference.
Ids outside ``[0, t)`` are clamped to the nearest row (values cannot raise under ``jit``).

Parameter counts per adapted weight (the papers'): adapters ``s·R·(I + O)`` (s times LoRA, for
any h), router ``t·h·s``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from routezoo.layers.adapters.base import Adapter, Params
from routezoo.layers.adapters.base import Target, flat_params, register, select_targets
from routezoo.layers.adapters.base import _nest
from routezoo.layers.sharding import param as logical_param

ROUTER_INIT = 1e-3     # Z ~ U(-1e-3, 1e-3) (as peft's Poly router initialises it)
EPS = 1e-12


def _init_uniform(bound):
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


@dataclasses.dataclass(frozen=True)
class _Skills(Adapter):
    """What Poly, MHR, MHR-z and MHR-mu share: the skill inventory per target."""

    targets: str
    rank: int = 1                 # R
    num_skills: int = 8           # s
    num_heads: int = 1            # H
    num_tasks: int = 1            # T
    router_lr_mult: float = 100.0
    relaxed: bool = True          # training: relaxed-Bernoulli (Gumbel-sigmoid) weights; False: sigmoid(z)
    temperature: float = 1.0

    mergeable = False
    needs_previous = False

    def __post_init__(self):
        for key, v in (("rank", self.rank), ("poly_skills", self.num_skills), ("mhr_heads", self.num_heads),
                       ("num_tasks", self.num_tasks)):
            if v < 1:
                raise ValueError(f"adapter.{key}={v} must be >= 1 for adapter.method={self.name!r}")

    @classmethod
    def from_config(cls, cfg: Any):
        heads = 1 if cls.name == "poly" else int(cfg.mhr_heads)
        return cls(targets=str(cfg.targets), rank=int(cfg.rank), num_skills=int(cfg.poly_skills),
                   num_heads=heads, num_tasks=int(cfg.num_tasks), router_lr_mult=float(cfg.poly_router_lr_mult),
                   relaxed=bool(cfg.poly_relaxed))

    # ------------------------------------------------------------------ targets

    def select(self, params: Params) -> dict[str, Target]:
        chosen = select_targets(params, self.targets)
        h = self.num_heads
        for path, t in chosen.items():
            if t.experts:
                raise ValueError(f"adapter.method={self.name!r} cannot adapt stacked experts ({path}): their "
                                 "tokens are grouped by expert, not by example; choose attention/MLP projections")
            if t.d_in % h or t.d_out % h:
                raise ValueError(f"adapter.mhr_heads={h} must divide d_in={t.d_in} and d_out={t.d_out} of {path}")
        return chosen

    def hook_targets(self, base: Params, adapter: Params) -> dict[str, Target]:
        """Targets read off the adapter tree (the base arrives unboxed inside training)."""
        flat, flat_base = flat_params(nn.unbox(adapter)), flat_params(nn.unbox(base))
        out = {}
        for key, a in flat.items():
            if key.endswith("/poly_a"):
                path = key[:-len("/poly_a")]
                b = flat[f"{path}/poly_b"]
                out[path] = _io_target(path, tuple(flat_base[path].shape), a.shape[0] * a.shape[2],
                                       b.shape[0] * b.shape[3])
        return out

    # ------------------------------------------------------------------ parameters

    def _fresh(self, rng, t: Target, i: int, with_router: bool) -> dict[str, Any]:
        h, m, r = self.num_heads, self.num_skills, self.rank
        key = jax.random.fold_in(rng, i)
        out = {
            "poly_a": logical_param(_init_uniform(1.0 / math.sqrt(t.d_in // h)), (None, None, None, "rank"))(
                jax.random.fold_in(key, 0), (h, m, t.d_in // h, r), jnp.float32),
            "poly_b": logical_param(nn.initializers.zeros, (None, None, "rank", None))(
                key, (h, m, r, t.d_out // h), jnp.float32),
        }
        if with_router:
            out["router"] = self._router(jax.random.fold_in(key, 1))
        return out

    def _router(self, key) -> Any:
        return logical_param(_init_uniform(ROUTER_INIT), (None, None))(
            key, (self.num_tasks, self.num_heads * self.num_skills), jnp.float32)

    def init(self, rng: jax.Array, params: Params, previous: Params | None = None, **_) -> Params:
        """Fresh skills and router, or (``previous``: a trained poly/mhr adapter) its skills
        with a fresh router for this run's ``num_tasks`` tasks."""
        if self.needs_previous and previous is None:
            raise ValueError(f"adapter.method={self.name!r} starts from a trained poly/mhr adapter: set "
                             "init.adapter_from=WORKDIR of that run")
        prev = None if previous is None else flat_params(nn.unbox(previous))
        out = {}
        for i, (path, t) in enumerate(sorted(self.select(params).items())):
            fresh = self._fresh(rng, t, i, with_router=self.has_router)
            if prev is not None:
                for name in ("poly_a", "poly_b"):
                    key = f"{path}/{name}"
                    if key not in prev:
                        raise ValueError(f"init.adapter_from has no {key}; it adapts other weights "
                                         f"({', '.join(sorted({k.rsplit('/', 1)[0] for k in prev}))})")
                    want = fresh[name].value.shape
                    if tuple(prev[key].shape) != tuple(want):
                        raise ValueError(f"init.adapter_from {key} has shape {tuple(prev[key].shape)}, this "
                                         f"config needs {tuple(want)} (same rank, poly_skills, mhr_heads)")
                    fresh[name] = fresh[name].replace_boxed(jnp.asarray(prev[key], jnp.float32))
            for name, v in fresh.items():
                out[f"{path}/{name}"] = v
        return _nest(out)

    has_router = True

    def count(self, params: Params) -> int:
        """``sum_targets s·R·(I + O) + t·h·s`` (the router only where the method has one)."""
        h, m, r = self.num_heads, self.num_skills, self.rank
        router = self.num_tasks * h * m if self.has_router else 0
        return sum(m * r * (t.d_in + t.d_out) + router for t in self.select(params).values())

    # ------------------------------------------------------------------ optimizer groups

    @property
    def LR_GROUPS(self) -> dict[str, float]:   # noqa: N802 (the train loop's protocol name)
        return {"adapter": 1.0, "router": self.router_lr_mult}

    def param_groups(self, params: Params) -> Params:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "router" if getattr(path[-1], "key", None) == "router" else "adapter", params)

    # ------------------------------------------------------------------ routing

    def weights(self, z: jax.Array, rng: jax.Array | None) -> jax.Array:
        """Skill weights ``[..., h, s]`` from router logits ``z [..., h, s]``, summing to 1
        over ``s``; relaxed-Bernoulli noise when ``rng`` is given (training)."""
        z = z.astype(jnp.float32)
        if rng is not None and self.relaxed:
            u = jax.random.uniform(rng, z.shape, jnp.float32, 1e-6, 1.0 - 1e-6)
            z = (z + jnp.log(u) - jnp.log1p(-u)) / self.temperature
        w = jax.nn.sigmoid(z)
        return w / (jnp.sum(w, axis=-1, keepdims=True) + EPS)

    def _mixed(self, w: jax.Array, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
        # w [..., h, s]; a [h, s, i, R]; b [h, s, R, o] -> A_b [..., h, i, R], B_b [..., h, R, o]
        return (jnp.einsum("...hs,hsiR->...hiR", w, a.astype(jnp.float32)),
                jnp.einsum("...hs,hsRo->...hRo", w, b.astype(jnp.float32)))

    def _stacked(self, w: jax.Array, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``A_b [..., I, R]`` and ``B_b [..., R, O]``: the mixed skills, heads stacked."""
        am, bm = self._mixed(w, a, b)               # [..., h, i, R], [..., h, R, o]
        *lead, h, i, r = am.shape
        o = bm.shape[-1]
        return am.reshape(*lead, h * i, r), jnp.moveaxis(bm, -3, -2).reshape(*lead, r, h * o)

    def hook_delta(self, path: str, x: jax.Array, y: jax.Array, ctx) -> jax.Array:
        """``(x A_b) B_b / R`` per example: x ``[B, L, I]`` -> ``[B, L, O]``."""
        p = ctx.params
        a, b = p[f"{path}/poly_a"], p[f"{path}/poly_b"]
        h, m = a.shape[0], a.shape[1]
        z = jnp.take(p[f"{path}/router"], ctx.task_ids, axis=0, mode="clip").reshape(-1, h, m)   # [B, h, s]
        w = self.weights(z, ctx.rng_for(path))
        a_b, b_b = self._stacked(w, a, b)                                            # [B, I, R], [B, R, O]
        low = jnp.einsum("BLI,BIR->BLR", x.astype(jnp.float32), a_b)
        return jnp.einsum("BLR,BRO->BLO", low, b_b) / self.rank

    def merge(self, base: Params, adapter: Params) -> Params:
        """The base, unchanged: the update depends on the example's task (use
        :meth:`merge_task` for one task's weights)."""
        return nn.unbox(base)

    def merge_task(self, base: Params, adapter: Params, task: int) -> Params:
        """Base weights with task ``task``'s adapter merged in (evaluation routing,
        ``sigmoid(z)``): ``W + A_b B_b / R``; equals the unmerged model on that task."""
        flat, ad = flat_params(nn.unbox(base)), flat_params(nn.unbox(adapter))
        for path, t in self.hook_targets(base, adapter).items():
            a, b = ad[f"{path}/poly_a"], ad[f"{path}/poly_b"]
            z = self._router_logits(ad, path, task).reshape(a.shape[0], a.shape[1])
            a_b, b_b = self._stacked(self.weights(z, None), a, b)
            w = flat[path]
            flat[path] = (w.astype(jnp.float32) + (a_b @ b_b / self.rank).reshape(w.shape)).astype(w.dtype)
        return _nest(flat)

    def _router_logits(self, ad: dict[str, Any], path: str, task: int) -> jax.Array:
        return ad[f"{path}/router"][task]


@register
@dataclasses.dataclass(frozen=True)
class Poly(_Skills):
    """``adapter.method=poly``: Polytropon, one routing head (see the module docstring)."""

    name = "poly"
    needs_task_ids = True


@register
@dataclasses.dataclass(frozen=True)
class MHR(_Skills):
    """``adapter.method=mhr``: multi-head routing, ``adapter.mhr_heads`` heads."""

    name = "mhr"
    needs_task_ids = True


@register
@dataclasses.dataclass(frozen=True)
class MHRZ(_Skills):
    """``adapter.method=mhr_z``: few-shot, only the router trains; skills from
    ``init.adapter_from`` (a poly/mhr run), frozen."""

    name = "mhr_z"
    needs_task_ids = True
    needs_previous = True

    @property
    def LR_GROUPS(self) -> dict[str, float]:   # noqa: N802
        return {"frozen": 0.0, "router": self.router_lr_mult}

    def param_groups(self, params: Params) -> Params:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "router" if getattr(path[-1], "key", None) == "router" else "frozen", params)


@register
@dataclasses.dataclass(frozen=True)
class MHRMu(_Skills):
    """``adapter.method=mhr_mu``: few-shot, no router: constant skill weights ``1/s`` per
    head (mttl's AverageSelector); skills from ``init.adapter_from``, fine-tuned. A
    parameter-space method: :meth:`merge` adds ``A_b B_b / R`` (the skill average) to
    the base weights, exactly; no task ids."""

    name = "mhr_mu"
    mergeable = True
    needs_previous = True
    has_router = False
    hook_delta = None        # not an activation-space method (adapter_hooks checks for it)

    @property
    def LR_GROUPS(self) -> dict[str, float]:   # noqa: N802
        return {"adapter": 1.0}

    def param_groups(self, params: Params) -> Params:
        return jax.tree.map(lambda _: "adapter", params)

    def merge(self, base: Params, adapter: Params) -> Params:
        flat, ad = flat_params(nn.unbox(base)), flat_params(nn.unbox(adapter))
        for path in sorted({k.rsplit("/", 1)[0] for k in ad}):
            a, b = ad[f"{path}/poly_a"], ad[f"{path}/poly_b"]
            w_avg = jnp.full(a.shape[:2], 1.0 / a.shape[1], jnp.float32)
            a_b, b_b = self._stacked(w_avg, a, b)
            w = flat[path]
            flat[path] = (w.astype(jnp.float32) + (a_b @ b_b / self.rank).reshape(w.shape)).astype(w.dtype)
        return _nest(flat)


def _io_target(path: str, shape: tuple[int, ...], d_in: int, d_out: int) -> Target:
    """A Target whose input axes are the leading axes of ``shape`` multiplying to ``d_in``."""
    for k in range(1, len(shape)):
        if math.prod(shape[:k]) == d_in and math.prod(shape[k:]) == d_out:
            return Target(path, shape, None, 0, k)
    raise ValueError(f"adapter tree for {path} (in {d_in}, out {d_out}) does not fit its weight {shape}")
