"""Where the text comes from: the data dir, the dataset registry and TFDS sources.

Every split is read through ``tfds.data_source`` (array_record files, random access, no
TensorFlow):

* ``stdlib`` (the default, offline): :mod:`routezoo.training.data.stdlib`, built on
  first use by :func:`ensure_dataset`.
* ``shakespeare``: :mod:`routezoo.training.data.shakespeare`, built on first use from a
  local copy of its archive (refused in one line without it).
* ``files``: the user's own files (``data.files``), streamed rather than indexed: a
  :class:`DocumentStream` (:mod:`routezoo.training.data.files`).
* any other ``data.name``: a TFDS dataset already prepared in array_record format in
  the data dir (``tfds build NAME --file_format=array_record``); ``data.text_key`` holds
  the text. Nothing is downloaded here.

The data dir is ``data.data_dir``, else ``$ROUTEZOO_DATA_DIR``, else
``~/tensorflow_datasets``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from routezoo.training.data.shakespeare import SHAKESPEARE, build_shakespeare, shakespeare_tfds_name
from routezoo.training.data.stdlib import STDLIB, build_stdlib, stdlib_tfds_name


FILES = "files"   # data.name of the user's own files
# The corpora routezoo builds itself: data.name -> (build(data_dir), TFDS name()).
BUILT_IN = {STDLIB: (build_stdlib, stdlib_tfds_name), SHAKESPEARE: (build_shakespeare, shakespeare_tfds_name)}


class DocumentStream:
    """One split of ``data.name='files'``: documents read in a stream, not by index.

    :meth:`documents` makes the per-process grain dataset
    (:class:`~routezoo.training.data.files.FileDocuments`): texts, or whole records when
    ``text_key`` is None (chat data). ``split``: ``all`` (every record of ``files``), or
    ``train`` / ``eval`` of the hash split by ``eval_fraction``.
    """

    def __init__(self, files: Sequence[str], *, text_key: str | None, txt_unit: str, split: str,
                 eval_fraction: float, shuffle_buffer: int) -> None:
        self.files, self.text_key, self.txt_unit = list(files), text_key, txt_unit
        self.split, self.eval_fraction, self.shuffle_buffer = split, float(eval_fraction), int(shuffle_buffer)

    def documents(self, *, process_index: int, process_count: int, seed: int, shuffle: bool,
                  repeat: bool) -> Any:
        from routezoo.training.data.files import FileDocuments
        return FileDocuments(self.files, text_key=self.text_key, txt_unit=self.txt_unit, split=self.split,
                             eval_fraction=self.eval_fraction, seed=seed, shuffle=shuffle,
                             shuffle_buffer=self.shuffle_buffer, repeat=repeat,
                             process_index=process_index, process_count=process_count)

    def __repr__(self) -> str:
        return f"DocumentStream({len(self.files)} files, split={self.split!r})"


def files_split(data_cfg: Any, split: str) -> DocumentStream:
    """The :class:`DocumentStream` of ``data.train_split`` or ``data.eval_split`` of
    ``data.name='files'``: ``data.eval_files`` for validation when set, else the hash
    split of ``data.files`` by ``data.eval_fraction``."""
    from routezoo.training.data.files import expand_files, record_key
    d = data_cfg
    if split not in (d.train_split, d.eval_split):
        raise ValueError(f"data.name='files' has the splits {d.train_split!r} (train) and {d.eval_split!r} "
                         f"(validation); got {split!r}")
    common = dict(text_key=record_key(d), txt_unit=str(d.txt_unit), eval_fraction=float(d.eval_fraction),
                  shuffle_buffer=int(d.shuffle_buffer))
    if d.eval_files:
        if split == d.train_split:
            return DocumentStream(expand_files(d.files, "data.files"), split="all", **common)
        return DocumentStream(expand_files(d.eval_files, "data.eval_files"), split="all", **common)
    return DocumentStream(expand_files(d.files, "data.files"),
                          split="train" if split == d.train_split else "eval", **common)


def resolve_data_dir(data_cfg: Any) -> str:
    """``data.data_dir``, else ``$ROUTEZOO_DATA_DIR``, else ``~/tensorflow_datasets``."""
    data_dir = data_cfg.data_dir or os.environ.get("ROUTEZOO_DATA_DIR", "")
    return os.path.expanduser(data_dir or "~/tensorflow_datasets")


def _dataset_base_name(name: str) -> str:
    return name.split("/")[0].split(":")[0]


_TEXT_CATEGORIES = ("text", "translate", "summarization", "question_answering",
                    "text_simplification")


def _registered_builders() -> set[str]:
    """Registered TFDS builder names, community datasets excluded (listing them needs TF).

    TFDS imports its dataset categories in one loop that stops at the first missing
    optional dependency (e.g. h5py), which can leave c4 or wikipedia unregistered; the
    text categories are imported one by one here so they are always listed.
    """
    for category in _TEXT_CATEGORIES:
        with contextlib.suppress(Exception):
            importlib.import_module(f"tensorflow_datasets.{category}")
    return set(tfds.list_builders(with_community_datasets=False))


def known_dataset(name: str, data_dir: str | None = None) -> bool:
    """A built-in corpus (:data:`BUILT_IN`), 'files', a registered TFDS builder, or a
    dataset directory in ``data_dir``."""
    if name in BUILT_IN or name == FILES:
        return True
    base = _dataset_base_name(name)
    if not base:
        return False
    if base in _registered_builders():
        return True
    return bool(data_dir) and (pathlib.Path(data_dir) / base).is_dir()


def _unknown_dataset_error(name: str) -> ValueError:
    return ValueError(
        f"data.name={name!r} is not a known dataset; allowed: 'stdlib', 'shakespeare', 'files' (data.files) or a TFDS "
        "dataset name prepared in array_record format in data.data_dir")


def ensure_dataset(data_cfg: Any) -> str:
    """Builds (stdlib, shakespeare) or checks (named, files) the dataset; returns the data dir."""
    data_dir = resolve_data_dir(data_cfg)
    if data_cfg.name in BUILT_IN:
        BUILT_IN[data_cfg.name][0](data_dir)
    elif data_cfg.name == FILES:
        from routezoo.training.data.files import check_files
        check_files(data_cfg)
    elif not known_dataset(data_cfg.name, data_dir):
        raise _unknown_dataset_error(data_cfg.name)
    return data_dir


def get_source(data_cfg: Any, split: str) -> Sequence[Any] | DocumentStream:
    """The random-access TFDS data source of one split (records are feature dicts), or for
    ``data.name='files'`` its :class:`DocumentStream` (the files are checked once, by
    :func:`ensure_dataset`, before a run; not again at every evaluation)."""
    if data_cfg.name == FILES:
        return files_split(data_cfg, split)
    data_dir = ensure_dataset(data_cfg)
    name = tfds_name_of(data_cfg)
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # noqa: BLE001 - TFDS raises many types; report one line
        raise ValueError(f"cannot read split {split!r} of dataset {name!r}: "
                         f"{_why_unreadable(name, data_dir, e)}") from e


def _why_unreadable(name: str, data_dir: str, error: Exception) -> str:
    """One line: why ``tfds.data_source`` failed and how to prepare the dataset."""
    build = f"`tfds build {name} --file_format=array_record --data_dir={data_dir}`"
    with contextlib.suppress(Exception):
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            return f"it is not prepared in {data_dir}; prepare it with {build}"
        file_format = builder.info.file_format
        if file_format != tfds.core.FileFormat.ARRAY_RECORD:
            return (f"it is prepared as {file_format.value} in {data_dir}, random access "
                    f"needs array_record; rebuild it with {build}")
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"{first_line} (data dir {data_dir})"


def tfds_name_of(data_cfg: Any) -> str:
    """The TFDS name ``data.name`` reads: a built-in corpus's builder, else ``data.name``."""
    return BUILT_IN[data_cfg.name][1]() if data_cfg.name in BUILT_IN else data_cfg.name


def text_key_of(data_cfg: Any) -> str:
    """The record field that holds the text: ``text`` for a built-in corpus, else
    ``data.text_key``."""
    return "text" if data_cfg.name in BUILT_IN else data_cfg.text_key


def text_of(record: Any, text_key: str) -> str:
    """The text of a record (a feature dict, or the text itself) as ``str``."""
    value = record[text_key] if isinstance(record, Mapping) else record
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value

