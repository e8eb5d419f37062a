"""Many LoRA adapters in one batch: ``adapter.method=multi_lora`` (S-LoRA, Sheng et al. 2023; Punica, Chen et al. 2023).

Einsum letters: ``B`` batch (examples), ``L`` tokens of one example, ``I`` a weight's
flattened input axes, ``O`` its flattened output axes, ``R`` the largest rank of the
library (``R_max``), ``a`` library adapters (here with the zero slot), ``X`` rows of a
grouped matmul (``B·L`` tokens sorted by adapter).

A library of trained LoRA adapters (each from ``routezoo train ... --config.adapter.method=lora``,
each with its own rank, alpha and targets) is stacked per target weight::

    lora_a [a, I, R]   lora_b [a, R, O]      a = len(library) + 1, R = max rank

Slot 0 is the zero adapter ("no adapter": task id 0 runs the base model); library entry
``n`` (0-based) is slot ``n + 1``. Ranks below ``R`` are zero-padded (exact: the padded
rank columns of A meet zero rows of B), the scale ``s_n = alpha_n / r_n`` (rsLoRA:
``alpha_n / sqrt(r_n)``) is folded into ``lora_b[n]``, and a target that adapter ``n`` does
not adapt is zeros in its slot. Every example carries an adapter id (``task_ids`` ``[B]``,
given to :func:`routezoo.layers.adapters.hooks.bind`; the training loop passes
``batch['task_id']``), and every adapted projection computes, in one base forward for the
whole mixed batch::

    y[b, s] = x[b, s] W0 + (x[b, s] A[a_b]) (s_{a_b} B[a_b])

never forming ``A·B`` and never merging (a mixed batch has no single merged weight:
``mergeable = False``). Two implementations of the same sum (``adapter.multi_lora_impl``):

* ``gather`` (BGMV, Punica's decode kernel): each example takes its rows,
  ``Ag = A[ids] [B, I, R]``, ``h = einsum('BSI,BIR->BSR')`` (shrink), then
  ``einsum('BSR,BRO->BSO', h, B[ids])`` (expand). Cost ``B·(I + O)·R`` gathered weights
  plus ``B·L·(I + O)·R`` FLOPs.
* ``sorted`` (SGMV, Punica's prefill kernel): examples are sorted by adapter id (every
  token of an example has its id, so sorting examples sorts the tokens), group sizes are a
  bincount times ``L``, and a grouped matmul shrinks ``[X, I] x [a-1, I, R]`` then expands
  ``[X, R] x [a-1, R, O]``; then the rows are unsorted. Examples with id 0 are sorted
  past the last group and skipped (their delta is 0). The grouped matmul is the dropless
  MoE's (:data:`routezoo.layers.moe.gmm.GMM_BACKENDS`, ``adapter.multi_lora_gmm_backend``,
  ``auto`` = blocked on CPU, the Pallas kernel on GPU, megablox on TPU); shapes are
  static under jit (``X = B·L`` always).
* ``auto``: ``gather``, for decode and prefill alike. Ids are per example, so the gather
  copies only ``B·(I + O)·R`` weights whatever ``L`` is, and it measured faster than
  ``sorted`` at prefill too: on an H200 (bf16, 16 x 128 tokens, 8 layers of 2048 x 2048,
  rank 16) 0.49-0.51 ms against 0.88-0.98 ms for 1-16 distinct adapters
  (``benchmarks/results/multi_lora_prefill_h200.json``), and on a 2-core CPU about 10 ms
  against 40. ``sorted`` (the sort-and-grouped-matmul prefill path) stays selectable with
  ``adapter.multi_lora_impl=sorted``.

Ids out of range. Under jit the ids are values, so no error can be raised: an id
``< 0`` or ``>= a`` gets the zero adapter (the base model's output), in both
implementations. Called eagerly (concrete ids), :meth:`MultiLoRA.hook_delta` raises a
``ValueError`` instead; :meth:`MultiLoRA.check_ids` checks host ids before a jitted call.

Construction. In training-loop form, ``adapter.library=W1,W2,...`` (workdirs of LoRA runs
on this base) gives ``init(rng, base, library=[params...], library_configs=[config.adapter
dicts])``; ``adapter.targets`` restricts which of the library's adapted weights are served
(``.*``: all of them). Without the training loop, :meth:`MultiLoRA.stack` does the same from
LoRA parameter trees and :class:`~routezoo.layers.adapters.lora.LoRA` objects (or config dicts).
The stacked weights are frozen: ``LR_GROUPS = {'frozen': 0.0}`` holds every leaf, so a
training run with this method is serving only (evaluation of a mixed batch); ``count``
reports the stored stacked parameters ``Σ_targets a·R·(I + O)``, none trainable.

Serving::

    multi = MultiLoRA(targets=".*")
    stacked = MultiLoRA.stack(base, [lora_params_1, lora_params_2], [lora_1, lora_2])
    with adapter_hooks.bind(multi, base, stacked, task_ids=ids):     # ids int32 [B], 0 = base
        logits, _ = model.apply({"params": base}, tokens)

Inside ``jax.jit`` pass ``stacked`` and ``ids`` as arguments and bind inside the jitted
function (bound outside, a trace would keep the ids it was traced with). The sampler
:func:`routezoo.zoo.sampling.sample` is itself jitted (the key/value cache of each
layer holds keys and values computed under the binding). Call its
unjitted body inside your own jitted function with the binding::

    @functools.partial(jax.jit, static_argnames="num_tokens")
    def generate(base, stacked, ids, prompt, rng, num_tokens):
        with adapter_hooks.bind(multi, base, stacked, task_ids=ids):
            return sampling.sample.__wrapped__(model, {"params": base}, prompt, rng,
                                               num_tokens=num_tokens, temperature=0.0)

(``sampling.sample`` itself, called inside ``bind``, would reuse or cache a trace that
does not see the current binding.)

References: Chen et al., "Punica: Multi-Tenant LoRA Serving" (MLSys 2024, arXiv
2310.18547), BGMV/SGMV; Sheng et al., "S-LoRA: Serving Thousands of Concurrent LoRA
Adapters" (MLSys 2024, arXiv 2311.03285), unified paging of mixed ranks (here: zero
padding to the largest rank instead of a paged pool).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from routezoo.layers.moe.gmm import GMM_BACKEND_NAMES, resolve_gmm_backend
from routezoo.layers.moe.dropless import invert_permutation, take_rows
from routezoo.layers.adapters.lora import LoRA
from routezoo.layers.adapters.base import Adapter, Target, adaptable, flat_params, register
from routezoo.layers.adapters.base import _nest
from routezoo.layers.sharding import param as logical_param

Params = Any

IMPLS = ("auto", "gather", "sorted")
SUPPORTED_METHODS = ("lora",)


def _lora_of(entry: Any, n: int) -> LoRA:
    """The :class:`LoRA` of library entry ``n`` (a LoRA, or a ``config.adapter`` dict)."""
    if isinstance(entry, LoRA):
        return entry
    if isinstance(entry, Mapping) or hasattr(entry, "to_dict"):
        cfg = dict(entry.to_dict() if hasattr(entry, "to_dict") else entry)
        method = str(cfg.get("method", "lora"))
        if method not in SUPPORTED_METHODS:
            raise ValueError(f"adapter.library entry {n} is a {method!r} adapter; multi_lora serves: "
                             f"{', '.join(SUPPORTED_METHODS)}")
        return LoRA(targets=str(cfg.get("targets", ".*")), rank=int(cfg.get("rank", 8)),
                    alpha=float(cfg.get("alpha", 16.0)), rslora=bool(cfg.get("rslora", False)))
    name = getattr(entry, "name", type(entry).__name__)
    raise ValueError(f"adapter.library entry {n} is a {name!r} adapter; multi_lora serves: "
                     f"{', '.join(SUPPORTED_METHODS)}")


def _split(shape: tuple[int, ...], d_in: int, d_out: int, path: str) -> int:
    """Input axes of a base weight ``shape`` whose flattened split is ``[d_in, d_out]``."""
    for k in range(1, len(shape)):
        if math.prod(shape[:k]) == d_in and math.prod(shape[k:]) == d_out:
            return k
    raise ValueError(f"multi_lora: stacked factors of {path} ({d_in} x {d_out}) do not fit its base "
                     f"weight {shape}")


@register
@dataclasses.dataclass(frozen=True)
class MultiLoRA(Adapter):
    """Heterogeneous multi-LoRA batching (S-LoRA, Punica): one base forward,
    each example with its own LoRA from a frozen stacked library (see the module docstring).

    ``targets``: which of the library's adapted weights to serve (a regex over parameter
    paths as LoRA's; ``.*`` all); ``impl``: ``auto`` | ``gather`` | ``sorted``;
    ``gmm_backend``: the grouped matmul of ``sorted`` (a
    :data:`routezoo.layers.moe.gmm.GMM_BACKEND_NAMES` entry).
    """

    targets: str = ".*"
    impl: str = "auto"
    gmm_backend: str = "auto"
    # Added to every id before lookup. 0: ids are slots (0 = base, n = library entry n).
    # A training run (from_config) uses 1: the batch's task id t (the t-th of data.tasks)
    # serves library entry t, the t-th of adapter.library.
    id_offset: int = 0

    name = "multi_lora"
    mergeable = False
    needs_task_ids = True
    uses_library = True
    LR_GROUPS = {"frozen": 0.0}

    @classmethod
    def from_config(cls, cfg: Any) -> "MultiLoRA":
        return cls(targets=str(cfg.targets), impl=str(cfg.multi_lora_impl),
                   gmm_backend=str(cfg.multi_lora_gmm_backend), id_offset=1)

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"adapter.multi_lora_impl={self.impl!r}; allowed: {', '.join(IMPLS)}")
        if self.gmm_backend not in GMM_BACKEND_NAMES:
            raise ValueError(f"adapter.multi_lora_gmm_backend={self.gmm_backend!r}; allowed: "
                             f"{', '.join(GMM_BACKEND_NAMES)}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"adapter.targets {self.targets!r} is not a regular expression ({e})") from None

    # ------------------------------------------------------------------ construction

    def select(self, params: Params) -> dict[str, Target]:
        """Weights of ``params`` this method could serve (all adaptable weights matching
        ``targets``); the served set is their intersection with the library's targets."""
        rx = re.compile(rf"(?:.*/)?(?:{self.targets})")
        return {p: t for p, t in adaptable(params).items() if rx.fullmatch(p)}

    def _stack_flat(self, base: Params, library: Sequence[Params], configs: Sequence[Any]
                    ) -> dict[str, tuple[jax.Array, jax.Array]]:
        """``{path: (A [a, I, R], B [a, R, O] scaled)}`` over the served targets."""
        if not library:
            raise ValueError("adapter.method='multi_lora' needs a library of trained LoRA adapters "
                             "(adapter.library=W1,W2,... or MultiLoRA.stack(base, [params...], [loras...]))")
        if len(library) != len(configs):
            raise ValueError(f"multi_lora: {len(library)} library adapters but {len(configs)} configs")
        loras = [_lora_of(c, n) for n, c in enumerate(configs)]
        flat_base = flat_params(nn.unbox(base))
        rx = re.compile(rf"(?:.*/)?(?:{self.targets})")
        entries: list[dict[str, tuple[Any, Any]]] = []
        for n, (params, lora) in enumerate(zip(library, loras)):
            flat = flat_params(nn.unbox(params))
            bad = sorted(k for k in flat if k.rsplit("/", 1)[-1] not in ("lora_a", "lora_b"))
            if bad:
                raise ValueError(f"adapter.library entry {n} has non-LoRA parameters ({bad[0]}, ...); "
                                 f"multi_lora serves: {', '.join(SUPPORTED_METHODS)}")
            pairs = {}
            for path in sorted({k.rsplit("/", 1)[0] for k in flat}):
                if path not in flat_base:
                    raise ValueError(f"adapter.library entry {n}: {path!r} has no matching base weight")
                a, b = flat.get(f"{path}/lora_a"), flat.get(f"{path}/lora_b")
                if a is None or b is None:
                    raise ValueError(f"adapter.library entry {n}: {path!r} lacks lora_a or lora_b")
                w = flat_base[path]
                if a.ndim + b.ndim - w.ndim - 2:
                    raise ValueError(f"adapter.library entry {n} adapts the stacked expert weight {path!r}; "
                                     "multi_lora serves attention and MLP projections only")
                if a.shape[-1] != lora.rank:
                    raise ValueError(f"adapter.library entry {n}: {path!r} has rank {a.shape[-1]} but its "
                                     f"config says rank {lora.rank}")
                if rx.fullmatch(path):
                    pairs[path] = (a, b)
            entries.append(pairs)
        paths = sorted(set().union(*entries))
        if not paths:
            lib = sorted({p for n, params in enumerate(library)
                          for p in {k.rsplit("/", 1)[0] for k in flat_params(nn.unbox(params))}})
            raise ValueError(f"adapter.targets {self.targets!r} matches none of the library's adapted "
                             f"weights: {', '.join(lib)}")
        r_max = max(lora.rank for lora in loras)
        out = {}
        for path in paths:
            w = flat_base[path]
            d_in = d_out = None
            for pairs in entries:
                if path in pairs:
                    a, b = pairs[path]
                    d_in, d_out = math.prod(a.shape[:-1]), math.prod(b.shape[1:])
                    break
            _split(tuple(w.shape), d_in, d_out, path)
            a_rows, b_rows = [jnp.zeros((d_in, r_max), jnp.float32)], [jnp.zeros((r_max, d_out), jnp.float32)]
            for pairs, lora in zip(entries, loras):
                if path not in pairs:   # this adapter leaves the weight alone: zeros in its slot
                    a_rows.append(jnp.zeros((d_in, r_max), jnp.float32))
                    b_rows.append(jnp.zeros((r_max, d_out), jnp.float32))
                    continue
                a, b = pairs[path]
                pad = r_max - lora.rank
                a_rows.append(jnp.pad(jnp.asarray(a, jnp.float32).reshape(d_in, lora.rank), ((0, 0), (0, pad))))
                b_rows.append(jnp.pad(lora.scale * jnp.asarray(b, jnp.float32).reshape(lora.rank, d_out),
                                      ((0, pad), (0, 0))))
            out[path] = (jnp.stack(a_rows), jnp.stack(b_rows))
        return out

    def init(self, rng: jax.Array, params: Params, library: Sequence[Params] | None = None,
             library_configs: Sequence[Any] | None = None, previous: Any = None) -> Params:
        """The stacked library, boxed: ``{path: {'lora_a' [a, I, R], 'lora_b' [a, R, O]}}``.

        ``rng`` is unused (nothing is drawn). ``library``: LoRA parameter trees;
        ``library_configs``: their ``config.adapter`` dicts (or :class:`LoRA` objects).
        """
        del rng
        if previous is not None:
            raise ValueError("adapter.method='multi_lora' does not start from init.adapter_from; "
                             "give the adapters to serve as adapter.library=W1,W2,...")
        stacked = self._stack_flat(params, library or [], library_configs or [])
        out = {}
        for path, (a, b) in stacked.items():
            out[f"{path}/lora_a"] = logical_param(lambda *_, v=a: v, (None, None, "rank"))(None, a.shape, a.dtype)
            out[f"{path}/lora_b"] = logical_param(lambda *_, v=b: v, (None, "rank", None))(None, b.shape, b.dtype)
        return _nest(out)

    @classmethod
    def stack(cls, base: Params, library: Sequence[Params], loras: Sequence[Any], targets: str = ".*") -> Params:
        """Stacked adapter parameters (plain arrays) for :func:`adapter_hooks.bind`, from
        trained LoRA parameter trees and their :class:`LoRA` objects (or config dicts);
        library entry ``n`` gets id ``n + 1``, id 0 is the base model."""
        flat = {}
        for path, (a, b) in cls(targets=targets)._stack_flat(base, library, loras).items():
            flat[f"{path}/lora_a"], flat[f"{path}/lora_b"] = a, b
        return _nest(flat)

    def param_groups(self, params: Params) -> Params:
        """Every stacked leaf is frozen (``LR_GROUPS['frozen'] = 0``)."""
        return jax.tree.map(lambda _: "frozen", params)

    def merge(self, base: Params, adapter: Params) -> Params:
        """The base, unchanged: a mixed batch cannot be merged (the adapter acts in the hook)."""
        del adapter
        return nn.unbox(base)

    def count(self, params: Params, adapter: Params | None = None) -> int:
        """Stored stacked parameters ``Σ_targets a·R·(I + O)`` (zero slot and padding
        included; none of them trainable). Needs the stacked ``adapter`` (the library
        fixes ``a``, ``R`` and the targets)."""
        del params
        if adapter is None:
            raise ValueError("MultiLoRA.count(base, stacked): the stacked library fixes the count; pass it")
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(adapter))))

    # ------------------------------------------------------------------ activation hook

    def hook_targets(self, base: Params, adapter_params: Params) -> dict[str, Target]:
        flat_base = flat_params(nn.unbox(base))
        flat = flat_params(nn.unbox(adapter_params))
        out = {}
        for path in sorted({k.rsplit("/", 1)[0] for k in flat}):
            if path not in flat_base:
                raise ValueError(f"multi_lora: stacked adapter {path!r} has no matching base weight")
            a, b = flat[f"{path}/lora_a"], flat[f"{path}/lora_b"]
            shape = tuple(flat_base[path].shape)
            out[path] = Target(path, shape, None, 0, _split(shape, a.shape[1], b.shape[2], path))
        return out

    def resolve_impl(self, tokens_per_example: int) -> str:
        """``auto``: ``gather`` (measured faster at decode and prefill; module docstring)."""
        return "gather" if self.impl == "auto" else self.impl

    @staticmethod
    def check_ids(task_ids: Any, num_slots: int) -> None:
        """``ValueError`` if a host id is outside ``[0, num_slots)`` (jit cannot raise)."""
        ids = np.asarray(task_ids)
        bad = ids[(ids < 0) | (ids >= num_slots)]
        if bad.size:
            raise ValueError(f"multi_lora: adapter id {int(bad[0])} out of range; allowed: 0 (base model) .. "
                             f"{num_slots - 1} (library entries 1..{num_slots - 1})")

    def hook_delta(self, path: str, x: jax.Array, y: jax.Array, ctx) -> jax.Array:
        """``s_a (x A_a) B_a`` per example: ``x [B, L, I] -> [B, L, O]``."""
        del y
        # Frozen: no gradient flows into the stack (a training run with it only evaluates).
        a, b = (jax.lax.stop_gradient(ctx.params[f"{path}/{k}"]) for k in ("lora_a", "lora_b"))
        ids = ctx.task_ids + self.id_offset
        if not isinstance(ids, jax.core.Tracer):
            self.check_ids(ids, a.shape[0])
        return multi_lora_delta(x, a, b, ids, impl=self.resolve_impl(x.shape[1]), gmm_backend=self.gmm_backend)


# --------------------------------------------------------------------------- the two paths

def _valid_ids(ids: jax.Array, num_slots: int) -> jax.Array:
    ids = jnp.asarray(ids, jnp.int32)
    return jnp.where((ids < 0) | (ids >= num_slots), 0, ids)


def delta_gather(x: jax.Array, a: jax.Array, b: jax.Array, ids: jax.Array) -> jax.Array:
    """BGMV: ``x [B, L, I]``, ``a [a, I, R]``, ``b [a, R, O]``, ``ids [B]`` -> ``[B, L, O]``."""
    ids = _valid_ids(ids, a.shape[0])
    ag = jnp.take(a, ids, axis=0, mode="clip").astype(x.dtype)                       # [B, I, R]
    h = jnp.einsum("BLI,BIR->BLR", x, ag, preferred_element_type=jnp.float32)         # shrink
    bg = jnp.take(b, ids, axis=0, mode="clip")                                        # [B, R, O]
    return jnp.einsum("BLR,BRO->BLO", h.astype(x.dtype), bg.astype(x.dtype),
                      preferred_element_type=jnp.float32)                             # expand


def delta_sorted(x: jax.Array, a: jax.Array, b: jax.Array, ids: jax.Array,
                 gmm_backend: str = "auto") -> jax.Array:
    """SGMV: the same as :func:`delta_gather` by a grouped matmul over tokens sorted by
    adapter; slot 0 (and out-of-range ids) is sorted past the groups and gets 0."""
    bsz, s, d_in = x.shape
    n = a.shape[0] - 1                                        # groups: library slots 1..N-1
    gmm = resolve_gmm_backend(gmm_backend)
    grp = _valid_ids(ids, n + 1) - 1                          # [B]; -1 = zero adapter
    grp = jnp.where(grp < 0, n, grp)                          # past the last group
    perm = jnp.argsort(grp, stable=True)                      # examples by adapter
    inv = invert_permutation(perm)
    sizes = jnp.zeros((n,), jnp.int32).at[grp].add(s, mode="drop")                   # [a-1], tokens
    # Row moves of whole examples ([B, L·I]); rows are then the X = B·L tokens.
    rows = take_rows(x.reshape(bsz, s * d_in), perm, inv).reshape(bsz * s, d_in)
    h = gmm(rows, a[1:].astype(x.dtype), sizes)                                       # [X, R] shrink
    out = gmm(h.astype(x.dtype), b[1:].astype(x.dtype), sizes)                        # [X, O] expand
    keep = jnp.repeat(grp[perm] < n, s)[:, None]                                      # rows past the groups
    out = jnp.where(keep, out.astype(jnp.float32), 0.0).reshape(bsz, s * out.shape[-1])
    return take_rows(out, inv, perm).reshape(bsz, s, -1)


def multi_lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, ids: jax.Array, *, impl: str = "gather",
                     gmm_backend: str = "auto") -> jax.Array:
    """``s_{ids[b]} (x[b] A[ids[b]]) B[ids[b]]`` for ``x [B, L, I]`` (float32 ``[B, L, O]``);
    ``b`` is pre-scaled, slot 0 is the zero adapter."""
    if impl == "gather":
        return delta_gather(x, a, b, ids)
    if impl == "sorted":
        return delta_sorted(x, a, b, ids, gmm_backend)
    raise ValueError(f"multi_lora impl {impl!r}; allowed: gather, sorted")


def per_adapter_loop(x: jax.Array, a: jax.Array, b: jax.Array, ids: np.ndarray) -> jax.Array:
    """The naive mixed batch (peft's ``_mixed_batch_forward``): a Python loop over the
    distinct adapters of the host ids, each on its sub-batch, scattered back. For
    benchmarks and tests; ``ids`` must be host values (the loop is unrolled per batch)."""
    ids = np.asarray(ids)
    out = jnp.zeros((*x.shape[:2], b.shape[-1]), jnp.float32)
    for n in np.unique(ids):
        if n <= 0 or n >= a.shape[0]:
            continue
        idx = np.nonzero(ids == n)[0]
        sub = x[idx]                                                                  # [b_n, L, I]
        low = jnp.einsum("BLI,IR->BLR", sub, a[n].astype(x.dtype), preferred_element_type=jnp.float32)
        out = out.at[idx].add(jnp.einsum("BLR,RO->BLO", low.astype(x.dtype), b[n].astype(x.dtype),
                                         preferred_element_type=jnp.float32))
    return out


__all__ = ["IMPLS", "MultiLoRA", "SUPPORTED_METHODS", "delta_gather", "delta_sorted", "multi_lora_delta",
           "per_adapter_loop"]
