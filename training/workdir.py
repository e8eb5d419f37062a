"""A run's workdir: the lock a training run holds on it, and a finished (or running)
run read back: its config and its trained weights.

``WORKDIR/config.json`` is the resolved config a run wrote (:func:`read_workdir_config`);
``WORKDIR/checkpoints`` its train checkpoints. :func:`load_trained` gives ``(config,
model, state)`` for inference; :func:`restore_params` another run's parameters on a
given mesh (``init.from_workdir``). For an adapter run the parameters returned are its
base with the adapter merged in. Reading falls back from a corrupt newest checkpoint to
the newest intact one (:func:`routezoo.training.checkpoint.restore_newest_intact`) and
never moves or writes anything.

:class:`WorkdirLock`: one training run at a time per workdir, through ``fcntl.flock`` on
``WORKDIR/run.lock`` (docs/runs.md). The operating system releases the lock when the
process ends, however it ends, so a crashed run never leaves it stuck.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from routezoo import zoo
from routezoo.layers import adapters as adapter_lib
from routezoo.training import checkpoint as ckpt_lib
from routezoo.layers import sharding as shd
from routezoo.layers.adapters import hooks as adapter_hooks
from routezoo.training.adapter_run import (adapter_config, adapter_sources, adapter_state_shardings, load_base,
                                           optimizer_for)
from routezoo.training.state import TrainState, mesh_and_rules, state_shardings


LOCK_FILE = "run.lock"


class WorkdirBusy(ckpt_lib.RunError):
    """Another process holds the workdir's lock."""


class WorkdirLock:
    """The lock of a training run on its workdir, held from before the run's first write
    until it returns (a context manager).

    ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``WORKDIR/run.lock``: a second run is refused
    with :class:`WorkdirBusy` (naming the holder's pid, host and start time, which the
    holder writes into the file) before it writes anything. The lock belongs to the open
    file, so the operating system drops it when the holder exits or is killed. On a
    filesystem without locks (some network or FUSE mounts) a warning is logged and the run
    goes on unprotected. Only process 0 of a multi-process run takes the lock; the others
    learn the outcome from it. The file stays after the run (removing it would race with a
    process that has it open), except in a workdir this run created and left empty (it
    failed before writing anything): that directory is removed again.

    Args:
      workdir: the run's directory (created if absent).
      enabled: take the lock here (process 0).
      log: prints a message.
    """

    def __init__(self, workdir: str, *, enabled: bool = True, log: Callable[[str], None] = print):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self.enabled = enabled
        self.log = log
        self.created = False
        self._fd: int | None = None

    def acquire(self) -> None:
        busy = None
        if self.enabled:
            try:
                self._acquire()
            except WorkdirBusy as e:
                busy = e
        if jax.process_count() > 1:   # every process stops when process 0 could not lock
            import numpy as np
            from jax.experimental import multihost_utils
            ok = multihost_utils.process_allgather(np.int32(busy is None))
            if not np.all(ok):
                raise busy or WorkdirBusy(f"workdir {self.workdir} is in use by another run")
        elif busy is not None:
            raise busy

    def _acquire(self) -> None:
        import fcntl
        if not os.path.isdir(self.workdir):
            os.makedirs(self.workdir)
            self.created = True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 400).decode("utf-8", "replace").strip()
            os.close(fd)
            raise WorkdirBusy(f"workdir {self.workdir} is in use by another run ({holder or 'holder unknown'}); "
                              "wait for it to finish, stop it, or use another --workdir") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            self.log(f"warning: the filesystem of {self.workdir} does not support locks "
                     f"({os.strerror(e.errno)}); this run does not keep others out of the workdir")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{datetime.datetime.now().isoformat(timespec='seconds')}\n".encode())
        self._fd = fd

    def release(self, *, failed: bool = False) -> None:
        """Drops the lock; after a failure, removes a workdir this run created and left empty."""
        if self._fd is None:
            return
        if failed and self.created and os.listdir(self.workdir) == [LOCK_FILE]:
            os.remove(self.path)
            os.rmdir(self.workdir)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(failed=exc_type is not None)


def read_workdir_config(workdir: str):
    """The resolved config a run wrote to ``workdir/config.json`` (on top of the defaults).

    Raises:
      FileNotFoundError: no ``config.json``.
      ValueError: a ``config.json`` that is not JSON or not a routezoo config (one line
        naming the file).
    """
    from routezoo.configs import base
    path = os.path.join(os.path.abspath(workdir), "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: not a routezoo training workdir")
    try:
        with open(path) as f:
            tree = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); not a usable routezoo workdir config") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{path} holds a JSON {type(tree).__name__}, not a routezoo config")
    config = base.get_config()
    try:
        config.update_from_flattened_dict(_flatten(tree))
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a routezoo config ({' '.join(str(e).split())[:200]})") from None
    return config


def config_differences(workdir: str, config, prefixes=("model.", "adapter.", "optimizer.name")) -> list[str]:
    """``'KEY: OLD in WORKDIR/config.json, NEW here'`` for the keys under ``prefixes`` that
    differ between the workdir's config and ``config`` (empty without a readable config.json)."""
    try:
        saved = read_workdir_config(workdir)
    except (OSError, ValueError):
        return []
    a, b = _flatten(saved.to_dict()), _flatten(config.to_dict())
    path = os.path.join(os.path.abspath(workdir), "config.json")
    return [f"{k}: {a.get(k)!r} in {path}, {b.get(k)!r} here" for k in sorted(set(a) | set(b))
            if k.startswith(prefixes) and a.get(k) != b.get(k)]


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def restore_state(workdir: str, config, model: nn.Module, mesh, rules, step: int | None = None,
                  log: Callable[[str], None] = print) -> TrainState:
    """The TrainState of a run's newest intact (or given) checkpoint, placed on ``mesh``.

    For an adapter run ``params`` are its base with the adapter merged in. Call it inside
    the mesh and rules context. A newest step that fails its manifest or does not load is
    reported through ``log`` and the next older one is used; nothing is moved.

    Args:
      workdir: the run's directory.
      config: its config (:func:`read_workdir_config`).
      model: its Flax module.
      mesh: the device mesh to place the state on.
      rules: logical-axis rules.
      step: the checkpoint step; ``None`` for the newest intact one.
      log: prints a message.

    Returns:
      The restored TrainState.

    Raises:
      FileNotFoundError: no checkpoint.
      ValueError: no intact checkpoint, or one that does not fit ``config`` (one line).
    """
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
    _, state = ckpt_lib.restore_state_item(os.path.join(workdir, "checkpoints"), abstract, step=step,
                                           verify=bool(config.checkpoint.get("verify", True)), log=log)
    if adapter is not None:   # an adapter run: its base with the adapter merged in
        base = load_base(model, config, setup, mesh, rules)
        state = state.replace(params=jax.jit(adapter.merge, out_shardings=setup.base_shardings)(
            base, state.params))
    return state


def restore_params(workdir: str, mesh, rules, step: int | None = None,
                   log: Callable[[str], None] = print) -> tuple[Any, Any]:
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
    return config, restore_state(workdir, config, zoo.build(config.model), mesh, rules, step, log).params


def workdir_params(source: str, want_abstract, param_shardings, mesh, rules, model_cfg=None) -> Any:
    """``init.from``: another run's trained parameters, checked against the shapes and
    dtypes of ``want_abstract`` and placed with ``param_shardings``. With ``model_cfg``
    (the receiving model's config) they are moved into its layer layout first, so a run
    scanned one way starts from a run scanned the other (``model.scan_layers``)."""
    src_config, params = restore_params(source, mesh, rules)
    if model_cfg is not None and "moe" in model_cfg and \
            str(src_config.model.moe.get("expert_map", "")) != str(model_cfg.moe.get("expert_map", "")):
        # equal shapes, other meaning: the map says which stacked expert serves which router output
        raise ValueError(f"init.from {source!r}: its model.moe.expert_map={src_config.model.moe.expert_map!r} "
                         f"differs from config.model.moe.expert_map={model_cfg.moe.get('expert_map', '')!r}; "
                         "set the source's map (its config.json)")
    if model_cfg is not None:
        from routezoo.zoo import stack
        params = stack.to_layout(stack.to_unscanned(params, src_config.model), model_cfg)
    want = jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype).name), want_abstract)
    got = jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype).name), params)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        raise ValueError(f"init.from {source!r}: its parameters differ from config.model's "
                         "(another architecture); set config.model as that run's")
    return jax.device_put(params, param_shardings)


def load_trained(workdir: str, step: int | None = None, mesh_shape: dict[str, int] | None = None,
                 log: Callable[[str], None] = print):
    """A trained run, ready for inference.

    Args:
      workdir: the run's directory (its ``config.json`` and checkpoints).
      step: the checkpoint step; ``None`` for the newest intact one (a corrupt newer
        step is reported through ``log`` and skipped).
      mesh_shape: the mesh to restore onto (default: all devices on ``data``).
      log: prints a message.

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
        state = restore_state(workdir, config, model, mesh, rules, step, log)
    return config, model, state


def write_step0_workdir(out: str, config, params, model_state, rng, *, record_name: str, record: dict[str, Any],
                        data_from: str | None = None, config_tree: dict[str, Any] | None = None,
                        tag: str = "new") -> None:
    """Writes a new workdir ``out`` whose one checkpoint is a train state at step 0.

    What ``out`` gets, assembled in a temporary sibling directory and renamed into place
    once complete (an empty ``out`` directory is replaced; nothing is left behind on a
    failure):

    - ``config.json``: ``config_tree`` if given (a JSON-able dict), else ``config``'s;
    - ``checkpoints/0/``: ``state/`` with ``params`` and ``model_state`` (host or device
      trees in the layout ``config.model`` runs with), a fresh optimizer state of
      ``config`` and ``rng``; the data iterator's position copied byte for byte from the
      checkpoint step directory ``data_from`` (with Orbax's step metadata), or, without
      it, a fresh iterator of ``config.data`` at its start; a manifest;
    - ``record_name``: ``record`` as JSON (what made the workdir, from what).

    ``routezoo train`` (resuming at step 0), ``analyze``, ``convert --to-hf``,
    ``load_trained`` and ``init.from`` read it as any run.

    Raises:
      OSError: the write failed (the staging directory is removed first).
    """
    import shutil

    import ml_collections
    import orbax.checkpoint as ocp

    from routezoo.training.state import TrainState

    mesh_config = ml_collections.ConfigDict(config.to_dict())
    for axis in shd.MESH_AXES:
        mesh_config.mesh[axis] = -1 if axis == "data" else 1
    mesh, rules = mesh_and_rules(mesh_config)
    tx = optimizer_for(config, None)[0]
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(out)}.{tag}-{os.getpid()}")
    try:
        os.makedirs(staging)
        with open(os.path.join(staging, "config.json"), "w") as f:
            if config_tree is not None:
                json.dump(config_tree, f, indent=2, sort_keys=True)
            else:
                f.write(config.to_json_best_effort(indent=2, sort_keys=True))
        dst_step = os.path.join(staging, "checkpoints", "0")
        scratch = os.path.join(staging, ".state")
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            _, shardings, _ = state_shardings(zoo.build(config.model), tx, config, mesh, rules)
            state = jax.jit(lambda p, ms, r: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                                        opt_state=tx.init(p), model_state=ms, rng=r),
                            out_shardings=shardings)(params, model_state, jnp.asarray(rng, jnp.uint32))
            items = {"state": ocp.args.StandardSave(state)}
            if data_from is not None:
                # the data-iterator position and Orbax's step metadata, byte for byte; a new state
                shutil.copytree(data_from, dst_step, ignore=lambda d, names: (
                    [n for n in names if n in ("state", "guard", ckpt_lib.MANIFEST)]
                    if os.path.samefile(d, data_from) else []))
            else:
                from routezoo.training import data as data_lib
                data_lib.ensure_dataset(config.data)
                items["data"] = data_lib.iterator_save_args(data_lib.make_train_iterator(config))
            manager = ocp.CheckpointManager(scratch, item_names=tuple(items), options=ocp.CheckpointManagerOptions(
                create=True, enable_async_checkpointing=False))
            try:
                manager.save(0, args=ocp.args.Composite(**items), force=True)
                manager.wait_until_finished()
            finally:
                manager.close()
        if data_from is not None:
            os.replace(os.path.join(scratch, "0", "state"), os.path.join(dst_step, "state"))
        else:
            os.makedirs(os.path.dirname(dst_step), exist_ok=True)
            os.replace(os.path.join(scratch, "0"), dst_step)
        shutil.rmtree(scratch)
        ckpt_lib.write_manifest(dst_step)
        with open(os.path.join(staging, record_name), "w") as f:
            json.dump(record, f, indent=2)
        os.replace(staging, out)   # an empty ``out`` directory is replaced
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
