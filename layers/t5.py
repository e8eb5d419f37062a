"""T5-style layers: relative position bias, unscaled attention (self and cross), masks.

Einsum letters: ``B`` batch, ``L`` query length, ``M`` key length, ``D`` embed, ``H``
heads, ``A`` head dim, ``b`` relative-position buckets.

Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (T5), as used by Fedus et al. 2021 (Switch Transformers):

* No absolute or rotary positions. Each attention logit gets a learned scalar per head
  and *bucket* of the relative position ``key - query`` (:func:`relative_position_bucket`):
  half of the buckets are exact small distances, the other half logarithmically wider
  ones up to ``max_distance``; the encoder uses separate buckets for keys before and after
  the query (bidirectional), the decoder only looks back. One table ``[b, H]`` per stack,
  owned by the first layer in T5 and shared by all layers
  (:class:`RelativePositionBias`); cross-attention has no position bias.
* Attention logits are ``q·k`` without the ``1/sqrt(A)`` factor: T5 folds it into the
  initialisation of the query projection (std ``(D·A)^-1/2``). Masked keys get
  ``finfo(float32).min`` added to the logit, as the Hugging Face implementation does (a
  query whose keys are all masked then attends uniformly to all of them; packed
  cross-attention instead gives such a query a zero output, ``zero_empty_rows``).
* Norms are :class:`~routezoo.layers.norms.RMSNorm` (T5's LayerNorm: no mean, no bias),
  dense FFNs are :class:`~routezoo.layers.mlp.MLP` with ``mlp_type='relu'`` (T5 v1.0).

Every projection goes through :func:`~routezoo.layers.adapters.hooks.project`, so
activation-space adapters reach ``q``/``k``/``v``/``o`` of self- and cross-attention.

Packed rows (several documents per row, ``segment_ids`` int ``[B, L]``, documents ``1, 2,
...``, ``0`` padding): :func:`segment_mask` and-s the document mask
(:func:`routezoo.layers.attention.segment_mask_of`) into any of the masks above; for
cross-attention it is built from the decoder's ids (queries) and the encoder's (keys), so
a decoder token of document ``s`` attends only encoder tokens of document ``s``. The
relative position bias takes no positions: :class:`RelativePositionBias` computes
``key - query`` from array indices, and since a document's tokens are contiguous, index
differences within one document equal position differences within it, so masking alone
gives every document the bias it has when run alone (pairs across documents get a bias
too, but they are masked).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from routezoo.layers.adapters.hooks import project
from routezoo.layers.attention import ATTN_OUT, combine_masks, segment_mask_of
from routezoo.layers.sharding import constrain, param

Dtype = Any
NEG = float(np.finfo(np.float32).min)   # additive mask value (Hugging Face T5/Switch)


def relative_position_bucket(relative_position: np.ndarray, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> np.ndarray:
    """T5's bucket of each relative position ``key - query`` (int array), int32 in ``[0, b)``.

    Bidirectional: half of the ``b`` buckets for keys after the query, half for keys at or
    before it; unidirectional: keys after the query share bucket 0 with distance 0. Within
    a half of ``n`` buckets, distances below ``n/2`` have their own bucket and larger ones
    ``n/2 + floor(log(r / (n/2)) / log(max_distance / (n/2)) · n/2)`` (float32, as in T5),
    capped at ``n - 1``.
    """
    rel = np.asarray(relative_position, np.int64)
    out = np.zeros(rel.shape, np.int64)
    n = num_buckets
    if bidirectional:
        n //= 2
        out += (rel > 0).astype(np.int64) * n
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = n // 2
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):
        scaled = (np.log(rel.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact)) * np.float32(n - max_exact))
    large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
    large = np.minimum(large, n - 1)
    return (out + np.where(is_small, rel, large)).astype(np.int32)


class RelativePositionBias(nn.Module):
    """Learned bias ``[1, H, L, M]`` (float32) of every query/key pair: ``table[bucket]``.

    Parameter ``table`` ``[b, H]``, logical names ``(None, 'heads')``. Lengths are static,
    so the buckets are computed in numpy when the function is traced.
    """

    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query_length: int, key_length: int) -> jax.Array:
        table = self.param("table", param(nn.initializers.normal(1.0), (None, "heads")),
                           (self.num_buckets, self.num_heads), self.param_dtype)
        rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]       # [L, M]
        buckets = relative_position_bucket(rel, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                                           max_distance=self.max_distance)
        values = jnp.take(jnp.asarray(table, jnp.float32), jnp.asarray(buckets), axis=0)   # [L, M, H]
        return jnp.transpose(values, (2, 0, 1))[None]                                       # [1, H, L, M]


def padding_mask(key_mask: jax.Array | None) -> jax.Array | None:
    """bool ``[B, 1, 1, M]`` (True: the key may be attended to) from int/bool ``[B, M]``."""
    return None if key_mask is None else (jnp.asarray(key_mask) > 0)[:, None, None, :]


def causal_mask(length: int, key_mask: jax.Array | None = None) -> jax.Array:
    """bool ``[B or 1, 1, L, L]``: key at or before the query, and not padding."""
    causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
    return causal if key_mask is None else causal & padding_mask(key_mask)


def segment_mask(mask: jax.Array | None, q_segment_ids: jax.Array | None,
                 kv_segment_ids: jax.Array | None = None) -> jax.Array | None:
    """``mask`` (bool, broadcastable to ``[B, 1, L, M]``, or None) and the document mask of
    packed rows: ``[B, 1, L, M]`` True where the query's segment id equals the key's
    (``kv_segment_ids`` defaults to ``q_segment_ids``: self-attention). ``q_segment_ids``
    None: ``mask`` unchanged. A query whose keys are all masked (a decoder document with no
    encoder tokens of its id, say) should read nothing: :class:`T5Attention` with
    ``zero_empty_rows`` gives it a zero output, so nothing crosses a document."""
    if q_segment_ids is None:
        return mask
    kv = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    return combine_masks(mask, segment_mask_of(q_segment_ids, kv))


class T5Attention(nn.Module):
    """Multi-head attention as in T5: no positions inside, no ``1/sqrt(A)`` scale.

    ``__call__(x [B, L, D], kv [B, M, D] or None, bias [1|B, H, L, M] or None,
    mask bool [B|1, 1, L|1, M] or None) -> [B, L, D]``; ``kv=None`` is self-attention.
    Parameters ``q``/``k``/``v`` ``[D, H, A]`` and ``o`` ``[H, A, D]`` (names as
    :class:`~routezoo.layers.attention.Attention`), initialised as T5 does (std ``(D·A)^-1/2``
    for ``q``, ``D^-1/2`` for ``k``/``v``, ``(H·A)^-1/2`` for ``o``). Logits, bias, mask
    and softmax are float32. With ``zero_empty_rows`` (packed cross-attention) a query whose
    mask row allows no key gets a zero output instead of Hugging Face's uniform average
    over the masked keys.
    """

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    zero_empty_rows: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array | None = None, bias: jax.Array | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        d = x.shape[-1]
        h, k = self.num_heads, self.head_dim
        src = x if kv is None else kv

        def proj(name, inp, std):
            w = self.param(name, param(nn.initializers.normal(std), ("embed", "heads", "head_dim")),
                           (d, h, k), self.param_dtype)
            y = project(self, name, "BLD,DHA->BLHA", inp, jnp.asarray(w, self.dtype))
            return constrain(y, ("batch", "length", "act_heads", None))

        q = proj("q", x, (d * k) ** -0.5)
        kk = proj("k", src, d ** -0.5)
        v = proj("v", src, d ** -0.5)
        logits = jnp.einsum("BLHA,BMHA->BHLM", q, kk, preferred_element_type=jnp.float32)
        if bias is not None:
            logits = logits + bias
        if mask is not None:
            logits = logits + jnp.where(mask, 0.0, NEG)
        weights = jax.nn.softmax(logits, axis=-1)
        if mask is not None and self.zero_empty_rows:   # a decoder document absent from the encoder reads nothing
            weights = jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights, 0.0)
        weights = weights.astype(self.dtype)
        out = constrain(jnp.einsum("BHLM,BMHA->BLHA", weights, v), ("batch", "length", "act_heads", None))
        out = checkpoint_name(out, ATTN_OUT)   # [B, L, H, A]: kept by model.remat='save_moe_dispatch_attn'
        wo = self.param("o", param(nn.initializers.normal((h * k) ** -0.5), ("heads", "head_dim", "embed")),
                        (h, k, d), self.param_dtype)
        y = project(self, "o", "BLHA,HAD->BLD", out, jnp.asarray(wo, self.dtype), num_in=2)
        return constrain(y, ("batch", "length", "act_embed"))


__all__ = ["RelativePositionBias", "T5Attention", "causal_mask", "padding_mask", "relative_position_bucket",
           "segment_mask"]
