"""Multi-head latent attention (MLA; DeepSeek-AI 2024, "DeepSeek-V2: A Strong, Economical,
and Efficient Mixture-of-Experts Language Model"; also DeepSeek-V3 Technical Report, 2024).

Einsum letters: ``B`` batch, ``L`` length (queries), ``M`` length (keys), ``D`` embed,
``H`` heads, ``Q`` query latent rank (``q_lora_rank``), ``Y`` key/value latent rank
(``kv_lora_rank``), ``d`` no-rope query/key head dim (``qk_nope_head_dim``), ``P`` rope
head dim (``qk_rope_head_dim``), ``A = d + P`` query/key head dim, ``v`` value head dim.

    q  = (RMSNorm(x @ q_a) @ q_b)  or  x @ q           [B, L, H, A] = [q_nope (d) | q_rope (P)]
    c, k_rope = split(x @ kv_a, [Y, P])                 c: [B, L, Y], k_rope: [B, L, P] (one for all heads)
    k_nope, v = split(RMSNorm(c) @ kv_b, [d, v])        [B, L, H, d], [B, L, H, v]
    k  = [k_nope | rope(k_rope) broadcast over H]       [B, L, H, A]
    y  = softmax(q·k / sqrt(A) + mask) @ v @ o          [B, L, D]

Parameters (logical names): ``q_a`` ``[D, Q]`` (embed, rank), ``q_a_norm/scale`` ``[Q]``,
``q_b`` ``[Q, H, A]`` (rank, heads, head_dim) when ``q_lora_rank > 0``, else ``q``
``[D, H, A]``; ``kv_a`` ``[D, Y + P]`` (embed, rank), ``kv_a_norm/scale`` ``[Y]``, ``kv_b``
``[Y, H, d + v]`` (rank, heads, head_dim), ``o`` ``[H, v, D]`` (heads, head_dim, embed).
``kv_a`` is one parameter (latent and rope key together) as in the checkpoints.

Choices, as the Hugging Face ``transformers`` DeepSeek-V3 implementation computes them:
the latent RMSNorms use ``latent_norm_eps`` (1e-6: transformers builds them with the
RMSNorm default, not the model's ``rms_norm_eps``); the softmax scale is ``A**-0.5``;
``rope_scaling`` (:class:`routezoo.layers.attention.RopeScaling`, YaRN: Peng et al. 2023,
arXiv 2309.00071) changes the rope frequencies and multiplies the rotated ``q_rope`` and
``k_rope`` by its attention factor (transformers scales cos and sin), and, as
DeepSeek-V2/V3 do, multiplies the softmax scale by ``m(factor, mscale_all_dim)^2``
(:meth:`~routezoo.layers.attention.RopeScaling.softmax_factor`);
``rope_interleave=True`` rotates the rope dims as interleaved pairs ``(0, 1), (2, 3), ...``
(the DeepSeek checkpoints' layout); ``False``: half-split pairs ``(i, i + P/2)``.

Attention runs on the expanded ``[B, M, H, A]`` keys. On GPUs, for 16-bit inputs without
a padding mask, it goes through cuDNN's flash attention (the values zero-padded from ``v``
to ``A``, since that kernel takes one head dim); elsewhere it materialises the
``[B, H, L, M]`` scores with a float32 softmax. With ``decode=True`` the layer caches the
normed latent and the rotated shared key (not the expanded keys and values) and expands
them at every step.

Packed documents: ``segment_ids`` int ``[B, L]`` (documents ``1, 2, ...``, ``0`` padding)
keep attention inside each document, as in :class:`routezoo.layers.attention.Attention`
(:func:`~routezoo.layers.attention.segment_mask_of`; ``positions`` must restart at 0 per
document). The segment mask keeps the cuDNN path (the full ``[B, 1, L, M]`` mask goes
into the kernel as a bias, a padding mask and-ed into it); in decode mode the cache keeps
every written slot's segment id beside the latent.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from routezoo.layers.adapters.hooks import project
from routezoo.layers.norms import RMSNorm
from routezoo.layers.attention import ATTN_OUT, RopeScaling, combine_masks, decode_cache, rope_scaling_of, rotary_embedding
from routezoo.layers.attention import segment_mask_of
from routezoo.layers.attention import default_kernel_init
from routezoo.layers.sharding import constrain, param

Dtype = Any


class MLAttention(nn.Module):
    """Causal (or bidirectional) multi-head latent attention; see the module docstring.

    ``__call__(x [B, L, D], positions [B, L] | None, segment_mask | None, decode=False,
    segment_ids [B, L] | None) -> [B, L, D]``; ``segment_mask`` is bool, broadcastable to
    ``[B, 1, L, M]`` (True: the query may attend to the key), ``segment_ids`` the packed
    documents of each row (0: padding), both as for
    :class:`routezoo.layers.attention.Attention`.
    """

    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int = 0            # 0: plain query projection
    rope_theta: float = 10000.0
    rope_interleave: bool = True
    rope_scaling: RopeScaling | None = None   # None: plain rotary embeddings
    latent_norm_eps: float = 1e-6
    causal: bool = True
    implementation: str | None = None   # None/'auto', 'xla' or 'cudnn' (see __call__)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        # x: [B, L, H, P]; interleaved pairs are gathered to halves first (a fixed permutation
        # of the P dims, the same for queries and keys, so q·k is unchanged by it).
        if self.rope_interleave:
            x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
        return rotary_embedding(x, positions, self.rope_theta, self.rope_scaling)

    def _softmax_factor(self) -> float:
        return 1.0 if self.rope_scaling is None else self.rope_scaling.softmax_factor()

    def _use_cudnn(self, q: jax.Array, segment_mask: jax.Array | None, segmented: bool = False) -> bool:
        """``implementation`` ``'cudnn'``, or ``None``/``'auto'`` where cuDNN's flash
        attention applies: a GPU, 16-bit inputs, no padding mask (a ``[B, 1, 1, M]`` mask is
        no bias cuDNN takes) unless ``segmented`` (packed documents: the mask is the full
        ``[B, 1, L, M]`` document mask, the padding mask and-ed into it), a head dim that is
        a multiple of 8 and at most 128 (256 on Hopper and later)."""
        if self.implementation not in (None, "auto"):
            return self.implementation == "cudnn"
        if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16) \
                or (segment_mask is not None and not segmented) or q.shape[-1] % 8:
            return False
        cc = getattr(jax.devices()[0], "compute_capability", "0")
        return q.shape[-1] <= (256 if float(cc) >= 9.0 else 128)

    def _attend_xla(self, qq, kk, val, scale: float, allowed) -> jax.Array:
        """Softmax attention with materialised ``[B, H, L, M]`` scores, ``allowed`` (bool,
        broadcastable to them) the keys each query may see: ``[B, L, H, v]``."""
        if qq.dtype == jnp.float32:   # float32 models: exact scores (the HF parity tests)
            scores = jnp.einsum("BLHA,BMHA->BHLM", qq, kk, precision=jax.lax.Precision.HIGHEST)
        else:   # 16-bit models: 16-bit products, float32 accumulation (tensor cores on GPUs;
            # upcasting to float32 first made XLA run a SIMT float32 GEMM over [B, H, L, L])
            scores = jnp.einsum("BLHA,BMHA->BHLM", qq, kk, preferred_element_type=jnp.float32)
        scores = scores * scale
        # A finite floor, not -inf: a query with no allowed key (padding) gets finite junk.
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)                       # [B, H, L, M]
        return jnp.einsum("BHLM,BMHv->BLHv", probs, val)

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array | None = None,
                 segment_mask: jax.Array | None = None, decode: bool = False,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        b, l, d = x.shape
        h, n, p, v, r = (self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim,
                         self.kv_lora_rank)
        k = n + p
        if p % 2:
            raise ValueError(f"MLA: qk_rope_head_dim={p} must be even")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(l), (b, l))

        def w(name, shape, names):
            return jnp.asarray(self.param(name, param(default_kernel_init, names), shape, self.param_dtype),
                               self.dtype)

        norm = lambda name: RMSNorm(eps=self.latent_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        if self.q_lora_rank > 0:
            cq = project(self, "q_a", "BLD,DQ->BLQ", x, w("q_a", (d, self.q_lora_rank), ("embed", "rank")))
            q = project(self, "q_b", "BLQ,QHA->BLHA", norm("q_a_norm")(cq),
                        w("q_b", (self.q_lora_rank, h, k), ("rank", "heads", "head_dim")))
        else:
            q = project(self, "q", "BLD,DHA->BLHA", x, w("q", (d, h, k), ("embed", "heads", "head_dim")))
        q = constrain(q, ("batch", "length", "act_heads", None))
        ckv = project(self, "kv_a", "BLD,DY->BLY", x, w("kv_a", (d, r + p), ("embed", "rank")))   # [B, L, Y + P]
        latent = norm("kv_a_norm")(ckv[..., :r])                                         # [B, L, Y]
        q_rope = self._rope(q[..., n:], positions)                                       # [B, L, H, P]
        k_rope = self._rope(ckv[:, :, None, r:], positions)                              # [B, L, 1, P]
        allowed = None
        if decode:   # the cache holds the normed latent and the rotated shared key (DeepSeek-V2's)
            cached, allowed = decode_cache(self, {"latent": latent, "k_rope": k_rope}, segment_ids)
            latent, k_rope = cached["latent"], cached["k_rope"]
        m = latent.shape[1]
        kv = project(self, "kv_b", "BLY,YHA->BLHA", latent,
                     w("kv_b", (r, h, n + v), ("rank", "heads", "head_dim")))        # [B, M, H, d + v]
        kv = constrain(kv, ("batch", "length", "act_heads", None))
        k_nope, val = kv[..., :n], kv[..., n:]
        qq = jnp.concatenate([q[..., :n], q_rope], axis=-1)                              # [B, L, H, A]
        kk = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (b, m, h, p))], axis=-1)  # [B, M, H, A]

        scale = k ** -0.5 * self._softmax_factor()
        if not decode and segment_ids is not None:   # packed documents: one full [B, 1, L, L] mask
            segment_mask = jnp.broadcast_to(
                combine_masks(segment_mask_of(segment_ids, segment_ids), segment_mask), (b, 1, l, l))
        if not decode and self._use_cudnn(qq, segment_mask, segmented=segment_ids is not None):
            # cuDNN flash attention (no [B, H, L, L] scores). jax.nn.dot_product_attention
            # takes one head dim for q, k and v: the values are zero-padded from v to A and
            # the padded output columns (exactly 0) are dropped.
            vp = jnp.pad(val, ((0, 0), (0, 0), (0, 0), (0, k - v))) if k > v else val
            out = jax.nn.dot_product_attention(qq, kk, vp, mask=segment_mask, is_causal=self.causal,
                                               scale=scale, implementation="cudnn")[..., :v]
        else:
            if allowed is None:
                allowed = jnp.tril(jnp.ones((l, l), bool)) if self.causal else jnp.ones((l, l), bool)
                allowed = allowed[None, None]
            out = self._attend_xla(qq, kk, val, scale,
                                   allowed if segment_mask is None else allowed & segment_mask)
        out = checkpoint_name(constrain(out, ("batch", "length", "act_heads", None)), ATTN_OUT)   # [B, L, H, v]
        y = project(self, "o", "BLHv,HvD->BLD", out, w("o", (h, v, d), ("heads", "head_dim", "embed")), num_in=2)
        return constrain(y, ("batch", "length", "act_embed"))


def mla_from_config(cfg: Any, *, causal: bool, dtype: Dtype, param_dtype: Dtype,
                    name: str | None = None) -> MLAttention:
    """:class:`MLAttention` from ``config.model`` (``num_heads``, ``rope_theta``, ``rope_scaling`` and the
    ``mla_*`` keys of ``configs/base.py``)."""
    scaling = rope_scaling_of(cfg)
    return MLAttention(
        num_heads=int(cfg.num_heads), kv_lora_rank=int(cfg.mla_kv_lora_rank),
        qk_nope_head_dim=int(cfg.mla_qk_nope_head_dim), qk_rope_head_dim=int(cfg.mla_qk_rope_head_dim),
        v_head_dim=int(cfg.mla_v_head_dim), q_lora_rank=int(cfg.mla_q_lora_rank),
        rope_theta=float(cfg.rope_theta), rope_interleave=bool(cfg.mla_rope_interleave),
        rope_scaling=scaling, implementation=str(cfg.get("attention_impl", "auto")),
        causal=causal, dtype=dtype, param_dtype=param_dtype, name=name)
