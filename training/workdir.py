"""A finished (or running) run's workdir read back: its config and its trained weights.

``WORKDIR/config.json`` is the resolved config a run wrote (:func:`read_workdir_config`);
``WORKDIR/checkpoints`` its train checkpoints. :func:`load_trained` gives ``(config,
model, state)`` for inference; :func:`restore_params` another run's parameters on a
given mesh (``init.from_workdir``). For an adapter run the parameters returned are its
base with the adapter merged in.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from routezoo import zoo
from routezoo.layers import adapters as adapter_lib
from routezoo.layers import sharding as shd
from routezoo.layers.adapters import hooks as adapter_hooks
from routezoo.training.adapter_run import (adapter_config, adapter_sources, adapter_state_shardings, load_base,
                                           optimizer_for)
from routezoo.training.state import TrainState, mesh_and_rules, state_shardings


def read_workdir_config(workdir: str):
    """The resolved config a run wrote to ``workdir/config.json`` (on top of the defaults)."""
    from routezoo.configs import base
    path = os.path.join(os.path.abspath(workdir), "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: not a routezoo training workdir")
    config = base.get_config()
    config.update_from_flattened_dict(_flatten(json.load(open(path))))
    return config


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def restore_state(workdir: str, config, model: nn.Module, mesh, rules, step: int | None = None) -> TrainState:
    """The TrainState of a run's newest (or given) checkpoint, placed on ``mesh``.

    For an adapter run ``params`` are its base with the adapter merged in. Call it inside
    the mesh and rules context.

    Args:
      workdir: the run's directory.
      config: its config (:func:`read_workdir_config`).
      model: its Flax module.
      mesh: the device mesh to place the state on.
      rules: logical-axis rules.
      step: the checkpoint step; ``None`` for the newest.

    Returns:
      The restored TrainState.
    """
    import orbax.checkpoint as ocp
    workdir = os.path.abspath(workdir)
    adapter = adapter_lib.from_config(adapter_config(config))
    if adapter_hooks.is_activation_adapter(adapter) and not adapter.mergeable:
        raise ValueError(f"{workdir}: adapter.method={adapter.name!r} acts on activations and cannot be merged "
                         "into the weights; use train.load_adapter(WORKDIR/adapter, base) and "
                         "adapter_hooks.bind (routezoo.layers.adapters.hooks) around model.apply")
    tx, _ = optimizer_for(config, adapter)
    if adapter is None:
        abstract, _, _ = state_shardings(model, tx, config, mesh, rules)
    else:
        abstract, _, setup = adapter_state_shardings(model, tx, config, mesh, rules, adapter,
                                                     adapter_sources(config))
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data"))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    manager.close()
    if adapter is not None:   # an adapter run: its base with the adapter merged in
        base = load_base(model, config, setup, mesh, rules)
        state = state.replace(params=jax.jit(adapter.merge, out_shardings=setup.base_shardings)(
            base, state.params))
    return state


def restore_params(workdir: str, mesh, rules, step: int | None = None) -> tuple[Any, Any]:
    """Another run's trained parameters, placed on ``mesh``.

    Args:
      workdir: the run's directory.
      mesh: the device mesh.
      rules: logical-axis rules.
      step: the checkpoint step; ``None`` for the newest.

    Returns:
      ``(config, params)``; for an adapter run the params are its base with the adapter
      merged in.
    """
    config = read_workdir_config(workdir)
    return config, restore_state(workdir, config, zoo.build(config.model), mesh, rules, step).params


def workdir_params(source: str, want_abstract, param_shardings, mesh, rules) -> Any:
    """``init.from``: another run's trained parameters, checked against the shapes and
    dtypes of ``want_abstract`` and placed with ``param_shardings``."""
    _, params = restore_params(source, mesh, rules)
    want = jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype).name), want_abstract)
    got = jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype).name), params)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        raise ValueError(f"init.from {source!r}: its parameters differ from config.model's "
                         "(another architecture); set config.model as that run's")
    return jax.device_put(params, param_shardings)


def load_trained(workdir: str, step: int | None = None, mesh_shape: dict[str, int] | None = None):
    """A trained run, ready for inference.

    Args:
      workdir: the run's directory (its ``config.json`` and checkpoints).
      step: the checkpoint step; ``None`` for the newest.
      mesh_shape: the mesh to restore onto (default: all devices on ``data``).

    Returns:
      ``(config, model, state)``. For an adapter run ``state.params`` are the base with
      the adapter merged in (inference-ready; ``state.opt_state`` is the adapter's).
    """
    config = read_workdir_config(workdir)
    for axis in shd.MESH_AXES:
        config.mesh[axis] = (mesh_shape or {"data": -1}).get(axis, 1)
    mesh, rules = mesh_and_rules(config)
    model = zoo.build(config.model)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = restore_state(workdir, config, model, mesh, rules, step)
    return config, model, state
