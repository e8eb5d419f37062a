"""Attention with grouped key/value heads, rotary embeddings (with YaRN scaling) and a
key/value cache for decoding.

Einsum letters: ``B`` batch, ``L`` length (queries), ``M`` length (keys), ``D`` embed,
``H`` query heads, ``U`` key/value heads, ``A`` head dim, ``F`` mlp, ``V`` vocab.

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

from routezoo.layers.adapters.hooks import project
from routezoo.layers.sharding import constrain, param
from routezoo.layers.sharding import default_kernel_init

Dtype = Any


QK_NORMS = ("none", "head", "full")


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


def require_cache(module: nn.Module, name: str) -> None:
    """Outside ``init``, a clear error where ``decode=True`` meets no cache variable."""
    if not module.is_initializing() and not module.has_variable("cache", name):
        raise ValueError(f"{type(module).__name__}: decode=True needs a cache; make one with "
                         "routezoo.zoo.lm.init_cache(model, batch, max_len) and pass it as "
                         "variables['cache'] with mutable=['cache']")


def decode_cache(module: nn.Module, new: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], jax.Array]:
    """Autoregressive decoding's key/value cache of ``module``: per-position arrays ``[B, L,
    ...]`` kept in its ``'cache'`` collection with a write index.

    At ``init`` it creates zero buffers ``[B, M, ...]``, ``M`` the length of the init
    input (the most positions the cache will hold), and returns ``new`` unchanged with a
    causal mask. Afterwards it writes ``new`` at slots ``index .. index + L - 1``, advances
    the index and returns the whole buffers with ``allowed`` ``[1, 1, L, M]``: query ``i``
    (slot ``index + i``) may attend to slot ``j`` iff ``j <= index + i``, which also hides
    the slots not written yet. Writing past ``M`` is not detected (callers size the cache).
    """
    l = next(iter(new.values())).shape[1]
    initializing = module.is_initializing()
    require_cache(module, "index")
    bufs = {name: module.variable("cache", name, jnp.zeros, a.shape, a.dtype) for name, a in new.items()}
    index = module.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if initializing:
        return new, jnp.tril(jnp.ones((l, l), bool))[None, None]
    start = index.value
    out = {}
    for name, a in new.items():
        bufs[name].value = jax.lax.dynamic_update_slice_in_dim(
            bufs[name].value, a.astype(bufs[name].value.dtype), start, axis=1)
        out[name] = bufs[name].value
    index.value = start + l
    m = next(iter(out.values())).shape[1]
    allowed = jnp.arange(m)[None, :] <= (start + jnp.arange(l))[:, None]
    return out, allowed[None, None]


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
                 segment_mask: jax.Array | None = None, decode: bool = False) -> jax.Array:
        # x: [B, L, D]
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
            cached, allowed = decode_cache(self, {"k": kk, "v": v})
            mask = allowed if segment_mask is None else allowed & segment_mask
            out = jax.nn.dot_product_attention(q, cached["k"], cached["v"], mask=mask)
        else:
            impl = self.implementation
            if impl in (None, "auto"):
                # cuDNN flash attention where it applies (GPU, 16-bit, head dim <= 128); the XLA
                # path materialises [B, H, L, L] scores, which runs out of memory at length 2048.
                use_cudnn = (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
                             and k <= 128 and segment_mask is None)
                impl = "cudnn" if use_cudnn else None
            out = jax.nn.dot_product_attention(
                q, kk, v, mask=segment_mask, is_causal=self.causal, implementation=impl)   # [B, L, H, A]
        out = constrain(out, ("batch", "length", "act_heads", None))
        wo = self.param("o", param(default_kernel_init, ("heads", "head_dim", "embed")),
                        (h, k, d), self.param_dtype)
        y = project(self, "o", "BLHA,HAD->BLD", out, jnp.asarray(wo, self.dtype), num_in=2)
        return constrain(y, ("batch", "length", "act_embed"))
