"""Checkpoints through Orbax ``CheckpointManager``: the train state and the data iterator.

- Saved every ``checkpoint.every`` steps, at the end and on SIGTERM/SIGINT; the last
  ``checkpoint.keep`` are kept. Saves are asynchronous where ``checkpoint.async_save``.
- Restore takes an abstract state whose leaves carry the *current* shardings, so a
  checkpoint written on one mesh restores onto any other (Orbax reshards).
- Integrity: once a step is finalised, process 0 writes ``manifest.json`` into its
  directory (size and CRC-32 of every file). Restoring checks the newest step against
  its manifest first; a missing, truncated or altered file is reported by step and file,
  the step is moved aside to ``checkpoints/corrupt/<step>`` (nothing is deleted) and the
  next newest complete step is tried. A partially written step (killed mid-save) is an
  Orbax temporary directory and is never listed as a step.
- A save never overwrites a newer checkpoint: a step at or below the newest existing one
  is skipped with a message.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

MANIFEST = "manifest.json"


class CorruptCheckpoint(Exception):
    pass


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


def write_manifest(step_dir: str) -> None:
    entries = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)),
                     "crc32": _crc32(os.path.join(step_dir, rel))} for rel in _files(step_dir)}
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": entries}, f)
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


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
        size = os.path.getsize(full)
        if size != want["size"]:
            raise CorruptCheckpoint(f"{full}: size {size} != {want['size']} bytes written")
        if _crc32(full) != want["crc32"]:
            raise CorruptCheckpoint(f"{full}: checksum mismatch")


class Checkpointer:
    """Saves and restores ``{'state': train state, 'data': data iterator}`` by step."""

    def __init__(self, directory: str, *, keep: int, async_save: bool, verify: bool,
                 log: Callable[[str], None] = print):
        self.directory = os.path.abspath(directory)
        self.verify = verify
        self.log = log
        self._pending_manifest: int | None = None
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save),
            item_names=("state", "data"))

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _finish_manifest(self) -> None:
        step, self._pending_manifest = self._pending_manifest, None
        if step is None or not self.verify or jax.process_index() != 0:
            return
        if os.path.isdir(self.step_dir(step)):
            write_manifest(self.step_dir(step))

    def save(self, step: int, state: Any, data_save_args: Any, *, force: bool = False) -> bool:
        latest = self.latest_step()
        if latest is not None and step <= latest:
            self.log(f"checkpoint: not saving step {step}: step {latest} is already saved "
                     "(an older state never overwrites a newer checkpoint)")
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=data_save_args)
        saved = self.manager.save(step, args=args, force=force)
        # Orbax finishes the previous async save before starting a new one.
        self._finish_manifest()
        if saved:
            self._pending_manifest = step
        return saved

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._finish_manifest()

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            dest = os.path.join(self.directory, "corrupt", str(step))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if os.path.exists(dest):
                shutil.rmtree(dest)
            os.replace(self.step_dir(step), dest)
        from jax.experimental import multihost_utils
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"quarantine-{step}")
        self.manager.reload()

    def restore_latest(self, abstract_state: Any, data_restore_args: Any) -> tuple[int, Any, Any] | None:
        """(step, state, data) from the newest complete checkpoint, or None if there is none.

        A step that fails its manifest (or, without a manifest, fails to load) is moved
        aside and the next older one is tried. A step that passes its manifest but does not
        load is a mismatch with the current config: that raises ``ValueError`` and nothing
        is moved.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            verified = self.verify and os.path.exists(os.path.join(self.step_dir(step), MANIFEST))
            try:
                if self.verify:
                    verify_manifest(self.step_dir(step))
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=data_restore_args))
            except Exception as e:  # noqa: BLE001 - classified below
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if verified and not isinstance(e, CorruptCheckpoint):
                    raise ValueError(f"checkpoint step {step} in {self.directory} does not match this "
                                     f"config ({msg}); use another --workdir or the config it was saved with") from e
                self.log(f"checkpoint: step {step} is corrupt or incomplete: {msg}; moved to "
                         f"{os.path.join(self.directory, 'corrupt', str(step))}; trying an older step")
                self._quarantine(step)
                continue
            return step, restored["state"], restored["data"]
        return None

    def close(self) -> None:
        self.wait()
        self.manager.close()
