"""PHATGOOSE and GLIDER: routing among a library of trained LoRAs by per-adapter gates.

Einsum letters: ``B`` batch (examples), ``L`` tokens of one example, ``I`` a weight's
flattened input axes, ``O`` its flattened output axes, ``a`` library adapters, ``D`` model
width (task embeddings).

- ``phatgoose_gate`` (Muqeeth et al., 2024, "Learning to Route Among Specialized Experts for
  Zero-Shot Generalization", arXiv 2402.05859), stage 1: one frozen LoRA and a trained gate
  vector ``v [I]`` (init 0): ``y += s · ((u · σ(v·u)) A) B``.
- ``phatgoose``, stage 2: zero-shot top-k routing among ``a`` (LoRA, gate) pairs by
  ``LN(u)·LN(v_k)/√I``; nothing trains.
- ``glider`` (Li et al., 2024, "Glider: Global and Local Instruction-Driven Expert Router",
  arXiv 2410.10904): local logits ``LN(u) W_gate/√I`` with ``W_gate``'s columns the
  layer-normalised gates ``LN(v_k)``, plus ``λ·g`` with ``g [a]`` the task similarities
  (global router, :func:`task_similarity`).

The library is read, stored and frozen as for every library method
(:mod:`routezoo.layers.adapters.library`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from routezoo.layers.adapters.base import _nest, flat_params, register
from routezoo.layers.adapters.library import (_boxed_library, _LibraryMethod, _box, _library_count, combine,
                                              layer_norm, top_k_weights)
from routezoo.layers.sharding import param as logical_param

Params = Any


def phatgoose_scores(x: jax.Array, gates: jax.Array) -> jax.Array:
    """PHATGOOSE routing logits ``LN(u)·LN(v_k)/√I``: x ``[B, L, I]``, gates ``[a, I]``
    -> ``[B, L, a]`` (PHATGOOSE's ``score_type="original"``)."""
    return jnp.einsum("BLI,aI->BLa", layer_norm(x), layer_norm(gates)) / math.sqrt(x.shape[-1])


def glider_logits(x: jax.Array, router: jax.Array, similarity: jax.Array, lam: float) -> jax.Array:
    """GLIDER routing logits ``LN(u) W_gate/√I + λ·g``: x ``[B, L, I]``, W_gate ``[I, a]``,
    g ``[a]`` -> ``[B, L, a]``. The forward normalises the input only; ``W_gate`` is used as
    stored (:class:`Glider` stores it layer-normalised, ``LN(v_k)`` per column, once at init)."""
    local = jnp.einsum("BLI,Ia->BLa", layer_norm(x), router.astype(jnp.float32)) / math.sqrt(x.shape[-1])
    return local + lam * jnp.asarray(similarity, jnp.float32)


# --------------------------------------------------------------------------- the library


@register
@dataclasses.dataclass(frozen=True)
class PhatgooseGate(_LibraryMethod):
    """PHATGOOSE stage 1 (Muqeeth et al., 2024, arXiv 2402.05859):
    for one trained LoRA, frozen, learn per target a gate vector ``v [I]`` (init 0) that
    scales the LoRA's input per token::

        y = W u + s · ((u · σ(v·u)) A) B

    The LoRA comes from ``adapter.library=WORKDIR`` (one LoRA run; its alpha and rank give
    ``s``) or ``init.adapter_from=WORKDIR`` (then ``s`` is this run's ``adapter.alpha /
    adapter.rank``; set them as that run's, the rank is checked). Deviation: PHATGOOSE's
    T5 code scales every LoRA by ``1/r``; we keep each LoRA's own scale ``s``, with which
    it was trained. The card's recipe: 100 steps, AdamW lr 5e-3, constant schedule, 6%
    warmup. The adapter directory this run saves (LoRA + gates) is a library entry for
    ``phatgoose`` and ``glider``. Trainable parameters: ``Σ I`` over targets.
    """

    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False

    name = "phatgoose_gate"

    @classmethod
    def from_config(cls, cfg: Any) -> "PhatgooseGate":
        return cls(targets=str(cfg.targets), num_library=max(_library_count(cfg), 1), rank=int(cfg.rank),
                   alpha=float(cfg.alpha), rslora=bool(cfg.rslora))

    def __post_init__(self):
        super().__post_init__()
        if self.num_library != 1:
            raise ValueError(f"adapter.method='phatgoose_gate' trains the gate of ONE LoRA; adapter.library has "
                             f"{self.num_library} entries (train one gate run per library LoRA)")

    def init(self, rng: jax.Array, params: Params, library=None, library_configs=None, previous=None,
             **_) -> Params:
        """``{'library' [1, ...], 'library_scale' [1], 'gate': {path: [I]}}`` (boxed; gates 0)."""
        if not library and previous is not None:   # init.adapter_from: a LoRA run, scale from this config
            ranks = {a.shape[-1] for p, a in flat_params(nn.unbox(previous)).items() if p.endswith("/lora_a")}
            if ranks and ranks != {self.rank}:
                raise ValueError(f"init.adapter_from's LoRA has rank {sorted(ranks)}, but adapter.rank={self.rank}; "
                                 "set adapter.rank and adapter.alpha as that run's (they give its scale)")
            library = [previous]
            library_configs = [{"method": "lora", "rank": self.rank, "alpha": self.alpha, "rslora": self.rslora}]
        if not library:
            raise ValueError("adapter.method='phatgoose_gate' needs the LoRA whose gate it trains: "
                             "adapter.library=WORKDIR (one LoRA run) or init.adapter_from=WORKDIR")
        factors, scale, _, methods = self._read(params, library, library_configs)
        if methods != ["lora"]:
            raise ValueError(f"adapter.method='phatgoose_gate' trains the gate of a 'lora' run; adapter.library[0] "
                             f"is a {methods[0]!r} run")
        out = _boxed_library(factors, scale)
        for path, (a, _) in factors.items():
            out[f"gate/{path}"] = logical_param(nn.initializers.zeros, (None,))(rng, (a.shape[1],), jnp.float32)
        return _nest(out)

    def count(self, params: Params) -> int:
        """Trainable gate vectors: ``Σ I`` over targets."""
        return sum(t.d_in for t in self.select(params).values())

    def hook_delta(self, path: str, x: jax.Array, y: jax.Array, ctx) -> jax.Array:
        p = ctx.params
        x = x.astype(jnp.float32)
        gate = jax.nn.sigmoid(jnp.einsum("BLI,I->BL", x, p[f"gate/{path}"].astype(jnp.float32)))
        return combine(x * gate[..., None], p[f"library/{path}/lora_a"], p[f"library/{path}/lora_b"],
                       p["library_scale"])


@register
@dataclasses.dataclass(frozen=True)
class Phatgoose(_LibraryMethod):
    """PHATGOOSE stage 2 (Muqeeth et al., 2024, arXiv 2402.05859):
    zero-shot routing among ``a`` (LoRA, gate) pairs, the ``phatgoose_gate`` runs of
    ``adapter.library``. Per token and target, the gates are the experts' embeddings::

        s_k = LN(u)·LN(v_k)/√I        (LN without affine parameters)
        p   = top-k(softmax(s)), renormalised to sum to 1     (k = adapter.library_top_k, 2)
        y  += Σ_k p_k · s_k (u A_k) B_k

    Nothing trains (0 trainable parameters): a run with it evaluates the untrained
    combination at step 0 and saves the adapter (library + gates) at its last step, for
    :func:`train.load_adapter` and :func:`adapter_hooks.bind`. The CLI needs
    ``train.steps >= 1``; the steps change nothing (every leaf frozen). Every expert's rank
    activations are computed and weighted (zero outside the top-k), ``[B, L, a, R]``.
    Deviation: each LoRA keeps its own scale (PHATGOOSE's T5 code: ``1/r``).
    """

    top_k: int = 2

    name = "phatgoose"

    @classmethod
    def from_config(cls, cfg: Any) -> "Phatgoose":
        return cls(targets=str(cfg.targets), num_library=_library_count(cfg), top_k=int(cfg.library_top_k))

    def __post_init__(self):
        super().__post_init__()
        if self.top_k < 1:
            raise ValueError(f"adapter.library_top_k={self.top_k} must be >= 1")

    def init(self, rng: jax.Array, params: Params, library=None, library_configs=None, **_) -> Params:
        """``{'library', 'library_scale', 'library_gate': {path: [a, I]}}``, all frozen (boxed)."""
        factors, scale, gates, methods = self._read(params, library, library_configs)
        bad = [k for k, m in enumerate(methods) if m != "phatgoose_gate"]
        if bad:
            raise ValueError(f"adapter.method='phatgoose' routes by gate vectors: adapter.library[{bad[0]}] is a "
                             f"{methods[bad[0]]!r} run; allowed: phatgoose_gate runs (train one with "
                             "adapter.method=phatgoose_gate adapter.library=THAT_LORA_RUN)")
        out = _boxed_library(factors, scale)
        for path, g in gates.items():
            out[f"library_gate/{path}"] = _box(g, (None, None))
        return _nest(out)

    def count(self, params: Params) -> int:
        """Trainable parameters: none (zero-shot routing)."""
        return 0

    def weights(self, path: str, x: jax.Array, ctx) -> jax.Array:
        """Routing weights ``[B, L, a]`` of one target."""
        return top_k_weights(phatgoose_scores(x, ctx.params[f"library_gate/{path}"]), self.top_k)

    def hook_delta(self, path: str, x: jax.Array, y: jax.Array, ctx) -> jax.Array:
        return self._routed(path, x, self.weights(path, x, ctx), ctx)


# --------------------------------------------------------------------------- GLIDER

@register
@dataclasses.dataclass(frozen=True)
class Glider(_LibraryMethod):
    """GLIDER (Li et al., 2024, arXiv 2410.10904): PHATGOOSE-style
    local routing plus a global, task-level bias::

        logits = LN(u) W_gate/√I + λ·g        # W_gate [I, a], g [a], LN without affine
        W_gate[:, k] = LN(v_k)                 # at init, from entry k's trained gate v_k
        p = top-k(softmax(logits)), renormalised;    y += Σ_k p_k · s_k (u A_k) B_k

    Local router: ``W_gate``'s column ``k`` is the layer-normalised gate vector of library
    entry ``k`` (a ``phatgoose_gate`` run): the authors' code builds its ``lora_gate`` rows
    from each expert's trained sigmoid gate and layer-normalises every row, without affine
    parameters, when it loads them (UNITES-Lab/glider ``src/utils/manipulation.py``
    ``gather_lora_state_dicts_to_molora(norm_router_weight=True)``, and
    ``apply_layer_norm_to_gate`` after each gate is trained); its forward then normalises
    the input, ``lora_gate(LN(u))/√I`` (``src/peft/tuners/molora/layers.py``). So the local
    logits are PHATGOOSE's scores ``LN(u)·LN(v_k)/√I``. A plain ``lora`` entry gets a zero
    column (``LN(0) = 0``). Frozen by default (zero-shot, as the paper); ``train_router``
    (``adapter.glider_train_router``) trains ``W_gate`` from that normalised init. (The
    authors' repository also has a script that sets an expert's gate to its mean absolute
    input activation instead of training it; not implemented here.)

    Global router: ``g_k = cos(e_task, e_k)``, ``λ`` = ``adapter.glider_lambda`` (3: the
    paper's held-out setting; 100 held-in; large λ makes routing near-hard retrieval of
    argmax g, the card's pitfall). Deviation: the paper embeds an LLM-written one-sentence
    instruction per task with a text embedder; neither is available here. ``g`` is given
    as ``adapter.glider_task_similarity`` (a comma-separated floats), which
    :func:`task_similarity` computes from the base model's mean final hidden state over a
    few training batches of the target task and of each library task. As in the
    authors' code, g is fixed per evaluation task, not per query.
    """

    task_similarity: tuple[float, ...] = ()
    lam: float = 3.0
    top_k: int = 2
    train_router: bool = False

    name = "glider"

    @classmethod
    def from_config(cls, cfg: Any) -> "Glider":
        text = str(cfg.glider_task_similarity)
        try:
            sims = tuple(float(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"adapter.glider_task_similarity={text!r} must be comma-separated numbers") from None
        return cls(targets=str(cfg.targets), num_library=_library_count(cfg), task_similarity=sims,
                   lam=float(cfg.glider_lambda), top_k=int(cfg.library_top_k),
                   train_router=bool(cfg.glider_train_router))

    def __post_init__(self):
        super().__post_init__()
        if self.top_k < 1:
            raise ValueError(f"adapter.library_top_k={self.top_k} must be >= 1")
        if len(self.task_similarity) != self.num_library:
            raise ValueError(f"adapter.glider_task_similarity has {len(self.task_similarity)} values; it needs one "
                             f"per adapter.library entry ({self.num_library}): cosine similarities of the target "
                             "task to each library task (routezoo.layers.adapters.phatgoose.task_similarity computes them)")

    def _frozen(self, key: str) -> bool:
        return key in self.FROZEN or (key == "router" and not self.train_router)

    def init(self, rng: jax.Array, params: Params, library=None, library_configs=None, **_) -> Params:
        """``{'library', 'library_scale', 'router': {path: W_gate [I, a]}}`` (boxed);
        ``W_gate = LN(gates)ᵀ``, each gate normalised over ``I``."""
        factors, scale, gates, _ = self._read(params, library, library_configs)
        out = _boxed_library(factors, scale)
        for path, g in gates.items():
            out[f"router/{path}"] = _box(layer_norm(jnp.asarray(g)).T, (None, None))
        return _nest(out)

    def count(self, params: Params) -> int:
        """Trainable parameters: ``Σ I·a`` over targets with ``train_router``, else 0."""
        if not self.train_router:
            return 0
        return sum(t.d_in * self.num_library for t in self.select(params).values())

    def weights(self, path: str, x: jax.Array, ctx) -> jax.Array:
        """Routing weights ``[B, L, a]`` of one target."""
        logits = glider_logits(x, ctx.params[f"router/{path}"], jnp.asarray(self.task_similarity), self.lam)
        return top_k_weights(logits, self.top_k)

    def hook_delta(self, path: str, x: jax.Array, y: jax.Array, ctx) -> jax.Array:
        return self._routed(path, x, self.weights(path, x, ctx), ctx)


# --------------------------------------------------------------------------- task similarity

def task_embedding(model: nn.Module, params: Params, batches: Sequence[Any]) -> np.ndarray:
    """Mean final hidden state ``[D]`` (the output of the model's ``final_norm``) of the base
    model over the tokens of ``batches`` (int arrays ``[B, L]``, or dicts with ``inputs``
    and optional ``weights`` ``[B, L]`` marking real tokens)."""
    params = nn.unbox(params)

    @jax.jit
    def sums(tokens, weights):
        _, state = model.apply({"params": params}, tokens, capture_intermediates=lambda m, _: m.name == "final_norm",
                               mutable=["intermediates"])
        h = jax.tree.leaves(state["intermediates"])[0].astype(jnp.float32)   # [B, L, D]
        return jnp.einsum("BLD,BL->D", h, weights), weights.sum()

    total, count = None, 0.0
    for batch in batches:
        tokens = batch["inputs"] if isinstance(batch, dict) else batch
        tokens = jnp.asarray(tokens)
        weights = batch.get("weights") if isinstance(batch, dict) else None
        weights = jnp.ones(tokens.shape, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
        s, n = sums(tokens, weights)
        total = s if total is None else total + s
        count += float(n)
    if total is None or count == 0:
        raise ValueError("task_embedding needs at least one batch with tokens")
    return np.asarray(total) / count


def task_similarity(model: nn.Module, base: Params, target_batches: Sequence[Any],
                    library_batches: Sequence[Sequence[Any]]) -> np.ndarray:
    """GLIDER's global router input ``g [a]``: the cosine similarity of the target task's
    embedding to each library task's (:func:`task_embedding` of the base model). A
    substitute for the paper's embedded LLM-written task instructions. Pass the result as
    ``adapter.glider_task_similarity=",".join(map(str, g))``."""
    e = task_embedding(model, base, target_batches)
    out = []
    for batches in library_batches:
        f = task_embedding(model, base, batches)
        out.append(float(e @ f / max(np.linalg.norm(e) * np.linalg.norm(f), 1e-12)))
    return np.asarray(out, np.float32)


__all__ = ["Glider", "Phatgoose", "PhatgooseGate", "glider_logits", "phatgoose_scores", "task_embedding",
           "task_similarity"]
