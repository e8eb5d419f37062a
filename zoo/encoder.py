"""Bidirectional Transformer encoder trained with masked-token prediction (BERT-style).

Einsum letters: ``B`` batch, ``L`` length, ``D`` embed, ``V`` vocab.

:class:`EncoderMLM` (``model.name='encoder_mlm'``) is :class:`~routezoo.zoo.lm.DecoderLM`
with bidirectional attention: the same embedding, pre-norm blocks (the feed-forward kind
of each layer from ``model.ffn``, any MoE router), final norm and tied output projection,
so everything the decoder supports (per-layer FFN kinds, model-level router state) works
here too. Because no token is hidden from any other, routers that look at the whole
sequence are allowed: ``expert_choice`` and ``soft`` (Soft MoE, :mod:`routezoo.layers.moe.soft`).

Objective (``objective = 'masked_lm'``; the training loop calls :func:`masked_lm_batch`
on every train and eval batch): Devlin et al. 2019, "BERT: Pre-training of Deep
Bidirectional Transformers for Language Understanding". Each valid (non-padding)
position is selected with probability ``model.mask_rate`` (0.15); a selected token is
replaced by the mask id ``vocab_size - 1`` with probability 0.8, by a random id with 0.1
and left unchanged with 0.1; the loss is the cross-entropy of the original token at the
selected positions only. Differences from BERT: positions are selected independently
(Bernoulli, as Hugging Face's data collator does; BERT's data script picks
``round(0.15·n)`` per sequence, capped; not re-checked here), there is no next-sentence task, no segment embeddings and no extra
transform before the tied output projection, and positions are rotary, as in the
decoder. The mask id must be unused by the tokenizer, so ``model.vocab_size`` must be at
least the tokenizer's vocabulary + 1 (259 for bytes; checked by the config validation).
Evaluation masks with a fixed key, so the eval loss of a given checkpoint is
deterministic; its bits per byte are over the masked tokens only (not comparable with a
decoder's).
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from routezoo.zoo.lm import DecoderLM

MASK_SPLIT = (0.8, 0.1, 0.1)   # selected tokens: mask id, random id, unchanged (BERT)


class EncoderMLM(DecoderLM):
    """Bidirectional encoder: ``tokens [B, L] -> (logits [B, L, V] float32, aux)``.

    Same parameters and options as :class:`~routezoo.zoo.lm.DecoderLM`; only the attention
    is bidirectional. Inputs are the (masked) tokens; see :func:`masked_lm_batch`.

    Packed rows: ``model.apply(v, tokens, segment_ids=s, positions=p)`` with ``s`` int
    ``[B, L]`` (documents ``1, 2, 3, ...`` of a row, ``0`` padding) makes attention
    bidirectional *within* each document and blind across documents; a padding token
    attends the row's padding only (its output is meaningless; its targets have weight 0
    in :func:`masked_lm_batch`, which never selects ``pad_id``). ``p`` must restart at 0 per
    document: ``routezoo.zoo.lm.positions_from_segments(s)``. Then each document's logits
    equal those of the document alone, except where a router couples the tokens of a row
    (capacity dispatch; ``expert_choice`` and ``soft`` read the whole routing group, so
    there the documents of a row affect each other as sequences of a group do).
    """

    causal: ClassVar[bool] = False
    objective: ClassVar[str] = "masked_lm"


def masked_lm_batch(batch: dict[str, jax.Array], rng: jax.Array, *, mask_rate: float, mask_id: int,
                    pad_id: int = 0, first_random_id: int = 2) -> tuple[jax.Array, jax.Array, jax.Array]:
    """BERT masking of ``batch['inputs']`` int32 ``[B, L]``: ``(inputs, targets, weights)``.

    ``targets`` are the original tokens, ``weights`` float32 ``[B, L]`` is 1 at the selected
    positions (each non-``pad_id`` position with probability ``mask_rate``) and 0 elsewhere;
    ``inputs`` has the selected tokens replaced: by ``mask_id`` (80%), by a random id
    uniform in ``[first_random_id, mask_id)`` (10%; ids below ``first_random_id`` are pad
    and eos) or kept (10%). ``rng`` is a PRNG key; the other keys of ``batch`` are unused.
    """
    tokens = batch["inputs"]
    k_select, k_kind, k_random = jax.random.split(rng, 3)
    valid = tokens != pad_id
    selected = jax.random.bernoulli(k_select, mask_rate, tokens.shape) & valid  # [B, L]
    u = jax.random.uniform(k_kind, tokens.shape)
    random_ids = jax.random.randint(k_random, tokens.shape, first_random_id, mask_id, tokens.dtype)
    to_mask = selected & (u < MASK_SPLIT[0])
    to_random = selected & (u >= MASK_SPLIT[0]) & (u < MASK_SPLIT[0] + MASK_SPLIT[1])
    inputs = jnp.where(to_mask, jnp.asarray(mask_id, tokens.dtype), jnp.where(to_random, random_ids, tokens))
    return inputs, tokens, selected.astype(jnp.float32)

