"""The offline default corpus: the running interpreter's standard library as a TFDS dataset.

The ``.py`` files of ``sysconfig.get_paths()['stdlib']``, subpackages included;
``site-packages``, ``__pycache__`` and the test suites (directories named ``test``,
``tests`` or ``idle_test``) left out; for 3.11: 734 files, 11.9 MB. A file belongs to
``validation`` when a SHA-1 of its POSIX path relative to the stdlib root falls in the
lowest 5% (:func:`stdlib_split_of`), else to ``train``. It is built once per data dir by
the local TFDS builder ``routezoo_stdlib`` whose config is keyed by the Python version
(``routezoo_stdlib/py3_11``); features ``text`` and ``path``. The build runs under an
``fcntl`` lock (:func:`file_lock`), so concurrent processes build it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import pathlib
import sys
import sysconfig
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

STDLIB = "stdlib"                    # the data.name of this corpus
VALIDATION_PER_MILLE = 50            # 5% of the stdlib files go to validation
_EXCLUDED_DIRS = frozenset({"site-packages", "__pycache__", "test", "tests", "idle_test"})


@contextlib.contextmanager
def file_lock(path: pathlib.Path) -> Iterator[None]:
    """Exclusive ``fcntl`` lock on ``path`` (created if missing), across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_split_of(relpath: str) -> str:
    """The split of a stdlib file, from a stable hash of its relative POSIX path."""
    digest = hashlib.sha1(relpath.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 1000
    return "validation" if bucket < VALIDATION_PER_MILLE else "train"


def stdlib_files(root: pathlib.Path | None = None) -> dict[str, list[str]]:
    """Sorted relative paths of the stdlib ``.py`` files, per split."""
    root = root or stdlib_root()
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        for filename in filenames:
            if filename.endswith(".py"):
                rel = (pathlib.Path(dirpath) / filename).relative_to(root).as_posix()
                splits[stdlib_split_of(rel)].append(rel)
    return {split: sorted(paths) for split, paths in splits.items()}


def _stdlib_config_name() -> str:
    return f"py{sys.version_info.major}_{sys.version_info.minor}"


class RoutezooStdlib(tfds.core.GeneratorBasedBuilder):
    """The running interpreter's standard-library sources, one example per file."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=_stdlib_config_name())]

    # TFDS derives this from the top-level package, which fails for the `routezoo`
    # namespace package; it is only used to look for (absent) checksum files.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> pathlib.Path:
        return pathlib.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "path": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager
        files = stdlib_files()
        return {split: self._generate_examples(paths) for split, paths in files.items()}

    def _generate_examples(self, paths: list[str]) -> Iterator[tuple[str, dict[str, str]]]:
        root = stdlib_root()
        for rel in paths:
            text = (root / rel).read_bytes().decode("utf-8", errors="replace")
            yield rel, {"text": text, "path": rel}


def stdlib_tfds_name() -> str:
    """The TFDS name of the built dataset, ``routezoo_stdlib/py<major>_<minor>``."""
    return f"{RoutezooStdlib.name}/{_stdlib_config_name()}"


def _stdlib_builder(data_dir: str) -> RoutezooStdlib:
    return RoutezooStdlib(data_dir=data_dir, config=_stdlib_config_name(),
                          file_format="array_record")


def build_stdlib(data_dir: str) -> None:
    """Prepares the stdlib dataset in ``data_dir`` unless it is there already.

    TFDS writes into a temporary directory and renames it when complete, so a prepared
    dataset is never partial; the lock makes concurrent callers build it only once.
    """
    if _stdlib_builder(data_dir).is_prepared():   # fast path, works on read-only dirs
        return
    with file_lock(pathlib.Path(data_dir) / f"{RoutezooStdlib.name}.lock"):
        builder = _stdlib_builder(data_dir)
        if builder.is_prepared():
            return
        tfds.disable_progress_bar()
        with contextlib.redirect_stdout(io.StringIO()):   # TFDS's own banner
            builder.download_and_prepare()
        log.info("built %s in %s: %s", stdlib_tfds_name(), data_dir, ", ".join(
            f"{name} {split.num_examples} files {int(split.num_bytes)} bytes"
            for name, split in sorted(builder.info.splits.items())))

