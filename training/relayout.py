"""``routezoo convert --workdir SRC --layout scanned|unscanned --out DST``: a training
workdir's checkpoint moved between the scanned and the unscanned layer layout, exactly.

A model with ``model.scan_layers=True`` keeps the parameters of its scanned layers under
``layers/block{p}``, stacked ``[R, ...]``; unscanned, the same values sit under
``layer{i}`` (:mod:`routezoo.zoo.stack`). Both layouts compute the same function, so a run
can change layout between two checkpoints: scanned for fast compiles on a deep model,
unscanned for tools or code that address layers one by one (and back).

:func:`convert_layout` restores ``SRC``'s newest intact checkpoint (the whole train
state: ``params``, ``opt_state``, ``model_state``, ``step``, ``rng``) in ``SRC``'s layout,
moves ``params``, ``opt_state`` and ``model_state`` to the other layout with
:func:`~routezoo.zoo.stack.to_scanned` / :func:`~routezoo.zoo.stack.to_unscanned`
(stacking and slicing copy values: bit-exact) and writes a new workdir ``DST``:

- ``DST/config.json``: ``SRC``'s, key for key, with ``model.scan_layers`` set to the
  new layout;
- ``DST/checkpoints/<step>/``: the same step, its ``state`` item an Orbax save of the
  converted state, its ``data`` (the data iterator's position) and ``guard`` (the
  divergence counters) items and Orbax's step metadata copied from ``SRC`` byte for byte,
  and a new ``manifest.json`` (:func:`~routezoo.training.checkpoint.write_manifest`).

``routezoo train --workdir DST`` then resumes where ``SRC`` would have: the same step,
data position, PRNG key and optimizer moments. ``DST`` holds only that one checkpoint;
``SRC``'s older checkpoints, ``metrics.jsonl``, TensorBoard events and plots stay in
``SRC``, which is only read (nothing there is moved or written). ``DST`` is assembled in a
temporary sibling directory and renamed into place once complete, so a conversion that
fails leaves no partial ``DST``.

Refused, each in one line (:class:`RelayoutError`, a ``ValueError``; the CLI exits 2):
``DST`` that exists and is not an empty directory (nothing is overwritten), ``SRC`` that
is not a workdir or has no intact checkpoint, an adapter run (adapter runs always run
unscanned), a model whose stack cannot be scanned, and ``SRC`` already in the requested
layout.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

LAYOUTS = ("scanned", "unscanned")


class RelayoutError(ValueError):
    """A conversion that cannot be done; the message is one line for the user."""


def layout_name(scanned: bool) -> str:
    return LAYOUTS[0] if scanned else LAYOUTS[1]


def check_conversion(src: str, dst: str, scanned: bool):
    """Everything :func:`convert_layout` refuses, checked before anything is read from the
    checkpoints or written; returns ``SRC``'s config.

    Raises:
      RelayoutError: one line naming the problem (or FileNotFoundError / ValueError from
        :func:`~routezoo.training.workdir.read_workdir_config` for a missing or unreadable
        ``SRC/config.json``).
    """
    from routezoo.training.workdir import read_workdir_config
    from routezoo.zoo import stack

    src, dst = os.path.abspath(src), os.path.abspath(dst)
    if os.path.lexists(dst) and not (os.path.isdir(dst) and not os.listdir(dst)):
        what = "is not empty" if os.path.isdir(dst) else "exists and is not a directory"
        raise RelayoutError(f"--out {dst} {what}; convert never overwrites: give a new or empty directory")
    if not os.path.isdir(src):
        raise RelayoutError(f"--workdir {src} is not a directory; give a routezoo training workdir")
    if dst == src or dst.startswith(src + os.sep):
        raise RelayoutError(f"--out {dst} is inside --workdir {src}; give a directory outside it")
    config = read_workdir_config(src)
    method = str(config.adapter.get("method", ""))
    if method:
        raise RelayoutError(
            f"{src} is an adapter run (adapter.method={method!r}): adapter runs always run unscanned "
            "(model.scan_layers=false; adapters address layers one by one), so there is no scanned layout "
            "to convert to or from")
    model = config.model
    as_scanned = stack.with_scan(model, True)
    if not stack.is_scanned(as_scanned):
        layouts = "; ".join(layout.describe() for layout in stack.stack_layouts(as_scanned).values())
        raise RelayoutError(
            f"the model of {src} cannot be scanned (model.name={model.name}, {layouts}: no block repeats at "
            f"least twice, or moe.router={model.moe.router!r} routes the layers from outside the stack); "
            "its checkpoints are unscanned whatever model.scan_layers says, and have no scanned layout")
    if stack.is_scanned(model) == scanned:
        raise RelayoutError(
            f"{src} is already {layout_name(scanned)} (model.scan_layers={bool(model.get('scan_layers', False))}"
            f" in its config.json); nothing to convert: --layout {layout_name(not scanned)} converts it "
            "the other way")
    return config


def _mesh_and_rules(config):
    """The run's own mesh where this host's devices fit it, else all devices on ``data``
    (values do not depend on the mesh; Orbax reshards on restore)."""
    from routezoo.layers import sharding as shd
    from routezoo.training.state import mesh_and_rules
    try:
        return mesh_and_rules(config)
    except ValueError:
        import ml_collections
        config = ml_collections.ConfigDict(config.to_dict())
        for axis in shd.MESH_AXES:
            config.mesh[axis] = -1 if axis == "data" else 1
        return mesh_and_rules(config)


def _abstract_state(config, mesh, rules):
    from routezoo import zoo
    from routezoo.training.adapter_run import optimizer_for
    from routezoo.training.state import state_shardings
    tx, _ = optimizer_for(config, None)
    abstract, shardings, _ = state_shardings(zoo.build(config.model), tx, config, mesh, rules)
    return abstract, shardings


def restore_newest(src: str, config, mesh, rules, log: Callable[[str], None] = print) -> tuple[int, Any]:
    """``(step, TrainState)`` of ``SRC``'s newest intact checkpoint in its own layout,
    placed on ``mesh`` (a corrupt newer step is reported through ``log`` and skipped;
    nothing is moved). Call inside the mesh and rules context."""
    from routezoo.training import checkpoint as ckpt_lib

    abstract, _ = _abstract_state(config, mesh, rules)
    ckpt_dir = os.path.join(os.path.abspath(src), "checkpoints")
    if not ckpt_lib.step_dirs(ckpt_dir):
        raise RelayoutError(f"no checkpoint in {ckpt_dir}: nothing to convert (train first)")
    return ckpt_lib.restore_state_item(ckpt_dir, abstract, verify=bool(config.checkpoint.get("verify", True)),
                                       log=log)


def convert_state(state, model_cfg, scanned: bool):
    """``state`` (a TrainState) with ``params``, ``opt_state`` and ``model_state`` moved to
    the scanned (``scanned``) or unscanned layout of ``model_cfg``'s model; ``step`` and
    ``rng`` as they are."""
    from routezoo.zoo import stack
    move = stack.to_scanned if scanned else stack.to_unscanned
    return state.replace(params=move(state.params, model_cfg), opt_state=move(state.opt_state, model_cfg),
                         model_state=move(state.model_state, model_cfg))


def _signature(tree) -> tuple[Any, list]:
    import jax
    import jax.numpy as jnp
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, [(tuple(x.shape), jnp.dtype(x.dtype).name) for x in leaves]


def _save_state(directory: str, step: int, state) -> str:
    """An Orbax save of ``state`` as the ``state`` item of ``step``, made exactly as a
    training run makes it, in the scratch ``directory``; returns the item's directory."""
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(directory, item_names=("state",), options=ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=False))
    try:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
        manager.wait_until_finished()
    finally:
        manager.close()
    return os.path.join(directory, str(step), "state")


def _dst_config_text(src: str, scanned: bool) -> str:
    """``SRC/config.json`` with ``model.scan_layers`` set; every other key as it is there."""
    with open(os.path.join(src, "config.json")) as f:
        tree = json.load(f)
    tree.setdefault("model", {})["scan_layers"] = bool(scanned)
    return json.dumps(tree, indent=2, sort_keys=True)


def convert_layout(src: str, dst: str, scanned: bool, log: Callable[[str], None] = print) -> int:
    """Writes ``DST``: ``SRC``'s newest intact checkpoint in the scanned (``scanned=True``)
    or unscanned layout, with its config (module docstring).

    Args:
      src: a training workdir (``config.json`` and ``checkpoints/``); only read.
      dst: the new workdir; must not exist, or be an empty directory.
      scanned: the layout to write.
      log: prints a message.

    Returns:
      The step converted (``DST``'s one checkpoint).

    Raises:
      RelayoutError: a refused conversion (module docstring), one line.
      FileNotFoundError, ValueError: ``SRC`` that is not a workdir or has no intact
        checkpoint, one line each.
    """
    import jax
    from flax import linen as nn

    from routezoo.training import checkpoint as ckpt_lib
    from routezoo.zoo import stack

    src, dst = os.path.abspath(src), os.path.abspath(dst)
    config = check_conversion(src, dst, scanned)
    dst_config = type(config)(config.to_dict())
    dst_config.model.scan_layers = bool(scanned)
    mesh, rules = _mesh_and_rules(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step, state = restore_newest(src, config, mesh, rules, log)
        want, shardings = _abstract_state(dst_config, mesh, rules)
        converted = jax.jit(lambda s: convert_state(s, config.model, scanned), out_shardings=shardings)
        try:
            converted = converted(state)
        except (TypeError, ValueError) as e:   # a tree the stack does not describe (would be a bug)
            raise RelayoutError(f"step {step} of {src} does not convert to the {layout_name(scanned)} layout "
                                f"({' '.join(str(e).split())[:200]})") from None
        if _signature(converted) != _signature(want):
            raise RelayoutError(f"step {step} of {src} converted to the {layout_name(scanned)} layout does not "
                                "fit that model's train state; nothing was written")
        del state

        parent = os.path.dirname(dst)
        os.makedirs(parent, exist_ok=True)
        staging = os.path.join(parent, f".{os.path.basename(dst)}.convert-{os.getpid()}")
        try:
            os.makedirs(staging)
            with open(os.path.join(staging, "config.json"), "w") as f:
                f.write(_dst_config_text(src, scanned))
            src_step = os.path.join(src, "checkpoints", str(step))
            dst_step = os.path.join(staging, "checkpoints", str(step))
            # every item but the state, and Orbax's step metadata, byte for byte
            shutil.copytree(src_step, dst_step, ignore=lambda d, names: (
                [n for n in names if n in ("state", ckpt_lib.MANIFEST)] if os.path.samefile(d, src_step) else []))
            scratch = os.path.join(staging, ".state")
            os.replace(_save_state(scratch, step, converted), os.path.join(dst_step, "state"))
            shutil.rmtree(scratch)
            ckpt_lib.write_manifest(dst_step)
            os.replace(staging, dst)   # an empty DST directory is replaced; a non-empty one refuses
        except BaseException as e:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, OSError):
                raise RelayoutError(f"writing {dst} failed: {e.strerror or e}; nothing was left there") from None
            raise
    scan = "; ".join(layout.describe() for layout in stack.stack_layouts(
        stack.with_scan(config.model, True)).values())
    log(f"converted step {step} of {src} from the {layout_name(not scanned)} to the {layout_name(scanned)} "
        f"layout (scanned, its stack is {scan}) in {dst}; resume it with: routezoo train --workdir {dst}")
    return step


__all__ = ["LAYOUTS", "RelayoutError", "check_conversion", "convert_layout", "convert_state", "layout_name",
           "restore_newest"]
