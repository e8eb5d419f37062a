"""Several seeds of one run as one program: the train state stacked on a leading seed axis
and the step vectorised over it with ``jax.vmap``.

A small model leaves most of an accelerator idle: every kernel is short, so a step costs
about as much as its launches and the host's dispatch. Training ``S`` seeds as one program
makes every kernel ``S`` times larger for one launch, which is how a leaderboard gets its
seeds (and its noise band) for little more than the price of one.

Seed ``s`` of a stacked run computes what a run of its own with ``config.seed = s``
computes: its initial state is the same bit for bit (:func:`create_stacked_state`; the
random draws of ``jax.random`` are the same under ``vmap``), and each step applies the
unchanged single-run step to that seed's slice of the state and of the batch
(:func:`stacked_step`). Only the order of floating-point sums inside the vectorised
kernels may differ, so losses agree to rounding, not always bit for bit.

::

    state = create_stacked_state(model, tx, config, shardings, seeds=[0, 1, 2])
    step = jax.jit(stacked_step(make_train_step(model, tx, config, schedule)),
                   in_shardings=(stacked_shardings(shardings), stacked_shardings(batch_sharding)),
                   donate_argnums=0)
    state, metrics = step(state, stacked_batches)   # batches [S, B, L]; metrics [S]
    one = unstack(state, 1)                           # seed 1's TrainState

The seed axis is never sharded (``stacked_shardings`` puts ``None`` in front of every
partition spec): each seed's state lives where a single run's would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from routezoo.training.state import TrainState, fresh_state, init_variables


def stacked_shardings(shardings: Any) -> Any:
    """``shardings`` (a tree of ``NamedSharding``) with an unsharded leading seed axis."""
    return jax.tree.map(lambda s: NamedSharding(s.mesh, P(None, *s.spec)), shardings,
                        is_leaf=lambda s: isinstance(s, NamedSharding))


def create_stacked_state(model, tx, config, shardings, seeds: Sequence[int]) -> TrainState:
    """The fresh TrainStates of ``seeds`` stacked on axis 0, each equal bit for bit to
    :func:`~routezoo.training.state.create_state`'s with ``config.seed`` set to that seed.

    Random init only: a run that loads its parameters (``init.from_hf``,
    ``init.from_workdir``) starts every seed from the same weights, which is a different
    experiment (seeds of the data order); build that from ``create_state`` and
    :func:`stack` instead.

    Args:
      model: the Flax module.
      tx: the optimizer.
      config: the run's config (``config.seed`` is not read).
      shardings: the single-run TrainState sharding tree of
        :func:`~routezoo.training.state.state_shardings`.
      seeds: the seeds, one per slice of axis 0.
    """
    if config.init.get("from_hf") or config.init.get("from_workdir"):
        raise ValueError("create_stacked_state starts from random init; init.from_hf / init.from_workdir "
                         "runs start every seed from the same weights (stack create_state's states instead)")
    if not len(seeds):
        raise ValueError("create_stacked_state needs at least one seed")
    init_vars = init_variables(model, config)
    init = lambda seed: fresh_state(init_vars, tx, seed)   # noqa: E731 - create_state's, the seed traced
    return jax.jit(jax.vmap(init), out_shardings=stacked_shardings(shardings))(
        jnp.asarray([int(s) for s in seeds], jnp.int32))


def stacked_step(step: Callable, *, shared: int = 0) -> Callable:
    """``step(state, batch, *rest)`` vectorised over a leading seed axis of ``state`` and
    ``batch``; the last ``shared`` arguments (e.g. frozen base parameters or a teacher's
    variables) are the same for every seed. Every output gains the seed axis."""
    def in_axes(n):
        return tuple([0] * (n - shared) + [None] * shared)
    return lambda *args: jax.vmap(step, in_axes=in_axes(len(args)))(*args)


def stack(trees: Sequence[Any]) -> Any:
    """Equal-structured pytrees stacked on a new axis 0."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, i: int) -> Any:
    """Slice ``i`` of axis 0 of every leaf (seed ``i``'s tree)."""
    return jax.tree.map(lambda x: x[i], tree)
