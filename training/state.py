"""The train state: what it holds, where its leaves live on the mesh, and how it starts.

:class:`TrainState` carries the parameters (``model.param_dtype``), the optimizer state,
the model's non-parameter collections (e.g. a router's balancing bias, applied as
mutable by the step) and the step's raw PRNG key. :func:`state_shardings` gives its
abstract tree with shardings from the model's logical axis names (the input of an Orbax
restore onto any mesh); :func:`create_state` a fresh one, from random init, from
``init.from_hf`` or from another run's parameters (``init.from_workdir``).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from routezoo.layers import sharding as shd

RNG_STREAMS = ("dropout", "jitter", "router")


@struct.dataclass
class TrainState:
    """One training run's state, a pytree the step maps to the next one.

    Attributes:
      step: int32 scalar, the number of updates applied.
      params: the trained parameters (for an adapter run, the adapter's).
      opt_state: the optimizer state over ``params``.
      model_state: non-parameter collections, e.g. ``{'router_state': ...}``.
      rng: raw uint32 key ``[2]``; the step folds the step number into it.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any
    rng: jax.Array


def maybe_initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` when launched as one of several processes.

    Detected from the coordinator variables JAX reads (``JAX_COORDINATOR_ADDRESS`` with
    ``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``), or SLURM / TPU pod environments, where
    ``initialize()`` discovers the cluster itself.
    """
    if jax.distributed.is_initialized():
        return
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env.get("JAX_PROCESS_ID", "0")))
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()


def mesh_and_rules(config) -> tuple[jax.sharding.Mesh, shd.Rules]:
    """The device mesh of ``config.mesh`` and its logical-axis rules.

    Args:
      config: the run's config (``mesh.data|fsdp|expert|tensor`` and ``mesh.rules``).

    Returns:
      ``(mesh, rules)``.
    """
    rules = shd.rules_from_config(json.loads(config.mesh.rules) if config.mesh.rules else None)
    mesh = shd.make_mesh({a: config.mesh[a] for a in shd.MESH_AXES})
    return mesh, rules


def init_variables(model: nn.Module, config) -> Callable[[jax.Array], Any]:
    """``rng -> variables`` of ``model`` initialised on one ``[1, data.seq_len]`` row.

    Args:
      model: the Flax module.
      config: the run's config.

    Returns:
      The init function (boxed variables; every RNG stream seeded from ``rng``).
    """
    tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
    return lambda rng: model.init({"params": rng, **{s: rng for s in RNG_STREAMS}}, tokens)


def strip_boxes(tree: Any) -> Any:
    """Removes ``nn.LogicallyPartitioned`` boxes without adding sharding constraints."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
                        tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, config, mesh, rules):
    """Where a plain run's state lives on ``mesh``.

    Args:
      model: the Flax module.
      tx: the optimizer.
      config: the run's config.
      mesh: the device mesh.
      rules: logical-axis rules.

    Returns:
      ``(abstract TrainState with shardings, its NamedSharding tree, boxed abstract params)``.
    """
    abstract_vars = jax.eval_shape(init_variables(model, config), jax.random.PRNGKey(0))
    logical = nn.get_partition_spec(abstract_vars)
    var_shard = nn.logical_to_mesh_sharding(logical, mesh, rules)
    unboxed = strip_boxes(abstract_vars)
    abstract, shardings = assemble_state(tx, mesh, unboxed["params"], var_shard["params"], unboxed, var_shard)
    return abstract, shardings, abstract_vars["params"]


def assemble_state(tx, mesh, params, param_shard, unboxed_vars, var_shard):
    """The abstract TrainState over ``params`` and its sharding tree.

    Args:
      tx: the optimizer (its state is sized from ``params``).
      mesh: the device mesh.
      params: unboxed abstract parameters the optimizer trains.
      param_shard: their shardings.
      unboxed_vars: every variable collection (non-``params`` ones become ``model_state``).
      var_shard: shardings of ``unboxed_vars``.

    Returns:
      ``(abstract TrainState whose leaves carry shardings, the sharding tree)``.
    """
    opt_abstract = jax.eval_shape(tx.init, params)

    replicated = NamedSharding(mesh, P())

    def fit(s, leaf):
        # Optimizer leaves shaped like their parameter take its sharding; others replicate;
        # a frozen adapter group's placeholder (optax MaskedNode) stays as it is.
        if isinstance(leaf, optax.MaskedNode):
            return leaf
        if not isinstance(s, NamedSharding) or len(s.spec) > leaf.ndim:
            return replicated
        for dim, axes in zip(leaf.shape, s.spec):
            axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
            if dim % math.prod(mesh.shape[a] for a in axes):
                return replicated
        return s

    opt_shard = optax.tree_map_params(
        tx, lambda leaf, s: fit(s, leaf), opt_abstract, param_shard,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)))
    model_state = {k: v for k, v in unboxed_vars.items() if k != "params"}
    shardings = TrainState(
        step=replicated, params=param_shard, opt_state=opt_shard,
        model_state={k: var_shard[k] for k in model_state}, rng=replicated)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_abstract,
        model_state=model_state, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return abstract, shardings


def create_state(model, tx, config, shardings) -> TrainState:
    """A fresh plain-run TrainState placed with ``shardings``.

    The parameters come from ``init.from_hf`` (read shard by shard onto the mesh), from
    another run's trained parameters (``init.from_workdir``; the optimizer starts fresh)
    or from random init with ``config.seed``.

    Args:
      model: the Flax module.
      tx: the optimizer.
      config: the run's config.
      shardings: the TrainState sharding tree of :func:`state_shardings`.

    Returns:
      The TrainState at step 0.
    """
    init_vars = init_variables(model, config)

    loaded = None
    if config.init.from_hf:
        from routezoo.zoo import hf
        loaded = hf.load_params_for_config(config, None, shardings)
    elif config.init.from_workdir:
        from routezoo.training.workdir import workdir_params   # it restores through this module
        want = jax.eval_shape(lambda r: nn.unbox(init_vars(r))["params"], jax.random.PRNGKey(0))
        loaded = workdir_params(config.init.from_workdir, want, shardings.params, *mesh_and_rules(config),
                                config.model)

    return jax.jit(lambda seed, loaded: fresh_state(init_vars, tx, seed, loaded), static_argnums=0,
                   out_shardings=shardings)(config.seed, loaded)


def fresh_state(init_vars: Callable[[jax.Array], Any], tx: optax.GradientTransformation, seed,
                loaded: Any = None) -> TrainState:
    """The TrainState at step 0 from ``seed`` (a Python int or a traced one): the step's key
    and the init key split from ``PRNGKey(seed)``, parameters from ``init_vars`` (or
    ``loaded``), a fresh optimizer state. :func:`create_state` and the seed-stacked
    :func:`routezoo.training.seeds.create_stacked_state` both start here."""
    rng, init_rng = jax.random.split(jax.random.PRNGKey(seed))
    variables = nn.unbox(init_vars(init_rng))
    fresh = variables.pop("params")
    params = fresh if loaded is None else loaded
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model_state=dict(variables), rng=rng)
