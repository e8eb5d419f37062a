"""Methods that combine a library of trained LoRA adapters: ScaLearn, PHATGOOSE, GLIDER.

Einsum letters: ``B`` batch (examples), ``L`` tokens of one example, ``I`` a weight's
flattened input axes, ``O`` its flattened output axes, ``R`` LoRA rank, ``a`` library
adapters (experts), ``D`` model width (task embeddings).

The library comes from ``adapter.library=W1,W2,...``: workdirs of adapter runs on the same
base (the training loop reads them and calls ``init(rng, base, library=[params, ...],
library_configs=[config.adapter dicts, ...])``). Every library LoRA is copied into this
adapter's parameters, stacked over ``a`` per target and flattened to ``[I, O]``::

    library/<path>/lora_a  [a, I, R]     library/<path>/lora_b  [a, R, O]
    library_scale          [a]           (each LoRA's own alpha/r, or alpha/sqrt(r))

and FROZEN: :attr:`LR_GROUPS` gives the group ``frozen`` the multiplier 0 and
:meth:`param_groups` puts every ``library*`` leaf in it, so the training loop's optimizer
(``optax.set_to_zero``) keeps them bit-identical and gives them no optimizer state. Only
the method's own parameters train. The saved adapter directory is self-contained: it
holds the library it combines. Library entries may have different ranks (zero-padded to
the largest, which changes nothing) and different targets: an entry that does not adapt
one of this adapter's targets contributes zeros there; a target no entry adapts, or an
entry that adapts none of the targets, is refused in one line.

All methods act on activations (:mod:`routezoo.layers.adapters.hooks`): for every target
the projection's input ``u = x [B, L, I]`` gives each library adapter's output::

    a_k = s_k · (u A_k) B_k                                         # [B, L, a, O]

- ``scalearn`` (Frohmann et al., 2023, "ScaLearn: Simple and Highly Parameter-Efficient
  Task Transfer by Learning to Scale", arXiv 2310.01217):
  ``y += Σ_k ω_k ⊙ a_k`` with learned ``ω``, no softmax, no sum-to-1.
PHATGOOSE and GLIDER live in :mod:`routezoo.layers.adapters.phatgoose`:

- ``phatgoose_gate`` (Muqeeth et al., 2024, "Learning to Route Among Specialized Experts for
  Zero-Shot Generalization", arXiv 2402.05859), stage 1: one frozen
  LoRA, a trained gate vector ``v [I]`` (init 0): ``y += s · ((u · σ(v·u)) A) B``.
- ``phatgoose``, stage 2: zero-shot top-k routing among ``a`` (LoRA, gate) pairs by
  ``LN(u)·LN(v_k)/√I``; nothing trains.
- ``glider`` (Li et al., 2024, "Glider: Global and Local Instruction-Driven Expert Router",
  arXiv 2410.10904): local logits ``LN(u) W_gate/√I`` plus
  ``λ·g`` with ``g [a]`` the task similarities (global router).

Use at inference as any activation-space adapter::

    method, params, _ = train.load_adapter(WORKDIR + "/adapter", base)
    with adapter_hooks.bind(method, base, params):
        logits, _ = model.apply({"params": base}, tokens)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from routezoo.layers.adapters.base import Adapter, Target, _nest, flat_params, register, select_targets
from routezoo.layers.adapters.mos import projection_type
from routezoo.layers.sharding import param as logical_param

Params = Any

LIBRARY_METHODS = ("lora", "phatgoose_gate")   # what a library entry may be
LN_EPS = 1e-5                                  # LayerNorm without affine parameters (torch's default eps)


# --------------------------------------------------------------------------- helpers

def _box(value: jax.Array, names: tuple) -> Any:
    """A computed array boxed with logical axis names (as an initialiser's output)."""
    return logical_param(lambda *_: value, names)()


def _library_count(cfg: Any) -> int:
    return len([p for p in str(cfg.get("library", "")).split(",") if p.strip()])


def layer_norm(x: jax.Array, eps: float = LN_EPS) -> jax.Array:
    """LayerNorm over the last axis without affine parameters (PHATGOOSE's
    routing normalises without a learned scale or bias)."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def top_k_weights(logits: jax.Array, k: int) -> jax.Array:
    """``softmax`` over the last axis ``a``, keep the ``k`` largest, renormalise them to
    sum to 1; zeros elsewhere (``[..., a]``)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    k = min(k, probs.shape[-1])
    top, idx = jax.lax.top_k(probs, k)
    kept = jnp.sum(jax.nn.one_hot(idx, probs.shape[-1], dtype=probs.dtype) * top[..., None], axis=-2)
    return kept / jnp.sum(top, axis=-1, keepdims=True)


def library_outputs(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """Every adapter's output ``a_k = s_k (x A_k) B_k``: x ``[B, L, I]``, A ``[a, I, R]``,
    B ``[a, R, O]``, s ``[a]`` -> ``[B, L, a, O]`` (float32; a reference, the hooks never
    form it)."""
    h = jnp.einsum("BLI,aIR->BLaR", x.astype(jnp.float32), a.astype(jnp.float32))
    return jnp.einsum("BLaR,aRO->BLaO", h, b.astype(jnp.float32)) * scale.astype(jnp.float32)[:, None]


def combine(x: jax.Array, a: jax.Array, b: jax.Array, weights: jax.Array) -> jax.Array:
    """``Σ_k w_k (x A_k) B_k`` -> ``[B, L, O]`` without forming ``[B, L, a, O]``: the
    weights ``[B, L, a]`` (per token) or ``[a]`` multiply the rank activations
    ``[B, L, a, R]``. Every adapter is computed (dense over ``a``, zero weights outside a
    top-k): the intermediate is ``B·L·a·R``."""
    h = jnp.einsum("BLI,aIR->BLaR", x.astype(jnp.float32), a.astype(jnp.float32))
    h = h * weights.astype(jnp.float32)[..., None]
    return jnp.einsum("BLaR,aRO->BLO", h, b.astype(jnp.float32))


def _lora_scale(cfg: dict, rank: int) -> float:
    alpha = float(cfg.get("alpha", 16.0))
    return alpha / (math.sqrt(rank) if cfg.get("rslora", False) else rank)


def _entry_factors(k: int, params: Params, cfg: dict, method_name: str) -> tuple[dict, Any, dict]:
    """One library entry: ``({path: (A [I.., R], B [R, O..])}, scale, {path: gate [I..]})``."""
    kind = str(cfg.get("method", ""))
    flat = flat_params(nn.unbox(params))
    if kind == "lora":
        paths = sorted(p[:-len("/lora_a")] for p in flat if p.endswith("/lora_a"))
        factors = {p: (flat[f"{p}/lora_a"], flat[f"{p}/lora_b"]) for p in paths}
        rank = next(iter(factors.values()))[0].shape[-1] if factors else int(cfg.get("rank", 8))
        return factors, _lora_scale(cfg, rank), {}
    if kind == "phatgoose_gate":
        paths = sorted(p[len("library/"):-len("/lora_a")] for p in flat
                       if p.startswith("library/") and p.endswith("/lora_a"))
        factors = {p: (flat[f"library/{p}/lora_a"][0], flat[f"library/{p}/lora_b"][0]) for p in paths}
        gates = {p: flat[f"gate/{p}"] for p in paths if f"gate/{p}" in flat}
        return factors, flat["library_scale"][0], gates
    raise ValueError(f"adapter.library[{k}] is a {kind or 'non-adapter'!r} run; adapter.method={method_name!r} "
                     f"combines LoRA adapters only; allowed library entries: {', '.join(LIBRARY_METHODS)}")


def read_library(method_name: str, targets: dict[str, Target], library: Sequence[Params],
                 library_configs: Sequence[dict]) -> tuple[dict[str, tuple], jax.Array, dict[str, jax.Array],
                                                           list[str]]:
    """The library stacked per target: ``({path: (A [a, I, R], B [a, R, O])}, scale [a],
    {path: gates [a, I]}, [method of each entry])``.

    Ranks are zero-padded to the largest per target; an entry without a target (or
    without a gate) contributes zeros there.
    """
    if not library:
        raise ValueError(f"adapter.method={method_name!r} needs adapter.library: comma-separated workdirs of "
                         "trained LoRA runs on this base; got none")
    if len(library_configs) != len(library):
        raise ValueError(f"adapter.method={method_name!r}: {len(library)} library adapters but "
                         f"{len(library_configs)} library_configs")
    entries = [_entry_factors(k, p, dict(c), method_name) for k, (p, c) in enumerate(zip(library, library_configs))]
    for k, (factors, _, _) in enumerate(entries):
        if not set(factors) & set(targets):
            raise ValueError(f"adapter.library[{k}] adapts none of adapter.targets' weights "
                             f"({', '.join(sorted(targets))}); it adapts: {', '.join(sorted(factors)) or 'nothing'}")
    out, gates = {}, {}
    for path, t in sorted(targets.items()):
        have = [e[0][path] for e in entries if path in e[0]]
        if not have:
            adapted = sorted({p for e in entries for p in e[0]})
            raise ValueError(f"adapter.targets selects {path!r}, which no adapter.library entry adapts; "
                             f"the library adapts: {', '.join(adapted)}")
        if t.experts:
            raise ValueError(f"adapter.targets selects stacked expert weights {path!r}; library methods act on "
                             "attention and MLP projections only")
        rank = max(a.shape[-1] for a, _ in have)
        a_k, b_k, g_k = [], [], []
        for k, (factors, _, entry_gates) in enumerate(entries):
            if path in factors:
                a, b = factors[path]
                r = a.shape[-1]
                a2, b2 = jnp.reshape(a, (-1, r)), jnp.reshape(b, (r, -1))
                if a2.shape[0] != t.d_in or b2.shape[1] != t.d_out:
                    raise ValueError(f"adapter.library[{k}]'s LoRA of {path!r} is [{a2.shape[0]}, {r}] x [{r}, "
                                     f"{b2.shape[1]}]; this base's weight is [{t.d_in}, {t.d_out}] (another base?)")
                a_k.append(jnp.pad(a2.astype(jnp.float32), ((0, 0), (0, rank - r))))
                b_k.append(jnp.pad(b2.astype(jnp.float32), ((0, rank - r), (0, 0))))
            else:
                a_k.append(jnp.zeros((t.d_in, rank), jnp.float32))
                b_k.append(jnp.zeros((rank, t.d_out), jnp.float32))
            g = entry_gates.get(path)
            g_k.append(jnp.zeros((t.d_in,), jnp.float32) if g is None else jnp.reshape(g, (-1,)).astype(jnp.float32))
        out[path] = (jnp.stack(a_k), jnp.stack(b_k))
        gates[path] = jnp.stack(g_k)
    scale = jnp.stack([jnp.asarray(s, jnp.float32).reshape(()) for _, s, _ in entries])
    return out, scale, gates, [str(dict(c).get("method", "")) for c in library_configs]


def _boxed_library(factors: dict[str, tuple], scale: jax.Array) -> dict[str, Any]:
    """The frozen library leaves, boxed (replicated: LoRA factors are small)."""
    out = {"library_scale": _box(scale, (None,))}
    for path, (a, b) in factors.items():
        out[f"library/{path}/lora_a"] = _box(a, (None, None, "rank"))
        out[f"library/{path}/lora_b"] = _box(b, (None, "rank", None))
    return out


@dataclasses.dataclass(frozen=True)
class _LibraryMethod(Adapter):
    """What ScaLearn, PHATGOOSE and GLIDER share: targets, the frozen library, the hook."""

    targets: str
    num_library: int = 0       # a, from adapter.library (0: not known from the config)

    mergeable = False
    needs_task_ids = False
    uses_library = True        # adapter.library is this method's input (training/config_check.py)
    LR_GROUPS = {"frozen": 0.0, "trained": 1.0}
    FROZEN = ("library", "library_scale", "library_gate")   # top-level keys that never train

    def __post_init__(self):
        if self.num_library < 1:
            raise ValueError(f"adapter.method={self.name!r} needs adapter.library: comma-separated workdirs of "
                             "trained LoRA runs on this base; got none")

    def select(self, params: Params) -> dict[str, Target]:
        return select_targets(params, self.targets)

    def merge(self, base: Params, adapter: Params) -> Params:
        """Activation-space: the base, unchanged (unboxed); the adapter acts through the hook."""
        return nn.unbox(base)

    def _frozen(self, key: str) -> bool:
        return key in self.FROZEN

    def param_groups(self, params: Params) -> Params:
        """``frozen`` for the library (and other fixed leaves), ``trained`` for the rest."""
        def label(path, _):
            return "frozen" if self._frozen(str(getattr(path[0], "key", path[0]))) else "trained"
        return jax.tree_util.tree_map_with_path(label, params)

    def hook_targets(self, base: Params, adapter_params: Params) -> dict[str, Target]:
        flat = flat_params(nn.unbox(adapter_params))
        paths = {p[len("library/"):-len("/lora_a")] for p in flat if p.startswith("library/") and p.endswith("/lora_a")}
        chosen = self.select(base)
        return {p: chosen[p] for p in sorted(paths) if p in chosen}

    def _read(self, params: Params, library, library_configs):
        library = list(library or [])
        if library and len(library) != self.num_library:
            raise ValueError(f"adapter.method={self.name!r} was configured for {self.num_library} library "
                             f"adapters but got {len(library)}")
        return read_library(self.name, self.select(params), library, list(library_configs or []))

    def _routed(self, path: str, x: jax.Array, weights: jax.Array, ctx) -> jax.Array:
        """``Σ_k p_k s_k (u A_k) B_k`` for routing weights ``p [B, L, a]``."""
        p = ctx.params
        return combine(x, p[f"library/{path}/lora_a"], p[f"library/{path}/lora_b"],
                       weights * p["library_scale"].astype(jnp.float32))


# --------------------------------------------------------------------------- ScaLearn

@register
@dataclasses.dataclass(frozen=True)
class ScaLearn(_LibraryMethod):
    """ScaLearn (Frohmann et al., 2023, arXiv 2310.01217): learned
    scalings that linearly combine the outputs of ``a`` frozen adapters::

        y += Σ_k ω_k ⊙ a_k,     a_k = s_k (u A_k) B_k                     # [B, L, O]

    ``ω`` per target ``[a, O]`` (ScaLearn), ``[a]`` with ``uniform`` (ScaLearn-Uniform),
    one per projection type shared by all layers with ``shared`` (``attn/q`` of every
    layer: ScaLearn++ ``[a, O]``, Uniform++ ``[a]``). No softmax, no sum-to-1 (the card's
    ablations only). Init as the card and the authors' code (``omega_init_type="avg"``,
    ``omega_init_scale=2``; CPJKU/ScaLearn ``adapters/modeling.py`` ``ScaLearn.__init__``
    draws ``torch.normal(2/a, 0.001)``): ``ω ~ N(2/a, 0.001)``, mean 2/a and standard
    deviation 0.001, so the ω of one feature start summing to 2. ``dropout`` (default 0.3, the authors'
    ``scalearn_2_avg_d03``) drops entries of ω itself during training (inverted dropout, as
    ``torch.nn.Dropout``: kept entries scaled by 1/(1-p); a fresh mask per layer), never
    activations; evaluation is deterministic.

    Deviation: the paper combines Pfeiffer bottleneck adapters after the FFN
    (``W_up ReLU(W_down u)``, inside the layer's LayerNorm); here the library is LoRA and
    the combination acts on each adapted projection's output. The combination rule, which
    is what ScaLearn contributes, is the paper's. The target task's own adapter belongs
    in the library (otherwise the combination cannot recover it). Trainable parameters (the paper's L·K·d, uniform L·K,
    ++ K·d, Uniform++ K, per projection type): :meth:`count`.
    """

    uniform: bool = False
    shared: bool = False
    dropout: float = 0.3

    name = "scalearn"
    OMEGA_INIT_SCALE = 2.0      # omega_init_scale, "avg": mean = scale / a
    OMEGA_INIT_STD = 0.001

    @classmethod
    def from_config(cls, cfg: Any) -> "ScaLearn":
        return cls(targets=str(cfg.targets), num_library=_library_count(cfg), uniform=bool(cfg.scalearn_uniform),
                   shared=bool(cfg.scalearn_shared), dropout=float(cfg.scalearn_dropout))

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter.scalearn_dropout={self.dropout} must be in [0, 1)")

    def omega_key(self, path: str) -> str:
        return f"omega/{projection_type(path) if self.shared else path}"

    def omega_shapes(self, params: Params) -> dict[str, tuple[int, ...]]:
        """``{omega key: shape}``: ``[a, O]`` or ``[a]``, per target or per projection type."""
        k, out = self.num_library, {}
        for path, t in sorted(self.select(params).items()):
            shape = (k,) if self.uniform else (k, t.d_out)
            key = self.omega_key(path)
            if out.setdefault(key, shape) != shape:
                raise ValueError(f"adapter.scalearn_shared: the {key[6:]!r} weights differ in output width across "
                                 "layers; one shared omega needs one width per projection type")
        return out

    def init(self, rng: jax.Array, params: Params, library=None, library_configs=None, **_) -> Params:
        """``{'library': frozen LoRAs, 'library_scale', 'omega': {key: [a, O] or [a]}}`` (boxed)."""
        factors, scale, _, _ = self._read(params, library, library_configs)
        out = _boxed_library(factors, scale)
        mean = self.OMEGA_INIT_SCALE / self.num_library
        for i, (key, shape) in enumerate(sorted(self.omega_shapes(params).items())):
            init = lambda r, s, d: mean + self.OMEGA_INIT_STD * jax.random.normal(r, s, d)
            out[key] = logical_param(init, (None,) * len(shape))(jax.random.fold_in(rng, i), shape, jnp.float32)
        return _nest(out)

    def count(self, params: Params) -> int:
        """Trainable ω: ``Σ a·O`` over targets (L·K·d), ``a`` per target with ``uniform``
        (L·K), one ω per projection type with ``shared`` (K·d, Uniform++: K)."""
        return sum(math.prod(s) for s in self.omega_shapes(params).values())

    def hook_delta(self, path: str, x: jax.Array, y: jax.Array, ctx) -> jax.Array:
        omega = ctx.params[self.omega_key(path)].astype(jnp.float32)
        if self.dropout > 0 and not ctx.deterministic and ctx.rng is not None:
            keep = jax.random.bernoulli(ctx.rng_for(path), 1.0 - self.dropout, omega.shape)
            omega = jnp.where(keep, omega / (1.0 - self.dropout), 0.0)
        if omega.ndim == 1:
            omega = omega[:, None]
        # Σ_k ω_k ⊙ s_k (u A_k) B_k = Σ_k s_k (u A_k) (B_k ⊙ ω_k): ω folds into B.
        p = ctx.params
        b = p[f"library/{path}/lora_b"].astype(jnp.float32) * omega[:, None, :]
        return combine(x, p[f"library/{path}/lora_a"], b, p["library_scale"])


# --------------------------------------------------------------------------- PHATGOOSE


__all__ = ["LIBRARY_METHODS", "ScaLearn", "combine", "layer_norm", "library_outputs", "read_library",
           "top_k_weights"]
