"""Stochastic and fixed routers: hash layers, THOR, SMoE-Dropout.

Einsum letters: ``T`` tokens, ``D`` embed, ``E`` experts,
``K`` slots per token, ``G`` routing groups, ``S`` group size (``T = G·S``).

Every router here is a :class:`~routezoo.layers.routers.base.Router` and returns a
:class:`~routezoo.layers.routers.base.Routing` with static shapes: a token that uses fewer
experts than the ``K`` slots has ``-1`` in the unused slots (weight 0). Dispatchers skip
``-1`` slots: dropless dispatch leaves them out of the grouped matmul (``group_sizes``
counts only real copies), capacity dispatch never gives them a buffer slot. The routers
register themselves in :data:`routezoo.layers.routers.base.ROUTERS` under these names
(``config.model.moe.router``):

==================  =====================================================================
``hash``            :class:`HashRouter` (Roller et al. 2021): expert = fixed hash of token id
``thor``            :class:`ThorRouter` (Zuo et al. 2022): uniformly random expert, no router
``smoe_dropout``    :class:`SMoEDropoutRouter` (Chen et al. 2023): frozen random router,
                    ``k`` growing over training, any ``k`` at evaluation
==================  =====================================================================

Conventions (see :mod:`routezoo.layers.routers`): router maths in float32; learned router
kernels are ``(D, ·)`` float32 parameters with logical names ``('embed', None)``; the
load-balancing loss is Switch's ``E · Σ_e f_e P_e`` per group with flaxformer's constant
(:func:`~routezoo.layers.routers.base.load_balance_loss`); ``Routing.losses`` are already
scaled and only present when their coefficient is > 0; ``Routing.stats`` always carries
``load`` ``[E]`` and ``experts_per_token``.

Collections besides ``'params'``:

* ``'router_state'`` (mutable in training, checkpointed by the training loop):
  SMoE-Dropout's step counter ``step`` (int32), incremented by every non-deterministic
  call made with ``'router_state'`` mutable.
* ``'router_fixed'`` (never trained, never changed after init): SMoE-Dropout's random
  router ``kernel`` ``[D, E]`` and ``bias`` ``[E]``. It is not a ``'params'`` collection,
  so an optimizer over ``params`` never sees it; the training loop carries it with the
  other non-parameter collections.

RNG streams: THOR draws from ``'router'`` (training needs it; evaluation uses it when
given, else a fixed seed). Jitter, where a router uses it, draws from ``'dropout'``.

Routers that need the token ids (``needs_token_ids = True``: the hash router) get them
from :class:`~routezoo.layers.moe.block.MoE` as ``token_ids`` int32 ``[T]``
"""

from __future__ import annotations

import math
import zlib
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from routezoo.layers.routers.base import Router, Routing, routing_stats, top_k
from routezoo.layers.routers.base import _num_groups
from routezoo.layers.routers.base import _check_choice, _load_stats
from routezoo.layers.routers.base import register

Array = jax.Array

THOR_TRAIN_LEVELS = ("token", "sequence", "batch")
THOR_INFERENCE_LEVELS = ("token", "sequence")
SMOE_SCHEDULES = ("linear", "cosine", "steps")


# ------------------------------------------------------------------ hash


def _fmix32(h: Array) -> Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def hash_table(vocab_size: int, num_experts: int, seed: int) -> np.ndarray:
    """The fixed table of :class:`HashRouter` for ``vocab_size > 0``: a random permutation
    of the vocabulary (``numpy`` PCG64 seeded with ``seed``) taken modulo ``E``, so every
    expert owns ``floor(V/E)`` or ``ceil(V/E)`` token ids. int32 ``[V]``."""
    perm = np.random.default_rng(int(seed)).permutation(int(vocab_size))
    return (perm % int(num_experts)).astype(np.int32)


def hash_experts(token_ids: Array, num_experts: int, seed: int, vocab_size: int = 0) -> Array:
    """Expert of each token id (int32, same shape as ``token_ids``).

    ``vocab_size > 0``: :func:`hash_table` lookup for ids in ``[0, V)``; ids outside it
    (and every id when ``vocab_size = 0``) use the integer hash
    ``fmix32(id XOR fmix32(seed + 0x9E3779B9)) mod E``.
    """
    ids = token_ids.astype(jnp.int32)
    salt = _fmix32(jnp.uint32((int(seed) + 0x9E3779B9) & 0xFFFFFFFF))
    hashed = (_fmix32(ids.astype(jnp.uint32) ^ salt) % jnp.uint32(num_experts)).astype(jnp.int32)
    if vocab_size <= 0:
        return hashed
    table = jnp.asarray(hash_table(vocab_size, num_experts, seed))
    inside = (ids >= 0) & (ids < vocab_size)
    return jnp.where(inside, table[jnp.clip(ids, 0, vocab_size - 1)], hashed)


@register("hash")
class HashRouter(Router):
    """Hash layer (Roller, Sukhbaatar, Szlam, Weston 2021, "Hash Layers For Large Sparse
    Models"): each token goes to one expert chosen by a fixed hash of its token id,
    ``e(t) = hash(x_t)``, with combine weight 1: ``y_t = FFN_{hash(x_t)}(h_t)``. No learned
    parameters, no losses; routing never looks at the hidden state.

    The hash is the paper's "Random Hash": a fixed random map from the vocabulary to the
    experts, seeded by ``seed`` (``moe.hash_seed``). With ``vocab_size > 0``
    (``moe.hash_vocab_size``) it is a random permutation of ``[0, V)`` modulo ``E``
    (:func:`hash_table`), so the vocabulary is split exactly evenly; the paper draws each
    token's expert independently, which is balanced only in expectation. With
    ``vocab_size = 0`` it is an integer hash of the id (no table, any vocabulary). The
    paper's "Balanced" hash (frequent tokens spread by corpus frequency) needs token
    counts and is not implemented. Every MoE layer built from one config uses the same
    map.

    Needs the token ids: :class:`~routezoo.layers.moe.block.MoE` passes ``token_ids`` ``[T]``
    (``needs_token_ids``); calling it without them raises ``ValueError``.
    """

    seed: int = 0
    vocab_size: int = 0

    needs_token_ids: ClassVar[bool] = True
    config_keys: ClassVar[dict[str, Any]] = {
        "hash_seed": 0,           # seed of the fixed token-id -> expert map (Roller et al. 2021)
        # V > 0: random permutation of [0, V) mod E (exactly balanced); 0: integer hash of the id
        "hash_vocab_size": 0,
    }

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool, group_size: int | None = None,
                 token_ids: Array | None = None) -> Routing:
        # x: [T, D]; token_ids: [T] (or [B, L] with B·L = T)
        num_tokens = x.shape[0]
        _num_groups(num_tokens, group_size)
        if token_ids is None:
            raise ValueError("moe.router='hash' routes by token id: call the MoE block as "
                             "MoE(x, deterministic=..., token_ids=tokens) with int32 tokens [B, L]")
        ids = jnp.asarray(token_ids).reshape(-1)
        if ids.shape[0] != num_tokens:
            raise ValueError(f"hash router: {ids.shape[0]} token ids for {num_tokens} tokens")
        experts = hash_experts(ids, self.num_experts, self.seed, self.vocab_size)  # [T]
        indices = experts[:, None]  # [T, K=1]
        weights = jnp.ones((num_tokens, 1), jnp.float32)
        return Routing(indices=indices, weights=weights, losses={},
                       stats=_load_stats(indices, self.num_experts))

    @classmethod
    def from_config(cls, moe_cfg: Any, **kwargs) -> "HashRouter":
        return cls(**cls.common_kwargs(moe_cfg), seed=int(moe_cfg.hash_seed),
                   vocab_size=int(moe_cfg.hash_vocab_size), **kwargs)

    @classmethod
    def check_config(cls, moe_cfg: Any, *, causal: bool) -> None:
        super().check_config(moe_cfg, causal=causal)
        if int(moe_cfg.hash_vocab_size) < 0:
            raise ValueError(f"moe.hash_vocab_size={moe_cfg.hash_vocab_size} must be >= 0 "
                             "(0: integer hash of the id, no table)")


# ------------------------------------------------------------------ THOR


@register("thor")
class ThorRouter(Router):
    """THOR (Zuo et al. 2022, "Taming Sparsely Activated Transformer with Stochastic
    Experts"): no router; each token uses one uniformly random expert, ``e ~ U{0..E-1}``,
    with weight 1: ``y = FFN_e(x)``. Routing depends only on the RNG, never on ``x``; no
    parameters, no losses in the layer. The consistency loss needs two passes of the whole
    model with independent draws; :meth:`model_losses` computes it from the model's two
    passes (``DecoderLM`` runs the second one).

    The loss. The authors' code (``thor/translation_thor.py``, ``train_step``) trains on
    ``CE1 + CE2 + α · ½ Σ_v (p1 − p2)(log p1 − log p2)``, each term summed over non-padding
    tokens and the gradient divided by the token count once, i.e. per token
    ``CE1 + CE2 + α · symKL`` with ``α = 5`` in their IWSLT'14 script (config default 1).
    Here the training loop's cross-entropy is the first pass's, and:

    * ``thor_consistency = α · symKL`` (``moe.thor_consistency_coef`` = ``α``), the mean over
      tokens weighted by the loss weights (padding out, as the authors' ``non_pad_mask``);
    * with ``moe.thor_ce_both`` the term ``thor_ce_both = ½ (CE2 − CE1)``, so the loss is
      ``½ (CE1 + CE2) + α · symKL``: the MEAN of both passes' cross-entropies, which keeps the
      loss on the scale of one cross-entropy as for every other router. That is the
      authors' loss divided by 2 when ``α`` here is half theirs: ``α = 2.5`` reproduces their
      ``α = 5`` up to that overall factor (Adam's step is nearly invariant to it; gradient
      clipping, ``optimizer.clip_norm``, sees the halved norm; their script clips nothing).
      Without ``thor_ce_both`` (the default) only the first pass's cross-entropy trains.

    The authors' settings: ``moe.num_experts = 2``, ``model.ffn = 'moe'`` with
    ``moe.every = 2`` (experts in every other layer; they put them in the even-indexed
    layers 0, 2, ..., ``moe.every = 2`` in the odd ones 1, 3, ...; a list such as
    ``model.ffn = 'moe,mlp,moe,mlp'`` places them as theirs), ``moe.thor_train_level =
    'batch'``, ``moe.thor_inference = 'sequence'``, ``moe.thor_consistency_coef = 2.5`` with
    ``moe.thor_ce_both = True``.

    Granularity of the draw (one draw per token, per routing group of ``S`` tokens, or one
    for all ``T`` tokens of the call):

    * training (``train_level``, ``moe.thor_train_level``): ``'token'`` by default. The
      paper says experts are "randomly activated for each input"; the authors' code
      (``thor/transformer_thor_layer.py``) draws ONE expert per layer per forward pass for
      the whole batch, which is ``'batch'`` here. Per-batch draws send all tokens to one
      expert: with capacity dispatch that needs ``capacity_factor >= E`` (checked), and
      under expert parallelism one shard does all the work.
    * inference (``inference``, ``moe.thor_inference``): ``'sequence'`` (default; the
      authors' script runs ``inference_level=1``, one random expert per sentence) or
      ``'token'`` (``inference_level=0``). "Sequence" means routing group: one sequence
      with the default ``moe.group_size = 0``. The authors' code runs every expert and
      masks; here only the chosen expert runs.

    RNG: training draws from the ``'router'`` stream (required). At inference the draw
    uses ``'router'`` when the caller provides it, else a fixed key from ``seed``
    (``moe.thor_seed``) folded with the module path, so evaluation is repeatable and
    layers draw independently.
    """

    train_level: str = "token"
    inference: str = "sequence"
    seed: int = 0

    config_keys: ClassVar[dict[str, Any]] = {
        # random expert per token | sequence (routing group) | batch (authors' code: one per pass)
        "thor_train_level": "token",
        # at eval one random expert per sequence (authors' script) | token
        "thor_inference": "sequence",
        # alpha of the symmetric-KL consistency between two passes (paper's config default 1.0;
        # IWSLT script 5.0 on CE1 + CE2, i.e. 2.5 here with thor_ce_both)
        "thor_consistency_coef": 1.0,
        # True: the loss has the mean of both passes' cross-entropies, (CE1 + CE2) / 2 (the authors
        # train on both); False: the first pass's only
        "thor_ce_both": False,
        "thor_seed": 0,           # fixed eval draw when no 'router' rng is given
    }

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool, group_size: int | None = None) -> Routing:
        # x: [T, D] (only its length is used)
        num_tokens, num_experts = x.shape[0], self.num_experts
        g, s = _num_groups(num_tokens, group_size)
        if not deterministic:
            if not self.has_rng("router"):
                raise ValueError("moe.router='thor' draws experts from the 'router' RNG stream in "
                                 "training: apply(..., rngs={'router': key}, deterministic=False)")
            key, level = self.make_rng("router"), self.train_level
        else:
            if self.has_rng("router"):
                key = self.make_rng("router")
            else:
                path = zlib.crc32("/".join(map(str, self.path)).encode()) & 0x7FFFFFFF
                key = jax.random.fold_in(jax.random.PRNGKey(self.seed), path)
            level = self.inference
        if level == "token":
            experts = jax.random.randint(key, (num_tokens,), 0, num_experts, jnp.int32)  # [T]
        elif level == "sequence":
            experts = jnp.repeat(jax.random.randint(key, (g,), 0, num_experts, jnp.int32), s)  # [T]
        elif level == "batch":
            experts = jnp.full((num_tokens,), jax.random.randint(key, (), 0, num_experts, jnp.int32))
        else:
            raise ValueError(f"thor router: unknown level {level!r}; known: {list(THOR_TRAIN_LEVELS)}")
        indices = experts[:, None]  # [T, K=1]
        weights = jnp.ones((num_tokens, 1), jnp.float32)
        return Routing(indices=indices, weights=weights, losses={},
                       stats=_load_stats(indices, num_experts))

    @classmethod
    def model_losses(cls, model_cfg: Any, logits: Array, rerun, *, deterministic: bool,
                     targets: Array | None = None, loss_weights: Array | None = None) -> dict[str, Array]:
        """THOR's two-pass terms (training only; see the class docstring): with
        ``moe.thor_consistency_coef`` = ``α > 0`` or ``moe.thor_ce_both``, a second forward
        pass with independent expert draws ``p2`` beside the first ``p1``, then

        * ``thor_consistency = α · mean_t ½ Σ_v (p1 − p2)(log p1 − log p2)`` (``α > 0``);
        * ``thor_ce_both = ½ (CE2 − CE1)`` (``thor_ce_both``), so that the loop's ``CE1`` plus
          it is ``½ (CE1 + CE2)``; it needs ``targets``.

        ``mean_t`` and the cross-entropies are means over tokens weighted by ``loss_weights``
        (all 1 when ``None``), as the training step's cross-entropy."""
        moe = model_cfg.moe
        coef, ce_both = float(moe.get("thor_consistency_coef", 0.0)), bool(moe.get("thor_ce_both", False))
        if deterministic or (coef <= 0 and not ce_both):
            return {}
        if ce_both and targets is None:
            raise ValueError("moe.thor_ce_both=True needs the targets: call the model with targets= "
                             "(and loss_weights=), as the training step does")
        logits2 = rerun()             # a second, independent draw of experts
        w = (jnp.ones(logits.shape[:-1], jnp.float32) if loss_weights is None
             else jnp.asarray(loss_weights, jnp.float32))  # [B, L]
        mean = lambda v: jnp.sum(w * v) / jnp.maximum(jnp.sum(w), 1.0)  # noqa: E731
        logp1 = jax.nn.log_softmax(logits.astype(jnp.float32), -1)  # [B, L, V]
        logp2 = jax.nn.log_softmax(logits2.astype(jnp.float32), -1)
        losses = {}
        if coef > 0:
            sym_kl = 0.5 * jnp.sum((jnp.exp(logp1) - jnp.exp(logp2)) * (logp1 - logp2), axis=-1)  # [B, L]
            losses["thor_consistency"] = coef * mean(sym_kl)
        if ce_both:
            nll = lambda logp: -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # noqa: E731
            losses["thor_ce_both"] = 0.5 * (mean(nll(logp2)) - mean(nll(logp1)))
        return losses

    @classmethod
    def from_config(cls, moe_cfg: Any, **kwargs) -> "ThorRouter":
        return cls(**cls.common_kwargs(moe_cfg), train_level=str(moe_cfg.thor_train_level),
                   inference=str(moe_cfg.thor_inference), seed=int(moe_cfg.thor_seed), **kwargs)

    @classmethod
    def check_config(cls, moe_cfg: Any, *, causal: bool) -> None:
        super().check_config(moe_cfg, causal=causal)
        _check_choice(moe_cfg, "thor_train_level", THOR_TRAIN_LEVELS)
        _check_choice(moe_cfg, "thor_inference", THOR_INFERENCE_LEVELS)
        if moe_cfg.dispatch != "capacity":
            return
        e = int(moe_cfg.num_experts)
        # one expert for a whole group fits only when C = S, i.e. cf >= E (K = 1)
        if moe_cfg.thor_train_level != "token" and float(moe_cfg.capacity_factor) < e:
            raise ValueError(f"moe.thor_train_level={moe_cfg.thor_train_level!r} sends a whole group to one "
                             f"expert: with moe.dispatch='capacity' it needs moe.capacity_factor >= "
                             f"moe.num_experts={e} (got {moe_cfg.capacity_factor}); or use dispatch='dropless'")
        if moe_cfg.thor_inference == "sequence" and float(moe_cfg.eval_capacity_factor) < e:
            raise ValueError(f"moe.thor_inference='sequence' sends a whole group to one expert: with "
                             f"moe.dispatch='capacity' it needs moe.eval_capacity_factor >= "
                             f"moe.num_experts={e} (got {moe_cfg.eval_capacity_factor}); or use "
                             "dispatch='dropless' or thor_inference='token'")


# ------------------------------------------------------------------ SMoE-Dropout


def smoe_k(step: Array | int, *, schedule: str, k_start: int, k_end: int, steps: int) -> Array:
    """Number of active experts at training step ``step`` (int32 scalar, traceable).

    With ``f = clip(step / steps, 0, 1)`` and the authors' ``calculate_gate_number``
    (``new_utils.py``):

    * ``'linear'`` (``linear_increase``): ``k = round((k_end - k_start)·f) + k_start``;
    * ``'cosine'`` (``cosine_increase``): ``k = round((k_start - k_end)·cos(π f / 2)) + k_end``;
    * ``'steps'`` (``multi_step_increase``): the levels ``1, 2, 4, ...`` (powers of two
      below ``k_end``, then ``k_end``) in equal stages, level ``floor(n·f)`` of ``n``
      (the last from ``f = 1`` on); for ``k_end = 16`` these are the authors' levels
      ``[1, 2, 4, 8, 16]``.

    Then clipped to ``[k_start, k_end]``. ``round`` is half-to-even, as Python's.
    """
    f = jnp.clip(jnp.asarray(step, jnp.float32) / max(int(steps), 1), 0.0, 1.0)
    if schedule == "linear":
        k = jnp.round((k_end - k_start) * f) + k_start
    elif schedule == "cosine":
        k = jnp.round((k_start - k_end) * jnp.cos(jnp.pi * f / 2)) + k_end
    elif schedule == "steps":
        levels = [2 ** i for i in range(max(1, math.ceil(math.log2(k_end))) + 1) if 2 ** i < k_end] + [k_end]
        n = len(levels)
        stage = jnp.minimum(jnp.floor(n * f), n - 1).astype(jnp.int32)
        k = jnp.asarray(levels, jnp.float32)[stage]
    else:
        raise ValueError(f"unknown smoe_k_schedule {schedule!r}; known: {list(SMOE_SCHEDULES)}")
    return jnp.clip(k, k_start, k_end).astype(jnp.int32)


@register("smoe_dropout")
class SMoEDropoutRouter(Router):
    """SMoE-Dropout (Chen, Zhang, Jaiswal, Liu, Wang 2023, "Sparse MoE as the New Dropout:
    Scaling Dense and Self-Slimmable Transformers"): a randomly initialised router that is
    never trained, and a number of active experts ``k`` that grows during training.

    * Router: ``h = x W_r + b``, ``W_r`` ``[D, E]``, ``b`` ``[E]`` drawn at init as a PyTorch
      ``nn.Linear`` (``U(±1/√D)``, the authors' ``CustomNaiveGate``) and kept in the
      ``'router_fixed'`` collection, not in ``'params'``: no optimizer ever updates it
      (the authors freeze ``gate.gate`` by ``requires_grad = False``). Gradients still
      flow to ``x`` through the combine weights, as in the authors' code.
    * ``I = TopK(h, k)``, ``w = softmax(h_I)`` (softmax over the selected logits only, the
      authors' code; equal to the full softmax renormalised over ``I``),
      ``y = Σ_{i∈I} w_i FFN_i(x)``. No load-balancing or z-loss (the coefficients in the
      config are ignored: the router cannot learn from them).
    * ``k`` in training: :func:`smoe_k` of the step counter ``'router_state'/step``
      (int32, starts at 0, +1 after every non-deterministic call made with
      ``'router_state'`` mutable), from ``k_start`` to ``k_end`` (0: ``E``) over
      ``k_steps`` counted calls. Shapes stay static: the top ``k_end`` experts are taken
      and slots ``>= k(step)`` become ``-1`` with weight 0 (the softmax runs over the
      first ``k(step)`` only).
    * Evaluation ("self-slimmable"): ``deterministic=True`` routes to the top ``eval_k``
      (attribute, ``moe.smoe_eval_k``; 0: ``k_end``; the ``eval_k`` keyword of
      ``__call__`` overrides it), any ``1 <= eval_k <= E``; ``K = eval_k`` slots. To
      sweep ``k`` through an MoE block: ``moe.clone(router=moe.router.clone(eval_k=k))``
      or rebuild it with ``moe.smoe_eval_k = k``; the variables do not change. The
      authors evaluate at full ``k = E`` (``set_router_mode``) and sweep
      ``{1, 2, 4, 8, 16}``. The training loop does that sweep at every evaluation
      (:meth:`eval_variants`, ``moe.smoe_eval_sweep``) and logs ``eval_loss@k1``,
      ``eval_bits_per_byte@k1``, ... beside the plain ``eval_loss`` (at ``eval_k``).

    The paper's own text was not checked beyond its abstract; the equations above follow
    the authors' code (``custom_gate.py``, ``new_utils.py``).
    """

    k_start: int = 1
    k_end: int = 0
    k_steps: int = 1000
    schedule: str = "linear"
    eval_k: int = 0

    config_keys: ClassVar[dict[str, Any]] = {
        "smoe_k_schedule": "linear",   # k over training: linear | cosine | steps (1, 2, 4, ... k_end)
        "smoe_k_start": 1,             # k at step 0 (authors' enwik8 script: E/2)
        "smoe_k_end": 0,               # final k; 0 = num_experts
        "smoe_k_steps": 1000,          # steps (counted router calls in training) to reach smoe_k_end
        "smoe_eval_k": 0,              # k at evaluation (self-slimmable, any 1..E); 0 = final k
        # also evaluate at these k during training (eval_loss@k2, ...): auto (1, 2, 4, ... E) | "" | "1,4"
        "smoe_eval_sweep": "auto",
    }

    @property
    def k_max(self) -> int:
        return int(self.k_end) or self.num_experts

    def k_at(self, step: Array | int) -> Array:
        """``k`` at training step ``step`` (int32 scalar)."""
        return smoe_k(step, schedule=self.schedule, k_start=int(self.k_start), k_end=self.k_max,
                      steps=int(self.k_steps))

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool, group_size: int | None = None,
                 eval_k: int | None = None) -> Routing:
        # x: [T, D]
        num_tokens, num_experts = x.shape[0], self.num_experts
        _num_groups(num_tokens, group_size)
        d = x.shape[-1]
        initializing = self.is_initializing()
        if not initializing and not self.has_variable("router_fixed", "kernel"):
            raise ValueError("moe.router='smoe_dropout': the frozen router lives in the 'router_fixed' "
                             "collection; pass every collection returned by init to apply")
        bound = 1.0 / math.sqrt(d)
        kernel = self.variable("router_fixed", "kernel", lambda: jax.random.uniform(
            self.make_rng("params"), (d, num_experts), jnp.float32, -bound, bound))
        bias = self.variable("router_fixed", "bias", lambda: jax.random.uniform(
            self.make_rng("params"), (num_experts,), jnp.float32, -bound, bound))
        has_step = initializing or self.has_variable("router_state", "step")
        step = self.variable("router_state", "step", jnp.zeros, (), jnp.int32) if has_step else None

        logits = jnp.einsum("TD,DE->TE", x.astype(jnp.float32), jax.lax.stop_gradient(kernel.value),
                            precision=jax.lax.Precision.HIGHEST)
        logits = logits + jax.lax.stop_gradient(bias.value)[None, :]  # [T, E]
        probs = jax.nn.softmax(logits, axis=-1)

        if deterministic:
            k = int(eval_k if eval_k is not None else self.eval_k) or self.k_max
            if not 1 <= k <= num_experts:
                raise ValueError(f"smoe_dropout: eval_k={k} must be between 1 and {num_experts}")
            vals, indices = top_k(logits, k)  # [T, K]
            weights = jax.nn.softmax(vals, axis=-1)
            k_now = jnp.asarray(k, jnp.int32)
        else:
            if step is None:
                raise ValueError("moe.router='smoe_dropout' needs its step counter in training: pass the "
                                 "'router_state' collection (mutable to advance the schedule)")
            k_now = self.k_at(step.value)
            vals, idx = top_k(logits, self.k_max)  # [T, K=k_max]
            active = jnp.arange(self.k_max)[None, :] < k_now  # [1, K]
            weights = jax.nn.softmax(jnp.where(active, vals, -jnp.inf), axis=-1)
            weights = jnp.where(active, weights, 0.0)
            indices = jnp.where(active, idx, -1)
            if not initializing and self.is_mutable_collection("router_state"):
                step.value = step.value + 1

        stats = routing_stats(indices, probs, num_experts)
        stats["k"] = k_now.astype(jnp.float32)
        return Routing(indices=indices.astype(jnp.int32), weights=weights.astype(jnp.float32),
                       losses={}, stats=stats)

    @classmethod
    def eval_ks(cls, moe_cfg: Any) -> list[int]:
        """The ``k`` of the evaluations reported during training (``moe.smoe_eval_sweep``):
        ``'auto'``: the authors' sweep, powers of two up to ``E`` and ``E`` itself
        (``{1, 2, 4, 8, 16}`` for 16 experts); ``''``: none; else comma-separated ints."""
        spec, e = str(moe_cfg.smoe_eval_sweep).strip(), int(moe_cfg.num_experts)
        if spec == "auto":
            return sorted({2 ** i for i in range(e.bit_length()) if 2 ** i <= e} | {e})
        try:
            ks = [int(v) for v in spec.split(",") if v.strip()]
        except ValueError:
            ks = [0]
        if any(not 1 <= k <= e for k in ks):
            raise ValueError(f"moe.smoe_eval_sweep={spec!r} must be 'auto', '' or comma-separated k "
                             f"between 1 and moe.num_experts={e}")
        return sorted(set(ks))

    @classmethod
    def eval_variants(cls, moe_cfg: Any) -> dict[str, dict[str, Any]]:
        """Self-slimmable evaluation: the same model evaluated at every ``k`` of
        :meth:`eval_ks` (metrics ``eval_loss@k4``, ...)."""
        return {f"k{k}": {"smoe_eval_k": k} for k in cls.eval_ks(moe_cfg)}

    @classmethod
    def from_config(cls, moe_cfg: Any, **kwargs) -> "SMoEDropoutRouter":
        return cls(**cls.common_kwargs(moe_cfg), k_start=int(moe_cfg.smoe_k_start),
                   k_end=int(moe_cfg.smoe_k_end), k_steps=int(moe_cfg.smoe_k_steps),
                   schedule=str(moe_cfg.smoe_k_schedule), eval_k=int(moe_cfg.smoe_eval_k), **kwargs)

    @classmethod
    def check_config(cls, moe_cfg: Any, *, causal: bool) -> None:
        super().check_config(moe_cfg, causal=causal)
        _check_choice(moe_cfg, "smoe_k_schedule", SMOE_SCHEDULES)
        e = int(moe_cfg.num_experts)
        k_end = int(moe_cfg.smoe_k_end)
        if not 0 <= k_end <= e:
            raise ValueError(f"moe.smoe_k_end={k_end} must be between 0 (= num_experts) and "
                             f"moe.num_experts={e}")
        k_end = k_end or e
        k_start = int(moe_cfg.smoe_k_start)
        if not 1 <= k_start <= k_end:
            raise ValueError(f"moe.smoe_k_start={k_start} must be between 1 and the final k={k_end}")
        if int(moe_cfg.smoe_k_steps) < 1:
            raise ValueError(f"moe.smoe_k_steps={moe_cfg.smoe_k_steps} must be >= 1")
        cls.eval_ks(moe_cfg)
        if not 0 <= int(moe_cfg.smoe_eval_k) <= e:
            raise ValueError(f"moe.smoe_eval_k={moe_cfg.smoe_eval_k} must be between 0 (= final k) and "
                             f"moe.num_experts={e}")
