"""The one train step and the eval step, for every model, router and adapter.

``train_step(state, batch) -> (state, metrics)`` (an adapter run: ``train_step(state,
batch, base)``) is pure; the loop jits it once with in/out shardings and a donated state.
What differs between models lives in the model and in the loss terms it returns
(``aux['losses']``, added to the cross-entropy and logged by name; ``aux['metrics']``,
logged by name; ``aux['stats']``, logged as ``moe/NAME``), never in a forked step; the
model class's ``objective`` picks what the loss sees (:func:`objective_batch`: next
tokens for decoders, masked tokens for the encoder). Every training call of the model
gets the objective's ``targets`` and ``loss_weights`` (a model whose loss terms need
them reads them; the others ignore them). Non-parameter collections a model keeps
(e.g. a router's balancing bias) are carried in ``state.model_state`` and applied as
mutable.

Mixed precision: parameters and optimizer state in ``model.param_dtype`` (float32),
compute in ``model.dtype``. Gradient accumulation: ``train.grad_accum`` micro-batches
through ``lax.scan``, averaging their gradients.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from routezoo.layers.adapters import hooks as adapter_hooks
from routezoo.training.state import RNG_STREAMS, TrainState
from routezoo.zoo.lm import cross_entropy

EVAL_MASK_SEED = 0   # masked_lm evaluation masks with this fixed key: a deterministic eval loss


BYTE_SPECIAL_IDS = {"pad": 0, "eos": 1}   # routezoo's byte and SentencePiece tokenizers


def special_ids_of(tokenizer: Any) -> dict[str, int]:
    """``{'pad', 'eos'}`` ids of a tokenizer, for the objectives that write them."""
    return {"pad": int(tokenizer.pad_id), "eos": int(tokenizer.eos_id)}


def objective_batch(model: nn.Module, batch: dict[str, jax.Array], rng: jax.Array,
                    special_ids: dict[str, int] | None = None):
    """``(inputs, targets, weights)`` that ``model`` trains on, by its class's ``objective``.

    ``'causal_lm'`` (DecoderLM, and the default): the batch's next-token ``inputs``,
    ``targets``, ``weights`` unchanged; ``'masked_lm'`` (EncoderMLM):
    :func:`routezoo.zoo.encoder.masked_lm_batch` with ``model.mask_rate`` and the mask id
    ``model.vocab_size - 1``, drawn from ``rng``; ``'seq2seq'`` (EncoderDecoderLM):
    :func:`routezoo.zoo.encoder_decoder.seq2seq_batch` (``model.seq2seq_split``) or, with
    ``model.seq2seq_objective='span_corruption'``,
    :func:`routezoo.zoo.encoder_decoder.span_corruption_batch` (drawn from ``rng``); its
    ``inputs`` is a dict the model takes as its first argument.

    Args:
      model: the Flax module.
      batch: ``{'inputs', 'targets', 'weights'[, 'task_id']}``.
      rng: key for objectives that draw (masks, spans).
      special_ids: the tokenizer's ``{'pad', 'eos'}`` ids (:func:`special_ids_of`; default:
        the byte tokenizer's, pad 0 and eos 1): the padding the objectives recognise and
        write, the eos span corruption appends, the decoder start id (pad, as in T5).

    Returns:
      ``(inputs, targets, weights)``.
    """
    ids = {**BYTE_SPECIAL_IDS, **(special_ids or {})}
    objective = getattr(model, "objective", "causal_lm")
    if objective == "causal_lm":
        return batch["inputs"], batch["targets"], batch["weights"]
    if objective == "masked_lm":
        from routezoo.zoo.encoder import masked_lm_batch
        return masked_lm_batch(batch, rng, mask_rate=float(model.cfg.mask_rate),
                               mask_id=int(model.cfg.vocab_size) - 1, pad_id=ids["pad"])
    if objective == "seq2seq":   # EncoderDecoderLM: inputs is a dict of encoder/decoder tokens and masks
        from routezoo.zoo.encoder_decoder import seq2seq_batch, span_corruption_batch
        c = model.cfg
        if str(c.get("seq2seq_objective", "prefix_lm")) == "span_corruption":
            return span_corruption_batch(batch, rng, vocab_size=int(c.vocab_size),
                                         noise_density=float(c.span_noise_density),
                                         mean_span=float(c.span_mean_length), start_id=ids["pad"],
                                         pad_id=ids["pad"],
                                         eos_id=ids["eos"] if bool(c.get("span_append_eos", True)) else None)
        return seq2seq_batch(batch, split=float(c.seq2seq_split), start_id=ids["pad"], pad_id=ids["pad"])
    raise ValueError(f"unknown objective {objective!r} of {type(model).__name__}; "
                     "known: causal_lm, masked_lm, seq2seq")


def packed_kwargs(model: nn.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The model's keyword arguments for packed rows (``data.packing='masked'``): the batch's
    ``segment_ids`` and ``positions`` for models whose inputs are the batch's token
    positions (``causal_lm``, ``masked_lm``); ``{}`` without segments, and for ``seq2seq``,
    whose objective carries them into its input dict itself."""
    if "segment_ids" not in batch or getattr(model, "objective", "causal_lm") == "seq2seq":
        return {}
    return {"segment_ids": batch["segment_ids"], "positions": batch["positions"]}


def forward_params(adapter, base, params):
    """The weights a step's forward pass runs on: the state's own params (no adapter), the
    base with a parameter-space adapter merged in, or the base itself for an adapter that
    acts on activations (through :func:`adapter_hooks.bind` around the forward)."""
    if adapter is None:
        return params
    return base if adapter_hooks.is_activation_adapter(adapter) else adapter.merge(base, params)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, config,
                    schedule: optax.Schedule, adapter: Any = None,
                    special_ids: dict[str, int] | None = None) -> Callable:
    """The train step of ``model`` under ``tx``.

    Args:
      model: the Flax module.
      tx: the optimizer.
      config: the run's config (``train.grad_accum``, ``model``).
      schedule: the learning-rate schedule (logged).
      adapter: an adapter method, or ``None``.
      special_ids: the tokenizer's pad and eos ids for the objective (:func:`objective_batch`).

    Returns:
      ``train_step(state, batch)``; with an ``adapter``, ``train_step(state, batch, base)``
      where ``state.params`` are the adapter's and ``base`` the frozen base parameters:
      the model runs on ``adapter.merge(base, params)`` and only ``params`` are
      differentiated.
    """
    accum = int(config.train.grad_accum)

    def loss_fn(params, model_state, batch, rng, base):
        rngs = {s: jax.random.fold_in(rng, i) for i, s in enumerate(RNG_STREAMS)}
        mutable = list(model_state)
        full = forward_params(adapter, base, params)
        inputs, targets, w = objective_batch(model, batch, jax.random.fold_in(rng, len(RNG_STREAMS)), special_ids)
        with adapter_hooks.bind(adapter, base, params, task_ids=batch.get("task_id"),
                                rng=jax.random.fold_in(rng, len(RNG_STREAMS) + 1), deterministic=False):
            out = model.apply({"params": full, **model_state}, inputs, deterministic=False,
                              targets=targets, loss_weights=w, rngs=rngs, mutable=mutable if mutable else False,
                              **packed_kwargs(model, batch))
        (logits, aux), new_model_state = out if mutable else (out, {})
        nll, correct = cross_entropy(logits, targets, w)
        denom = jnp.maximum(w.sum(), 1.0)
        ce = nll.sum() / denom
        losses = dict(aux.get("losses", {}))
        total = ce + sum(losses.values()) if losses else ce
        metrics = {"ce": ce, "accuracy": correct.sum() / denom, **losses, **aux.get("metrics", {}),
                   **{f"moe/{k}": v for k, v in aux.get("stats", {}).items()}}
        return total, (metrics, dict(new_model_state))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict[str, jax.Array], base):
        rng = jax.random.fold_in(state.rng, state.step)
        if accum == 1:
            (loss, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch, rng, base)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

            def body(carry, mb_i):
                g_acc, l_acc, m_acc, ms = carry
                mb, i = mb_i
                (l, (m, ms)), g = grad_fn(state.params, ms, mb, jax.random.fold_in(rng, i), base)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + l,
                        jax.tree.map(jnp.add, m_acc, m), ms), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            m0 = jax.eval_shape(lambda: grad_fn(state.params, state.model_state,
                                                jax.tree.map(lambda x: x[0], micro), rng, base)[0][1][0])
            m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
            (grads, loss, metrics, model_state), _ = jax.lax.scan(
                body, (zeros, 0.0, m0, state.model_state), (micro, jnp.arange(accum)))
            grads = jax.tree.map(lambda g: g / accum, grads)
            loss, metrics = loss / accum, jax.tree.map(lambda m: m / accum, metrics)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state.step)}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  model_state=model_state)
        return new_state, metrics

    if adapter is not None:
        return step

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        return step(state, batch, None)
    return train_step


def make_eval_step(model: nn.Module, token_bytes: np.ndarray, adapter: Any = None,
                   special_ids: dict[str, int] | None = None) -> Callable:
    """The eval step: the trunk's logits only (no loss terms), sums for the loop to reduce.

    Args:
      model: the Flax module.
      token_bytes: UTF-8 bytes per token id (for bits per byte).
      adapter: an adapter method, or ``None``.
      special_ids: the tokenizer's pad and eos ids for the objective (:func:`objective_batch`).

    Returns:
      ``eval_step(state, batch)`` (an adapter run: ``eval_step(state, batch, base)``) ->
      ``{'nll', 'correct', 'tokens', 'bytes'}`` summed over the batch.
    """
    table = jnp.asarray(token_bytes, jnp.float32)

    def step(state: TrainState, batch, base):
        params = forward_params(adapter, base, state.params)
        inputs, targets, w = objective_batch(model, batch, jax.random.PRNGKey(EVAL_MASK_SEED), special_ids)
        with adapter_hooks.bind(adapter, base, state.params, task_ids=batch.get("task_id")):
            logits, _ = model.apply({"params": params, **state.model_state}, inputs, deterministic=True,
                                    **packed_kwargs(model, batch))
        nll, correct = cross_entropy(logits, targets, w)
        return {"nll": nll.sum(), "correct": correct.sum(), "tokens": w.sum(),
                "bytes": (table[targets] * w).sum()}

    if adapter is not None:
        return step

    def eval_step(state: TrainState, batch):
        return step(state, batch, None)
    return eval_step
