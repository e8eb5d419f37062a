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

Divergence (``train.on_nonfinite``, docs/runs.md): the step itself flags a non-finite
loss or gradient norm (and, with ``train.spike_factor``, a loss above that factor times
its running mean) without any host round trip. Under ``skip`` a flagged step keeps
``params``, ``opt_state`` and ``model_state`` bit for bit (only ``step`` advances, so the
step number, the data position and the checkpoint numbers stay aligned; the optimizer's
own counters do not advance); under ``stop`` the update is applied and the loop, which
reads the flag with the metrics it already fetches, stops before saving anything after
it. The loop's step (``make_train_step(..., guarded=True)``) also carries a small
:func:`init_guard` tree: the skipped count, the running mean of the loss and the first
flagged step.

Distillation (``distill.*``, :mod:`routezoo.training.distill`): ``make_train_step(...,
teacher=Distill(...))`` takes the frozen teacher's variables as one more, last, argument
of every variant; the teacher runs in evaluation mode on the step's inputs and its
softened KL to the student is the loss term ``distill``. Without a teacher (or with
weight 0) the step is the plain one.
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

NONFINITE_POLICIES = ("stop", "skip")   # train.on_nonfinite
SPIKE_WARMUP = 10       # train.spike_factor: good steps in the running mean before a spike can be flagged
SPIKE_HORIZON = 100     # the running mean: the plain mean of the first 100 good losses, then an EMA of weight 1/100


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


def init_guard(skipped: int = 0, loss_mean: float = 0.0, count: int = 0) -> dict[str, jax.Array]:
    """The divergence guard the loop's step carries from step to step (all scalars).

    ``skipped``: steps skipped so far (``train.on_nonfinite=skip``); ``run`` / ``worst``:
    the current and the longest run of flagged steps in a row; ``first_bad``: the step
    number of the first flagged step (-1: none), with its ``first_loss``,
    ``first_grad_norm`` and ``first_spike`` (1: flagged as a loss spike, 0: non-finite);
    ``loss_mean`` / ``count``: the running mean of the good steps' losses and how many
    went into it. ``skipped``, ``loss_mean`` and ``count`` are saved with each checkpoint.
    """
    i32, f32 = jnp.int32, jnp.float32
    return {"skipped": jnp.asarray(skipped, i32), "run": jnp.zeros((), i32), "worst": jnp.zeros((), i32),
            "first_bad": jnp.asarray(-1, i32), "first_loss": jnp.zeros((), f32),
            "first_grad_norm": jnp.zeros((), f32), "first_spike": jnp.zeros((), i32),
            "loss_mean": jnp.asarray(loss_mean, f32), "count": jnp.asarray(count, i32)}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, config,
                    schedule: optax.Schedule, adapter: Any = None,
                    special_ids: dict[str, int] | None = None, *, guarded: bool = False,
                    teacher: Any = None) -> Callable:
    """The train step of ``model`` under ``tx``.

    Args:
      model: the Flax module.
      tx: the optimizer.
      config: the run's config (``train.grad_accum``, ``train.on_nonfinite``,
        ``train.spike_factor``, ``model``).
      schedule: the learning-rate schedule (logged).
      adapter: an adapter method, or ``None``.
      special_ids: the tokenizer's pad and eos ids for the objective (:func:`objective_batch`).
      guarded: the loop's variant, which carries the divergence guard (:func:`init_guard`).
      teacher: a :class:`~routezoo.training.distill.Distill` (a frozen teacher's module,
        weight and temperature), or ``None``; with weight 0 it is ignored.

    Returns:
      ``train_step(state, batch)``; with an ``adapter``, ``train_step(state, batch, base)``
      where ``state.params`` are the adapter's and ``base`` the frozen base parameters:
      the model runs on ``adapter.merge(base, params)`` and only ``params`` are
      differentiated. ``guarded``: ``train_step(state, guard, batch[, base]) -> (state,
      guard, metrics)``; the loss-spike check needs the guard's running mean, so only this
      variant applies ``train.spike_factor``. Under ``train.on_nonfinite=skip`` a flagged
      step leaves the state as it was except ``step`` (the unguarded variant then logs
      ``nonfinite`` = 1, the guarded one the running total ``skipped_steps``). With a
      ``teacher`` every variant takes the teacher's variables (``{'params', **model_state}``)
      as its last argument, e.g. ``train_step(state, batch, teacher_vars)``.
    """
    accum = int(config.train.grad_accum)
    skip = str(config.train.get("on_nonfinite", "stop")) == "skip"
    spike_factor = float(config.train.get("spike_factor", 0.0))
    distill = teacher if teacher is not None and teacher.weight > 0 else None
    if distill is not None:
        from routezoo.training.distill import distill_kl

    def loss_fn(params, model_state, batch, rng, base, teacher_vars=None):
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
        extra_metrics = {}
        if distill is not None:   # the frozen teacher on the same inputs, in evaluation mode
            t_logits, _ = distill.model.apply(teacher_vars, inputs, deterministic=True,
                                              **packed_kwargs(distill.model, batch))
            kl = distill_kl(logits, t_logits, w, distill.temperature)
            losses["distill"] = distill.weight * kl
            extra_metrics["distill_kl"] = kl
        total = ce + sum(losses.values()) if losses else ce
        metrics = {"ce": ce, "accuracy": correct.sum() / denom, **losses, **aux.get("metrics", {}),
                   **{f"moe/{k}": v for k, v in aux.get("stats", {}).items()}, **extra_metrics}
        return total, (metrics, dict(new_model_state))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict[str, jax.Array], base, guard=None, teacher_vars=None):
        rng = jax.random.fold_in(state.rng, state.step)
        if accum == 1:
            (loss, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch, rng, base,
                                                            teacher_vars)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

            def body(carry, mb_i):
                g_acc, l_acc, m_acc, ms = carry
                mb, i = mb_i
                (l, (m, ms)), g = grad_fn(state.params, ms, mb, jax.random.fold_in(rng, i), base, teacher_vars)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + l,
                        jax.tree.map(jnp.add, m_acc, m), ms), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            m0 = jax.eval_shape(lambda: grad_fn(state.params, state.model_state,
                                                jax.tree.map(lambda x: x[0], micro), rng, base,
                                                teacher_vars)[0][1][0])
            m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
            (grads, loss, metrics, model_state), _ = jax.lax.scan(
                body, (zeros, 0.0, m0, state.model_state), (micro, jnp.arange(accum)))
            grads = jax.tree.map(lambda g: g / accum, grads)
            loss, metrics = loss / accum, jax.tree.map(lambda m: m / accum, metrics)
        grad_norm = optax.tree.norm(grads)
        bad = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))   # computed on device: no host sync
        spike = jnp.zeros((), bool)
        if guard is not None and spike_factor > 0:
            spike = ~bad & (guard["count"] >= SPIKE_WARMUP) & (loss > spike_factor * guard["loss_mean"])
            bad = bad | spike
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if skip:   # drop the update: the old values, bit for bit
            def keep(new, old):
                return jax.tree.map(lambda n, o: jnp.where(bad, o, n), new, old)
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
            model_state = keep(model_state, state.model_state)
        metrics = {"loss": loss, **metrics, "grad_norm": grad_norm,
                   "learning_rate": schedule(state.step)}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  model_state=model_state)
        if guard is None:
            if skip:
                metrics["nonfinite"] = bad.astype(jnp.float32)
            return new_state, metrics
        new_guard = update_guard(guard, bad, spike, loss, grad_norm, state.step + 1, skip)
        if skip:
            metrics["skipped_steps"] = new_guard["skipped"]
        return new_state, new_guard, metrics

    if distill is not None:   # the teacher's variables: the last argument of every variant
        if guarded:
            if adapter is not None:
                return lambda state, guard, batch, base, tv: step(state, batch, base, guard, tv)
            return lambda state, guard, batch, tv: step(state, batch, None, guard, tv)
        if adapter is not None:
            return lambda state, batch, base, tv: step(state, batch, base, None, tv)
        return lambda state, batch, tv: step(state, batch, None, None, tv)

    if guarded:
        if adapter is not None:
            return lambda state, guard, batch, base: step(state, batch, base, guard)
        return lambda state, guard, batch: step(state, batch, None, guard)

    if adapter is not None:
        return step

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        return step(state, batch, None)
    return train_step


def update_guard(guard: dict[str, jax.Array], bad: jax.Array, spike: jax.Array, loss: jax.Array,
                 grad_norm: jax.Array, step: jax.Array, skip: bool) -> dict[str, jax.Array]:
    """The guard after one step (``bad``: the step was flagged; ``step``: its number)."""
    good = ~bad
    count = guard["count"] + good.astype(jnp.int32)
    weight = jnp.maximum(1.0 / jnp.maximum(count, 1).astype(jnp.float32), 1.0 / SPIKE_HORIZON)
    loss_mean = jnp.where(good, guard["loss_mean"] + weight * (loss.astype(jnp.float32) - guard["loss_mean"]),
                          guard["loss_mean"])
    run = jnp.where(bad, guard["run"] + 1, 0)
    first = bad & (guard["first_bad"] < 0)
    return {"skipped": guard["skipped"] + (bad & skip).astype(jnp.int32), "run": run,
            "worst": jnp.maximum(guard["worst"], run),
            "first_bad": jnp.where(first, step.astype(jnp.int32), guard["first_bad"]),
            "first_loss": jnp.where(first, loss.astype(jnp.float32), guard["first_loss"]),
            "first_grad_norm": jnp.where(first, grad_norm.astype(jnp.float32), guard["first_grad_norm"]),
            "first_spike": jnp.where(first, spike.astype(jnp.int32), guard["first_spike"]),
            "loss_mean": loss_mean, "count": count}


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
