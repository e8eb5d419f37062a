"""Distillation from a frozen teacher: the loss term the one train step adds, and the teacher.

Einsum letters: ``B`` batch, ``L`` length, ``V`` vocab.

With ``distill.teacher_workdir`` set (a trained run's workdir whose model has the same
vocabulary and the same training objective) and ``distill.weight > 0``, every train step
also runs the teacher on the step's inputs (evaluation mode, no gradient) and adds

    distill = weight · T² · Σ_{b,l} w_bl KL(softmax(t_bl / T) || softmax(s_bl / T)) / Σ w_bl

to the loss, where ``s`` and ``t`` are the student's and the teacher's logits ``[B, L, V]``,
``w`` the objective's loss weights and ``T = distill.temperature`` (Hinton, Vinyals, Dean
2015, "Distilling the Knowledge in a Neural Network": the ``T²`` keeps the gradient's scale
independent of ``T``). The cross-entropy and the model's own loss terms stay as they are;
the step logs ``distill`` (the weighted term) and ``distill_kl`` (the KL alone, times ``T²``).

The teacher's parameters and model state are a non-trained argument of the jitted step,
after the state, the batch and (adapter runs) the base; they are never donated, never in
the optimizer and never written. With no teacher (the default) or ``distill.weight = 0``
nothing is loaded and the step is the plain one.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn


@dataclasses.dataclass(frozen=True)
class Distill:
    """What the train step needs to know about the teacher (its values come as an argument).

    Attributes:
      model: the teacher's Flax module.
      weight: the term's weight (> 0).
      temperature: ``T`` (> 0).
    """

    model: nn.Module
    weight: float
    temperature: float = 1.0


def distill_kl(student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array,
               temperature: float = 1.0) -> jax.Array:
    """``T² · Σ w KL(p_t || p_s) / max(Σ w, 1)``: the per-token mean KL of the student's
    softened distribution from the teacher's (float32 scalar).

    Args:
      student_logits: ``[..., V]``.
      teacher_logits: ``[..., V]`` (no gradient flows into them).
      weights: ``[...]`` per-token weights (0 drops a token).
      temperature: ``T``.

    Returns:
      The scalar term before ``distill.weight``.
    """
    t = float(temperature)
    logp_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    logp_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)    # [...]
    return t * t * jnp.sum(kl * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@dataclasses.dataclass
class Teacher:
    """A loaded teacher: the step's static part, its variables and their shardings.

    Attributes:
      spec: :class:`Distill` (passed to ``make_train_step(teacher=)``).
      variables: ``{'params': ..., **model_state}``, placed on the run's mesh.
      shardings: their sharding tree (the jitted step's in-sharding for them).
      workdir: where it came from.
    """

    spec: Distill
    variables: Any
    shardings: Any
    workdir: str


def enabled(config) -> bool:
    """Whether ``config`` distils from a teacher (a teacher workdir and a weight > 0)."""
    d = config.get("distill", None)
    return d is not None and bool(str(d.teacher_workdir)) and float(d.weight) > 0


def check_config(config) -> None:
    """One-line ``ValueError`` for a ``distill`` section that cannot run: a negative weight,
    a temperature <= 0, a teacher directory that is no trained run, or a teacher of another
    vocabulary size or objective."""
    d = config.get("distill", None)
    if d is None:
        return
    if float(d.weight) < 0:
        raise ValueError(f"config key 'distill.weight' must be >= 0, got {d.weight}")
    if not float(d.temperature) > 0:
        raise ValueError(f"config key 'distill.temperature' must be > 0, got {d.temperature}")
    if not enabled(config):
        return
    teacher_config(config)


def teacher_config(config):
    """The teacher run's config, checked against the student's (one-line ``ValueError``)."""
    from routezoo import zoo
    from routezoo.training.workdir import read_workdir_config
    path = str(config.distill.teacher_workdir)
    key = "config key 'distill.teacher_workdir'"
    if not os.path.isdir(path):
        raise ValueError(f"{key}: {path!r} is not a directory; give the workdir of a trained run")
    try:
        tcfg = read_workdir_config(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{key}: {' '.join(str(e).split())}") from None
    ckpt = os.path.join(path, "checkpoints")
    if not (os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt))):
        raise ValueError(f"{key}: {path!r} holds no checkpoint (nothing in {ckpt}); give a run that saved one")
    if int(tcfg.model.vocab_size) != int(config.model.vocab_size):
        raise ValueError(f"{key}: the teacher's model.vocab_size is {tcfg.model.vocab_size}, the student's "
                         f"{config.model.vocab_size}; the teacher must share the student's vocabulary")
    t_obj = getattr(zoo.model_class(tcfg.model), "objective", "causal_lm")
    s_obj = getattr(zoo.model_class(config.model), "objective", "causal_lm")
    if t_obj != s_obj:
        raise ValueError(f"{key}: the teacher ({tcfg.model.name}) trains on {t_obj!r}, the student "
                         f"({config.model.name}) on {s_obj!r}; allowed: a teacher of the same objective")
    return tcfg


def load_teacher(config, mesh, rules, log: Callable[[str], None] = print) -> Teacher | None:
    """The frozen teacher of ``config`` placed on ``mesh``, or ``None`` when distillation is
    off. Call inside the mesh and rules context. The teacher's newest intact checkpoint is
    restored (:func:`routezoo.training.workdir.restore_state`; an adapter run's teacher with
    its adapter merged in) and only its parameters and model state are kept."""
    if not enabled(config):
        return None
    from routezoo import zoo
    from routezoo.training.workdir import restore_state
    tcfg = teacher_config(config)
    model = zoo.build(tcfg.model)
    state = restore_state(str(config.distill.teacher_workdir), tcfg, model, mesh, rules, log=log)
    variables = {"params": state.params, **dict(state.model_state)}
    shardings = jax.tree.map(lambda x: x.sharding, variables)
    count = sum(int(x.size) for x in jax.tree.leaves(state.params))
    log(f"distill: teacher {tcfg.model.name} ({count / 1e6:.2f}M parameters) from "
        f"{os.path.abspath(str(config.distill.teacher_workdir))}, weight {float(config.distill.weight):g}, "
        f"temperature {float(config.distill.temperature):g}")
    return Teacher(Distill(model, float(config.distill.weight), float(config.distill.temperature)),
                   variables, shardings, os.path.abspath(str(config.distill.teacher_workdir)))


__all__ = ["Distill", "Teacher", "check_config", "distill_kl", "enabled", "load_teacher", "teacher_config"]
