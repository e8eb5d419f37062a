"""Attention with grouped key/value heads, rotary embeddings (with YaRN scaling) and a
key/value cache for decoding.

Einsum letters: ``B`` batch, ``L`` length (queries), ``M`` length (keys), ``D`` embed,
``H`` query heads, ``U`` key/value heads, ``A`` head dim, ``F`` mlp, ``V`` vocab.

Packed rows (several documents in one row): ``segment_ids`` int ``[B, L]`` number the
documents of a row ``1, 2, 3, ...`` and mark padding with ``0``; :func:`segment_mask_of`
turns them into the bool mask ``[B, 1, L, M]`` that keeps attention inside a document
(padding queries attend padding keys only, so no row of the softmax is empty), and
:class:`Attention` and :class:`~routezoo.layers.mla.MLAttention` take them (also in decode
mode, where the cache keeps the segment id of every written slot: :func:`decode_cache`).
On GPUs the masked case stays on cuDNN's fused flash kernel
(:func:`segment_attention_implementation`); :func:`cudnn_packed_attention` is cuDNN's
packed (ragged offsets) layout, kept for measurement, not used by the layers.

Every parameter carries logical axis names (see :mod:`routezoo.layers.sharding`) and every
large activation is constrained by name, so the same modules run unsharded, data-parallel,
FSDP or tensor-parallel depending only on the mesh and the rules in context.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from routezoo.layers.adapters.hooks import project
from routezoo.layers.sharding import constrain, param
from routezoo.layers.sharding import default_kernel_init

Dtype = Any


QK_NORMS = ("none", "head", "full")

# The name (``jax.ad_checkpoint.checkpoint_name``) of every attention layer's output before
# its output projection, ``[B, L, H, A]``, which ``model.remat='save_moe_dispatch_attn'``
# keeps for the backward pass (routezoo/zoo/stack.py).
ATTN_OUT = "attn_out"


ROPE_SCALING_TYPES = ("none", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding scaling (``config.model.rope_scaling``); ``type='none'``: plain RoPE.

    ``type='yarn'``: YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of
    Large Language Models", arXiv 2309.00071), as ``transformers``'
    ``_compute_yarn_parameters`` computes it. With ``θ_i = theta^(-2i/P)`` (``i < P/2``, ``P``
    the rotary dims) and ``c(r) = P·ln(L0 / (2π r)) / (2 ln theta)`` the dim whose
    wavelength fits ``r`` rotations into the original context ``L0``
    (``original_max_position_embeddings``)::

        lo, hi = max(floor(c(beta_fast)), 0), min(ceil(c(beta_slow)), P - 1)   (no floor/ceil if not truncate)
        ramp_i = clip((i - lo) / (hi - lo), 0, 1)                               (hi += 0.001 if lo == hi)
        inv_freq_i = θ_i / factor · ramp_i + θ_i · (1 - ramp_i)

    so fast dims (many rotations in ``L0``) keep their frequency (extrapolation) and slow
    ones are divided by ``factor`` (interpolation). ``m(s, a) = 0.1·a·ln(s) + 1`` (1 for
    ``s <= 1``); cos and sin are multiplied by :meth:`cos_sin_factor`: ``attention_factor``
    if > 0, else ``m(factor, mscale) / m(factor, mscale_all_dim)`` when both are set
    (DeepSeek), else ``m(factor, 1)`` (the paper's ``sqrt(1/t) = 0.1 ln(s) + 1``).
    DeepSeek-V2/V3 attention (:mod:`routezoo.layers.mla`) also multiplies its softmax scale
    by :meth:`softmax_factor` ``= m(factor, mscale_all_dim)^2`` (1 if ``mscale_all_dim``
    is 0). ``0`` stands for "not set" in ``mscale``, ``mscale_all_dim`` and
    ``attention_factor``, as ``None`` does in HF configs.
    """

    type: str = "none"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float = 0.0
    truncate: bool = True

    @classmethod
    def from_config(cls, cfg: Any) -> "RopeScaling":
        """From ``config.model.rope_scaling`` (a ConfigDict or dict; ``None``: none)."""
        if cfg is None:
            return cls()
        items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
        unknown = sorted(set(items) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"model.rope_scaling has unknown keys {unknown}; allowed: "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        out = cls(**{k: type(getattr(cls(), k))(v) for k, v in items.items()})
        out.check()
        return out

    def check(self) -> None:
        """``ValueError`` (one line) for settings that cannot run."""
        if self.type not in ROPE_SCALING_TYPES:
            raise ValueError(f"model.rope_scaling.type={self.type!r} is unknown; allowed: "
                             f"{', '.join(ROPE_SCALING_TYPES)}")
        if self.type == "none":
            return
        if not self.factor > 0:
            raise ValueError(f"model.rope_scaling.factor={self.factor} must be > 0")
        if self.original_max_position_embeddings < 1:
            raise ValueError(f"model.rope_scaling.original_max_position_embeddings="
                             f"{self.original_max_position_embeddings} must be >= 1 with type 'yarn'")
        if not self.beta_fast > 0 or not self.beta_slow > 0:
            raise ValueError(f"model.rope_scaling.beta_fast={self.beta_fast} and beta_slow={self.beta_slow} "
                             "must be > 0")
        if min(self.mscale, self.mscale_all_dim, self.attention_factor) < 0:
            raise ValueError("model.rope_scaling.mscale, mscale_all_dim and attention_factor must be >= 0 "
                             "(0: not set)")

    @property
    def active(self) -> bool:
        return self.type != "none"

    def inv_freq(self, dim: int, theta: float) -> np.ndarray:
        """float32 inverse frequencies ``[dim/2]`` of ``dim`` rotary dims (computed in float64)."""
        pos = theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)     # [dim/2]
        if not self.active:
            return (1.0 / pos).astype(np.float32)

        def corr(rotations):
            return dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
                2 * math.log(theta))
        lo, hi = corr(self.beta_fast), corr(self.beta_slow)
        if self.truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)   # 1: interpolate
        return (ramp / (self.factor * pos) + (1.0 - ramp) / pos).astype(np.float32)

    @staticmethod
    def _m(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    def cos_sin_factor(self) -> float:
        """YaRN's attention factor, multiplying cos and sin (1 without scaling)."""
        if not self.active:
            return 1.0
        if self.attention_factor > 0:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return self._m(self.factor, self.mscale) / self._m(self.factor, self.mscale_all_dim)
        return self._m(self.factor)

    def softmax_factor(self) -> float:
        """DeepSeek-V2/V3's factor on the softmax scale: ``m(factor, mscale_all_dim)^2`` (or 1)."""
        if not self.active or not self.mscale_all_dim:
            return 1.0
        return self._m(self.factor, self.mscale_all_dim) ** 2


def rope_scaling_of(model_cfg: Any) -> RopeScaling | None:
    """The active :class:`RopeScaling` of ``config.model.rope_scaling``, or None."""
    scaling = RopeScaling.from_config(model_cfg.get("rope_scaling", None))
    return scaling if scaling.active else None


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float = 10000.0,
                     scaling: RopeScaling | None = None) -> jax.Array:
    """Applies rotary position embeddings (Su et al., 2021, RoFormer) to ``x: [B, L, H, A]``.

    Uses the half-split convention (pairs ``(i, i + A/2)``), as GPT-NeoX and Llama do.
    ``positions: [B, L]`` integer positions. ``scaling``: a :class:`RopeScaling` (YaRN
    frequencies, cos and sin times its attention factor); ``None``: plain RoPE.
    """
    k = x.shape[-1]
    if k % 2:
        raise ValueError(f"rotary embeddings need an even head dim, got {k}")
    if scaling is not None and scaling.active:
        freq = jnp.asarray(scaling.inv_freq(k, theta))                          # [A/2]
        mult = scaling.cos_sin_factor()
    else:
        freq = theta ** (-jnp.arange(0, k // 2, dtype=jnp.float32) * 2.0 / k)  # [A/2]
        mult = 1.0
    angle = positions.astype(jnp.float32)[..., None] * freq                     # [B, L, A/2]
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]      # [B, L, 1, A/2]
    if mult != 1.0:
        sin, cos = sin * mult, cos * mult
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def segment_mask_of(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """Document mask of packed rows: bool ``[B, 1, L, M]``, True where query ``i`` may attend
    key ``j``: ``q_segment_ids[b, i] == kv_segment_ids[b, j]``.

    ``q_segment_ids`` int ``[B, L]``, ``kv_segment_ids`` int ``[B, M]``: documents numbered
    ``1, 2, 3, ...`` within a row, ``0`` padding. A real query never sees padding or another
    document; a padding query (0) sees padding keys only, so its softmax row is never
    empty (with causality and self-attention it always holds its own key) and its output
    is finite and meaningless. Causality is not part of it: combine with the kernel's
    ``is_causal`` or a causal mask (and a padding mask with :func:`combine_masks`)."""
    q = jnp.asarray(q_segment_ids)[:, None, :, None]     # [B, 1, L, 1]
    kv = jnp.asarray(kv_segment_ids)[:, None, None, :]   # [B, 1, 1, M]
    return q == kv


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """The logical and of the bool masks that are not ``None`` (broadcast together);
    ``None`` if all are."""
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else out & m
    return out


def cudnn_flash_applies(dtype: Any, head_dim: int) -> bool:
    """Where :class:`Attention`'s default (``implementation`` ``None``/``'auto'``) is cuDNN's
    flash attention: a GPU, 16-bit inputs, head dim <= 128. Elsewhere (CPU, TPU, float32)
    the XLA path, which materialises the ``[B, H, L, M]`` scores."""
    return (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and head_dim <= 128)


def segment_attention_implementation(dtype: Any, head_dim: int, implementation: str | None = None) -> str | None:
    """The ``jax.nn.dot_product_attention`` implementation of document-masked attention
    (``segment_ids`` given, no decoding): ``implementation`` where it names one (``'xla'``,
    ``'cudnn'``); for ``None``/``'auto'`` ``'cudnn'`` where :func:`cudnn_flash_applies`, else
    ``None`` (XLA).

    On the cuDNN path the bool mask ``[B, 1, L, M]`` of :func:`segment_mask_of` enters the
    fused kernel as an additive bias (jax turns it into ``0`` / a large negative number of
    the input dtype, ``[B, 1, L, M]``, broadcast over heads inside the kernel), causality
    stays the kernel's own ``CAUSAL`` mask type: no ``[B, H, L, L]`` scores, one 16-bit
    ``[B, 1, L, L]`` bias read per call (and a bias gradient of that shape written by the
    backward pass). The one place to change to measure another choice."""
    if implementation not in (None, "auto"):
        return implementation
    return "cudnn" if cudnn_flash_applies(dtype, head_dim) else None


def segment_lengths_and_offsets(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """cuDNN's packed layout of contiguous segments: ``(seqlen, offsets)``.

    ``segment_ids`` int ``[B, L]``, documents ``1..n`` contiguous and in order, ``0``
    padding; ``max_segments`` (static) at least the largest ``n`` of any row. ``seqlen``
    int32 ``(B, max_segments)``: the length of document ``j + 1`` (``-1`` where the row has
    fewer); ``offsets`` int32 ``(B, max_segments + 1)``: its first position (``-1`` past the
    row's last document, and in the extra last column), the form
    ``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`` documents for
    ``q_seqlen``/``q_offsets``. Documents numbered above ``max_segments`` are left out (their
    queries get no output)."""
    seg = jnp.asarray(segment_ids).astype(jnp.int32)
    ids = jnp.arange(1, max_segments + 1, dtype=jnp.int32)
    hit = seg[:, None, :] == ids[None, :, None]                           # (B, max_segments, L)
    lengths = jnp.sum(hit, axis=-1, dtype=jnp.int32)
    starts = jnp.argmax(hit, axis=-1).astype(jnp.int32)
    present = lengths > 0
    seqlen = jnp.where(present, lengths, -1)
    offsets = jnp.concatenate([jnp.where(present, starts, -1),
                               jnp.full((seg.shape[0], 1), -1, jnp.int32)], axis=1)
    return seqlen, offsets


def _jax_version() -> tuple[int, ...]:
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in jax.__version__.split(".")[:3])


def cudnn_packed_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                           max_segments: int, causal: bool = True, scale: float | None = None) -> jax.Array:
    """Document-masked attention through cuDNN's packed (ragged offsets) layout: no mask or
    bias array at all; each document is its own sequence for the kernel. For measurement
    (GPU, Hopper or later, cuDNN's flash conditions: 16-bit, head dim a multiple of 8); the
    layers use :func:`segment_attention_implementation`'s dense-mask path.

    ``q [B, L, H, A]``, ``k``/``v`` ``[B, L, U, A]``; returns ``[B, L, H, A]``. Reaches the
    packed layout through jax's private ``jax._src.cudnn.fused_attention_stablehlo.
    dot_product_attention`` (``jax.nn.dot_product_attention`` has no offsets arguments)
    with ``q_seqlen = kv_seqlen``, ``q_offsets = kv_offsets`` of
    :func:`segment_lengths_and_offsets` and mask type ``PADDING_CAUSAL`` (``PADDING`` when
    not causal). Grouped key/value heads (``U < H``): jax before 0.11.2 multiplies
    ``kv_offsets`` by the *query* heads times ``A`` to get element strides (right only for
    ``U = H``; jax 0.10.2's ``_fix_seqlen_offsets``), so there the keys and values are
    repeated to ``H`` heads; jax 0.11.2 strides by ``U`` (seen correct on an H200 for
    ``U`` = 1, 2, 4, 8 of ``H`` = 8, 16). The kernel leaves the outputs at padding (segment
    0) unwritten, and in the backward pass the padding rows' gradients too (NaN or junk
    was seen): outputs there are set to 0 and the gradients to q, k, v there are exactly
    0."""
    from jax._src.cudnn import fused_attention_stablehlo as fused   # private: the packed layout

    h, u = q.shape[2], k.shape[2]
    if u != h and _jax_version() < (0, 11, 2):   # kv strides by query heads there
        k, v = jnp.repeat(k, h // u, axis=2), jnp.repeat(v, h // u, axis=2)
    real = (jnp.asarray(segment_ids) > 0)[:, :, None, None]                     # [B, L, 1, 1]
    # The backward kernel leaves the gradients of padding rows unwritten (NaN or huge junk
    # seen on an H200): select them away, so padding gets exactly zero gradient.
    q, k, v = (jnp.where(real, t, jax.lax.stop_gradient(t)) for t in (q, k, v))
    seqlen, offsets = segment_lengths_and_offsets(segment_ids, max_segments)
    mask_type = fused.MaskType.PADDING_CAUSAL if causal else fused.MaskType.PADDING
    out = fused.dot_product_attention(
        q, k, v, None, None, seqlen, seqlen, offsets, offsets,
        scale=q.shape[-1] ** -0.5 if scale is None else scale, mask_type=mask_type, qkv_layout="BTNH")
    return jnp.where(real, out, jnp.zeros((), out.dtype))


def require_cache(module: nn.Module, name: str) -> None:
    """Outside ``init``, a clear error where ``decode=True`` meets no cache variable."""
    if not module.is_initializing() and not module.has_variable("cache", name):
        raise ValueError(f"{type(module).__name__}: decode=True needs a cache; make one with "
                         "routezoo.zoo.lm.init_cache(model, batch, max_len) and pass it as "
                         "variables['cache'] with mutable=['cache']")


def decode_cache(module: nn.Module, new: dict[str, jax.Array],
                 segment_ids: jax.Array | None = None) -> tuple[dict[str, jax.Array], jax.Array]:
    """Autoregressive decoding's key/value cache of ``module``: per-position arrays ``[B, L,
    ...]`` kept in its ``'cache'`` collection with a write index.

    At ``init`` it creates zero buffers ``[B, M, ...]``, ``M`` the length of the init
    input (the most positions the cache will hold), and an int32 buffer ``segment_ids``
    ``[B, M]`` (always, so that :func:`routezoo.zoo.lm.init_cache` makes it), and returns
    ``new`` unchanged with a causal mask. Afterwards it writes ``new`` at slots ``index ..
    index + L - 1``, advances the index and returns the whole buffers with ``allowed``
    ``[1, 1, L, M]``: query ``i`` (slot ``index + i``) may attend to slot ``j`` iff ``j <=
    index + i``, which also hides the slots not written yet. Writing past ``M`` is not
    detected (callers size the cache).

    ``segment_ids`` int ``[B, L]`` (packed documents, 0 padding; see
    :func:`segment_mask_of`): also written to the ``segment_ids`` buffer at the same
    slots, and ``allowed`` ``[B, 1, L, M]`` further requires slot ``j``'s stored segment id
    to equal query ``i``'s, so a prompt of several packed documents decodes without
    crossing them. Pass them on every call of a decoding run or on none: a call without
    them neither writes the buffer nor reads it (its queries see every earlier slot).
    """
    l = next(iter(new.values())).shape[1]
    initializing = module.is_initializing()
    require_cache(module, "index")
    bufs = {name: module.variable("cache", name, jnp.zeros, a.shape, a.dtype) for name, a in new.items()}
    seg_buf = module.variable("cache", "segment_ids", jnp.zeros, next(iter(new.values())).shape[:2], jnp.int32)
    index = module.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if initializing:
        causal = jnp.tril(jnp.ones((l, l), bool))[None, None]
        return new, causal if segment_ids is None else causal & segment_mask_of(segment_ids, segment_ids)
    start = index.value
    out = {}
    for name, a in new.items():
        bufs[name].value = jax.lax.dynamic_update_slice_in_dim(
            bufs[name].value, a.astype(bufs[name].value.dtype), start, axis=1)
        out[name] = bufs[name].value
    index.value = start + l
    m = next(iter(out.values())).shape[1]
    allowed = jnp.arange(m)[None, :] <= (start + jnp.arange(l))[:, None]
    if segment_ids is None:
        return out, allowed[None, None]
    seg_buf.value = jax.lax.dynamic_update_slice_in_dim(
        seg_buf.value, jnp.asarray(segment_ids).astype(jnp.int32), start, axis=1)
    return out, allowed[None, None] & segment_mask_of(segment_ids, seg_buf.value)   # [B, 1, L, M]


class Attention(nn.Module):
    """Causal multi-head attention with grouped key/value heads and rotary embeddings.

    Attention itself goes through :func:`jax.nn.dot_product_attention`, so GPUs get the
    cuDNN flash kernel (``implementation='cudnn'``) and other platforms the XLA path.
    ``num_kv_heads`` divides ``num_heads``; with ``num_kv_heads == num_heads`` it is plain
    multi-head attention, with 1 it is multi-query attention.

    Options used by imported checkpoints (defaults: off):

    * ``qkv_bias``: biases ``q_bias`` ``[H, A]``, ``k_bias``/``v_bias`` ``[U, A]`` added to
      the projections (Qwen2 / Qwen2-MoE).
    * ``qk_norm``: RMSNorm of queries and keys before the rotary embedding, in float32:
      ``'head'`` normalises each head over ``A`` with scales ``q_norm``/``k_norm`` ``[A]``
      (Qwen3, Qwen3-MoE); ``'full'`` normalises all heads together over ``H·A`` (resp.
      ``U·A``) with scales ``q_norm`` ``[H, A]`` / ``k_norm`` ``[U, A]`` (OLMo, OLMoE).
    * ``rope_scaling``: YaRN (:class:`RopeScaling`): rescaled rotary frequencies, cos and
      sin times the attention factor, as transformers' Llama/Qwen with ``rope_type='yarn'``
      (the softmax scale stays ``A**-0.5``; only latent attention changes it).

    ``decode=True``: autoregressive decoding with the rotated keys and the values cached
    (:func:`decode_cache`); ``segment_mask`` then covers the cache's slots (``[B, 1, 1, M]``).

    Packed documents: ``segment_ids`` int ``[B, L]`` (documents ``1, 2, 3, ...`` of a row in
    order, ``0`` padding) keep every query inside its own document (:func:`segment_mask_of`,
    and-ed with causality and with ``segment_mask`` where given); a padding query attends
    padding keys only (finite, meaningless output). ``positions`` must then restart at 0
    in every document (``routezoo.zoo.lm.positions_from_segments(segment_ids)``), so that
    each document's rotary phases are those of the document run alone. On GPUs (16-bit,
    head dim <= 128) the masked attention stays on cuDNN's flash kernel, the mask entering
    it as a bias (:func:`segment_attention_implementation`); elsewhere the XLA path. With
    ``decode=True`` the cache keeps the segment id of every written slot and a query sees
    only the written slots of its own segment. ``segment_ids=None``: exactly the
    computation without them.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    causal: bool = True
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    qkv_bias: bool = False
    qk_norm: str = "none"
    qk_norm_eps: float = 1e-6
    rope_scaling: RopeScaling | None = None   # YaRN (RopeScaling); None: plain rotary embeddings

    def _qk_rmsnorm(self, name: str, x: jax.Array, head_axis: str) -> jax.Array:
        # x: [B, L, H, A] (or U heads); float32 RMSNorm over A ('head') or H·A ('full').
        heads, k = x.shape[-2], x.shape[-1]
        if self.qk_norm == "head":
            scale = self.param(name, param(nn.initializers.ones, ("head_dim",)), (k,), self.param_dtype)
            axes = (-1,)
        else:
            scale = self.param(name, param(nn.initializers.ones, (head_axis, "head_dim")), (heads, k),
                               self.param_dtype)
            axes = (-2, -1)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axes, keepdims=True) + self.qk_norm_eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array | None = None,
                 segment_mask: jax.Array | None = None, decode: bool = False,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        # x: [B, L, D]; segment_ids: int [B, L] or None (see the class docstring)
        b, l, d = x.shape
        h, g, k = self.num_heads, self.num_kv_heads, self.head_dim
        if h % g:
            raise ValueError(f"num_heads ({h}) must be divisible by num_kv_heads ({g})")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"unknown qk_norm {self.qk_norm!r}; allowed: {', '.join(QK_NORMS)}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(l), (b, l))

        def proj(name, heads, head_axis):
            w = self.param(name, param(default_kernel_init, ("embed", head_axis, "head_dim")),
                           (d, heads, k), self.param_dtype)
            y = project(self, name, "BLD,DHA->BLHA", x, jnp.asarray(w, self.dtype))
            if self.qkv_bias:
                bias = self.param(f"{name}_bias", param(nn.initializers.zeros, (head_axis, "head_dim")),
                                  (heads, k), self.param_dtype)
                y = y + jnp.asarray(bias, self.dtype)
            return y

        q = constrain(proj("q", h, "heads"), ("batch", "length", "act_heads", None))
        kk = constrain(proj("k", g, "kv_heads"), ("batch", "length", "act_kv_heads", None))
        v = constrain(proj("v", g, "kv_heads"), ("batch", "length", "act_kv_heads", None))
        if self.qk_norm != "none":
            q = self._qk_rmsnorm("q_norm", q, "heads")
            kk = self._qk_rmsnorm("k_norm", kk, "kv_heads")
        q = rotary_embedding(q, positions, self.rope_theta, self.rope_scaling)
        kk = rotary_embedding(kk, positions, self.rope_theta, self.rope_scaling)
        if decode:   # attend over the cache (XLA path: a few queries against M slots)
            cached, allowed = decode_cache(self, {"k": kk, "v": v}, segment_ids)
            mask = allowed if segment_mask is None else allowed & segment_mask
            out = jax.nn.dot_product_attention(q, cached["k"], cached["v"], mask=mask)
        elif segment_ids is not None:   # packed documents: [B, 1, L, L] mask, flash kernel on GPUs
            mask = combine_masks(segment_mask_of(segment_ids, segment_ids), segment_mask)
            mask = jnp.broadcast_to(mask, (b, 1, l, l))   # cuDNN takes a bias of the full [L, M]
            impl = segment_attention_implementation(q.dtype, k, self.implementation)
            out = jax.nn.dot_product_attention(
                q, kk, v, mask=mask, is_causal=self.causal, implementation=impl)   # [B, L, H, A]
        else:
            impl = self.implementation
            if impl in (None, "auto"):
                # cuDNN flash attention where it applies (GPU, 16-bit, head dim <= 128); the XLA
                # path materialises [B, H, L, L] scores, which runs out of memory at length 2048.
                use_cudnn = cudnn_flash_applies(q.dtype, k) and segment_mask is None
                impl = "cudnn" if use_cudnn else None
            out = jax.nn.dot_product_attention(
                q, kk, v, mask=segment_mask, is_causal=self.causal, implementation=impl)   # [B, L, H, A]
        out = checkpoint_name(constrain(out, ("batch", "length", "act_heads", None)), ATTN_OUT)
        wo = self.param("o", param(default_kernel_init, ("heads", "head_dim", "embed")),
                        (h, k, d), self.param_dtype)
        y = project(self, "o", "BLHA,HAD->BLD", out, jnp.asarray(wo, self.dtype), num_in=2)
        return constrain(y, ("batch", "length", "act_embed"))
