"""Checkpoints through Orbax ``CheckpointManager``: the train state, the data iterator and
the divergence guard's counters (``guard``, JSON).

- Saved every ``checkpoint.every`` steps, at the end and on SIGTERM/SIGINT; the last
  ``checkpoint.keep`` are kept. Saves are asynchronous where ``checkpoint.async_save``.
- Restore takes an abstract state whose leaves carry the *current* shardings, so a
  checkpoint written on one mesh restores onto any other (Orbax reshards).
- Integrity: process 0 writes ``manifest.json`` (size and CRC-32 of every file) into a
  step's temporary directory just before Orbax renames it into place, so a committed
  step always carries its manifest, even when the run crashes right after. Restoring
  checks the newest step against its manifest first; a missing, truncated or altered
  file is reported by step and file and the next newest step is tried. Once an intact
  step is found, the corrupt newer ones are moved aside to ``checkpoints/corrupt/<step>``
  (``<step>.2``, ``<step>.3``, ... when that name is taken; nothing is deleted). When no
  step is intact, ``checkpoint.on_corrupt`` decides: ``stop`` (:class:`NoIntactCheckpoint`,
  nothing moved) or ``restart`` (all moved aside, training starts from step 0). A
  partially written step (killed mid-save) is an Orbax temporary directory and is never
  listed as a step.
- A failed write (a full disk, an I/O error; in the background for an asynchronous save)
  is noticed at the next save or at the end at the latest: its temporary directory is
  removed, the older steps are left as they are (Orbax deletes old steps only after a
  save commits) and :class:`CheckpointWriteFailed` stops the run in one line.
- A save never overwrites a newer checkpoint: a step at or below the newest existing one
  is skipped with a message.
- :func:`restore_newest_intact` is the read-only fallback for commands that read a
  workdir (``convert --to-hf``, ``analyze``, ``init.from_workdir``): the newest step that
  passes its manifest and loads, nothing moved.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shutil
import zlib
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

MANIFEST = "manifest.json"
TMP_SUFFIX = ".orbax-checkpoint-tmp"   # Orbax's temporary step directory: STEP + TMP_SUFFIX
ON_CORRUPT = ("stop", "restart")        # checkpoint.on_corrupt
ITEMS = ("state", "data", "guard")      # the items of a train checkpoint step


class RunError(Exception):
    """A run that cannot go on. The message is one line for the user; ``exit_code`` is
    what ``routezoo train`` exits with (docs/runs.md lists them)."""

    exit_code = 2


class CorruptCheckpoint(Exception):
    """A step whose files do not match its manifest (the message names the file)."""


class CheckpointMismatch(RunError, ValueError):
    """An intact checkpoint that does not load into this config's state (another model)."""


class NoIntactCheckpoint(RunError):
    """Every kept step is corrupt and ``checkpoint.on_corrupt=stop``."""


class CheckpointWriteFailed(RunError):
    """A checkpoint could not be written (full disk, I/O error)."""

    exit_code = 4


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(e).__name__


class _QuietOrbaxTracebacks(logging.Filter):
    """Drops Orbax's logged tracebacks of a failed save or restore: the run reports the
    failure itself, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and "orbax" in (record.pathname or ""))


_QUIET = _QuietOrbaxTracebacks()


def _quiet_orbax_logs() -> None:
    logger = logging.getLogger("absl")
    if _QUIET not in logger.filters:
        logger.addFilter(_QUIET)


def step_dirs(directory: str) -> list[int]:
    """The committed step numbers in ``directory`` (its all-digit subdirectories), as on disk."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _key_path(keys) -> tuple[str, ...]:
    out = []
    for k in keys:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def state_mismatch(step_dir: str, abstract_state: Any) -> str | None:
    """The first difference between the tree a step saved (paths and shapes, from its
    metadata) and ``abstract_state``'s, or ``None`` when they fit. Checked before a restore,
    so that a checkpoint of another model is refused without Orbax starting (and failing
    on) the reads. Raises whatever reading the metadata raises (a damaged step)."""
    from etils import epath
    handler = ocp.StandardCheckpointHandler()
    try:
        meta = handler.metadata(epath.Path(step_dir) / "state")
    finally:
        handler.close()
    tree = getattr(meta, "tree", meta)
    saved = {_key_path(p): tuple(getattr(v, "shape", ()) or ())
             for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    want = {_key_path(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    for key in sorted(set(saved) | set(want)):
        name = "/".join(key)
        if key not in want:
            return f"{name} is in the checkpoint but not in this config's state"
        if key not in saved:
            return f"{name} of this config's state is not in the checkpoint"
        if saved[key] != want[key]:
            return f"{name} has shape {list(saved[key])} in the checkpoint, {list(want[key])} here"
    return None


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(step_dir: str) -> list[str]:
    out = []
    for root, _, files in os.walk(step_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


STEP_METADATA = "_CHECKPOINT_METADATA"   # Orbax rewrites it when the step commits (the commit time)


def write_manifest(step_dir: str) -> None:
    """Writes ``manifest.json``: size and CRC-32 of every file of ``step_dir``, except
    Orbax's step metadata (:data:`STEP_METADATA`), which Orbax rewrites while committing
    the step, after the manifest: that one must be a complete JSON object."""
    entries = {rel: ({"json": True} if rel == STEP_METADATA else
                     {"size": os.path.getsize(os.path.join(step_dir, rel)),
                      "crc32": _crc32(os.path.join(step_dir, rel))}) for rel in _files(step_dir)}
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump({"files": entries}, f)
        os.replace(tmp, os.path.join(step_dir, MANIFEST))
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def verify_manifest(step_dir: str) -> None:
    """Raises :class:`CorruptCheckpoint` naming the first bad file; no manifest = unchecked."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            entries = json.load(f)["files"]
    except (ValueError, KeyError) as e:
        raise CorruptCheckpoint(f"{path}: unreadable manifest ({e})") from None
    for rel, want in sorted(entries.items()):
        full = os.path.join(step_dir, rel)
        if not os.path.exists(full):
            raise CorruptCheckpoint(f"{full}: file missing")
        if want.get("json"):
            try:
                with open(full) as f:
                    ok = isinstance(json.load(f), dict)
            except (ValueError, UnicodeDecodeError):
                ok = False
            if not ok:
                raise CorruptCheckpoint(f"{full}: not a complete JSON object")
            continue
        size = os.path.getsize(full)
        if size != want["size"]:
            raise CorruptCheckpoint(f"{full}: size {size} != {want['size']} bytes written")
        if _crc32(full) != want["crc32"]:
            raise CorruptCheckpoint(f"{full}: checksum mismatch")


class Checkpointer:
    """Saves and restores ``{'state', 'data'[, 'guard']}`` by step.

    Args:
      directory: the checkpoint directory (created at the first save, not before).
      keep: steps kept (``checkpoint.keep``).
      async_save: write in the background (``checkpoint.async_save``).
      verify: write and check manifests (``checkpoint.verify``).
      log: prints a message (process 0).
      on_corrupt: ``'stop'`` or ``'restart'`` when no kept step is intact (``checkpoint.on_corrupt``).
    """

    def __init__(self, directory: str, *, keep: int, async_save: bool, verify: bool,
                 log: Callable[[str], None] = print, on_corrupt: str = "stop"):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"unknown checkpoint.on_corrupt {on_corrupt!r}; allowed: {', '.join(ON_CORRUPT)}")
        self.directory = os.path.abspath(directory)
        self.verify = verify
        self.log = log
        self.on_corrupt = on_corrupt
        self.async_save = async_save
        self.restored_extra: dict[str, Any] | None = None   # the 'guard' item of the restored step
        self._in_flight: int | None = None   # the step whose save may still be running
        _quiet_orbax_logs()
        async_options = None
        if async_save and verify:
            async_options = ocp.AsyncOptions(post_finalization_callback=self._on_commit)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=False, enable_async_checkpointing=async_save,
                async_options=async_options),
            item_names=ITEMS)

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _on_commit(self) -> None:
        """Orbax calls this in its save thread once every file of the step is written, just
        before the temporary directory is renamed into place: the manifest goes in with it."""
        step = self._in_flight
        if step is None or jax.process_index() != 0:
            return
        tmp = self.step_dir(step) + TMP_SUFFIX
        write_manifest(tmp if os.path.isdir(tmp) else self.step_dir(step))

    def _failed(self, step: int | None, e: BaseException) -> None:
        """Removes what a failed save left behind and raises :class:`CheckpointWriteFailed`."""
        self._in_flight = None
        if jax.process_index() == 0 and step is not None:
            for tmp in glob.glob(glob.escape(self.step_dir(step)) + TMP_SUFFIX + "*"):
                shutil.rmtree(tmp, ignore_errors=True)
        on_disk = [s for s in step_dirs(self.directory) if s != step]
        msg = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else _first_line(e)
        hint = "free some space" if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) \
            else "fix the cause"
        kept = (f"the older checkpoints are intact (newest: step {max(on_disk)})" if on_disk
                else "no older checkpoint exists")
        raise CheckpointWriteFailed(
            f"checkpoint: writing step {step} to {self.directory} failed: {msg}; its partial files were "
            f"removed and {kept}; {hint} and run again to resume") from None

    def _wait_in_flight(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - any failure of the background write
            self._failed(self._in_flight, e)
        self._in_flight = None

    def save(self, step: int, state: Any, data_save_args: Any, *, force: bool = False,
             extra: dict[str, Any] | None = None) -> bool:
        """Saves ``state`` and the data iterator (and ``extra``, JSON, as the ``guard``
        item) at ``step``; first waits for the previous save, raising
        :class:`CheckpointWriteFailed` if that one failed."""
        latest = self.latest_step()
        if latest is not None and step <= latest:
            self.log(f"checkpoint: not saving step {step}: step {latest} is already saved "
                     "(an older state never overwrites a newer checkpoint)")
            return False
        self._wait_in_flight()
        items = {"state": ocp.args.StandardSave(state)}
        if data_save_args is not None:
            items["data"] = data_save_args
        if extra is not None:
            items["guard"] = ocp.args.JsonSave(extra)
        self._in_flight = step
        try:
            os.makedirs(self.directory, exist_ok=True)
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except OSError as e:   # the synchronous part of the write (directories, metadata)
            self._failed(step, e)
        if not saved:
            self._in_flight = None
        elif not self.async_save:   # committed already: its manifest now
            self._in_flight = None
            if self.verify and jax.process_index() == 0 and os.path.isdir(self.step_dir(step)):
                try:
                    write_manifest(self.step_dir(step))
                except OSError as e:
                    raise CheckpointWriteFailed(
                        f"checkpoint: writing the manifest of step {step} in {self.directory} failed: "
                        f"{os.strerror(e.errno) if e.errno else _first_line(e)}; the step itself is complete "
                        "(it restores unverified); fix the cause and run again to resume") from None
        return saved

    def wait(self) -> None:
        """Waits for the running save; :class:`CheckpointWriteFailed` if it failed."""
        self._wait_in_flight()

    def _quarantine(self, step: int) -> str:
        dest = os.path.join(self.directory, "corrupt", str(step))
        n = 1
        while os.path.exists(dest):   # a step quarantined before keeps its copy
            n += 1
            dest = os.path.join(self.directory, "corrupt", f"{step}.{n}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(self.step_dir(step), dest)
        from jax.experimental import multihost_utils
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"quarantine-{step}")
        return dest

    def restore_latest(self, abstract_state: Any, data_restore_args: Any) -> tuple[int, Any, Any] | None:
        """(step, state, data) from the newest intact checkpoint, or None if there is none.

        A step that fails its manifest (or, without a manifest, fails to load) is corrupt;
        the next older one is tried. Once one restores, the corrupt newer steps are moved
        aside. When none is intact: ``on_corrupt='stop'`` raises :class:`NoIntactCheckpoint`
        (nothing moved), ``'restart'`` moves them all aside and returns None. A step that
        passes its manifest but does not load is a mismatch with the current config:
        :class:`CheckpointMismatch`, nothing moved. The restored step's ``guard`` item (if
        it has one) is left in :attr:`restored_extra`.
        """
        self.restored_extra = None
        corrupt: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            step_dir = self.step_dir(step)
            verified = self.verify and os.path.exists(os.path.join(step_dir, MANIFEST))
            items = {"state": ocp.args.StandardRestore(abstract_state), "data": data_restore_args}
            if os.path.isdir(os.path.join(step_dir, "guard")):
                items["guard"] = ocp.args.JsonRestore()
            try:
                if self.verify:
                    verify_manifest(step_dir)
                mismatch = state_mismatch(step_dir, abstract_state)
                if mismatch:
                    raise CheckpointMismatch(
                        f"checkpoint step {step} in {self.directory} does not match this config ({mismatch}); "
                        "use the config it was saved with, or another --workdir")
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except CheckpointMismatch:
                raise
            except Exception as e:  # noqa: BLE001 - classified below
                msg = _first_line(e)
                if verified and not isinstance(e, CorruptCheckpoint):
                    raise CheckpointMismatch(
                        f"checkpoint step {step} in {self.directory} does not match this config ({msg}); "
                        "use the config it was saved with, or another --workdir") from e
                self.log(f"checkpoint: step {step} is corrupt or incomplete: {msg}; trying an older step")
                corrupt.append((step, msg))
                continue
            for bad, _ in corrupt:
                self.log(f"checkpoint: moved corrupt step {bad} to {self._quarantine(bad)}")
            self.manager.reload()
            self.restored_extra = dict(restored["guard"]) if "guard" in items else None
            return step, restored["state"], restored["data"]
        if not corrupt:
            return None
        steps = ", ".join(str(s) for s, _ in corrupt)
        if self.on_corrupt == "restart":
            for bad, _ in corrupt:
                self.log(f"checkpoint: moved corrupt step {bad} to {self._quarantine(bad)}")
            self.manager.reload()
            self.log(f"checkpoint: no intact checkpoint left (steps {steps} were corrupt); starting over "
                     "from step 0 (checkpoint.on_corrupt=restart)")
            return None
        raise NoIntactCheckpoint(
            f"every checkpoint in {self.directory} is corrupt or incomplete (step {corrupt[0][0]}: "
            f"{corrupt[0][1]}; steps {steps}); nothing was moved; set checkpoint.on_corrupt=restart to move "
            "them to checkpoints/corrupt/ and start over from step 0")

    def close(self) -> None:
        """Waits for the running save (:class:`CheckpointWriteFailed` if it failed) and closes."""
        try:
            self._wait_in_flight()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - the failure was reported by _wait_in_flight
                pass

    def abandon(self) -> None:
        """:meth:`close` on a run that is already stopping for another reason: a failed
        write is logged in one line instead of raised."""
        try:
            self.close()
        except CheckpointWriteFailed as e:
            self.log(str(e))


def restore_newest_intact(directory: str, restore: Callable[[int], Any], *, step: int | None = None,
                          verify: bool = True, abstract_state: Any = None,
                          log: Callable[[str], None] = print) -> tuple[int, Any]:
    """``(step, restore(step))`` for the newest step of ``directory`` that passes its manifest
    and restores; read-only (nothing is moved). A corrupt step is reported through ``log``
    and the next older one tried.

    Args:
      directory: a checkpoint directory.
      restore: ``step -> restored items``.
      step: this step only (no fallback).
      verify: check manifests.
      abstract_state: the state ``restore`` fills in; a step whose saved tree differs
        (:func:`state_mismatch`) is refused before any read.
      log: prints a message.

    Raises:
      FileNotFoundError: no step at all (or not ``step``).
      ValueError: no intact step, or an intact one that does not load (another config);
        one line each.
    """
    steps = step_dirs(directory)
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint step {step} in {directory} (steps: "
                                    f"{', '.join(map(str, steps)) or 'none'})")
        steps = [step]
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    _quiet_orbax_logs()
    problems = []
    for s in sorted(steps, reverse=True):
        step_dir = os.path.join(directory, str(s))
        verified = verify and os.path.exists(os.path.join(step_dir, MANIFEST))
        try:
            if verify:
                verify_manifest(step_dir)
            mismatch = state_mismatch(step_dir, abstract_state) if abstract_state is not None else None
        except Exception as e:  # noqa: BLE001 - a damaged step
            mismatch, problem = None, _first_line(e)
        else:
            problem = None
            if mismatch:
                raise ValueError(f"checkpoint step {s} in {directory} does not fit the model of its "
                                 f"config.json ({mismatch})")
            try:
                return s, restore(s)
            except Exception as e:  # noqa: BLE001 - classified below
                if verified:
                    raise ValueError(f"checkpoint step {s} in {directory} does not load into the model of its "
                                     f"config.json ({_first_line(e)})") from None
                problem = _first_line(e)
        problems.append((s, problem))
        if step is None:
            log(f"checkpoint: step {s} in {directory} is corrupt or incomplete ({problem}); trying an older step")
    steps_text = ", ".join(str(s) for s, _ in problems)
    raise ValueError(f"no intact checkpoint in {directory}: step {problems[0][0]} is corrupt or incomplete "
                     f"({problems[0][1]})" + (f"; steps {steps_text} all are" if len(problems) > 1 else ""))


def restore_state_item(directory: str, abstract_state: Any, *, step: int | None = None, verify: bool = True,
                       log: Callable[[str], None] = print) -> tuple[int, Any]:
    """``(step, state)``: the ``state`` item of ``directory``'s newest intact step (or of
    ``step``) restored into ``abstract_state`` (shapes, dtypes, shardings); read-only, as
    :func:`restore_newest_intact`, which says what it raises."""
    manager = ocp.CheckpointManager(directory, item_names=ITEMS, options=ocp.CheckpointManagerOptions(create=False))
    try:
        return restore_newest_intact(
            directory, lambda s: manager.restore(s, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"],
            step=step, verify=verify, abstract_state=abstract_state, log=log)
    finally:
        manager.close()
