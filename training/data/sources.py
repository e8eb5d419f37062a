"""Where the text comes from: the data dir, the dataset registry and TFDS sources.

Every split is read through ``tfds.data_source`` (array_record files, random access, no
TensorFlow):

* ``stdlib`` (the default, offline): :mod:`routezoo.training.data.stdlib`, built on
  first use by :func:`ensure_dataset`.
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

from routezoo.training.data.stdlib import STDLIB, build_stdlib, stdlib_tfds_name


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
    """'stdlib', a registered TFDS builder, or a dataset directory in ``data_dir``."""
    if name == STDLIB:
        return True
    base = _dataset_base_name(name)
    if not base:
        return False
    if base in _registered_builders():
        return True
    return bool(data_dir) and (pathlib.Path(data_dir) / base).is_dir()


def _unknown_dataset_error(name: str) -> ValueError:
    return ValueError(
        f"data.name={name!r} is not a known dataset; allowed: 'stdlib' or a TFDS dataset "
        "name prepared in array_record format in data.data_dir")


def ensure_dataset(data_cfg: Any) -> str:
    """Builds (stdlib) or checks (named) the dataset; returns the data dir."""
    data_dir = resolve_data_dir(data_cfg)
    if data_cfg.name == STDLIB:
        build_stdlib(data_dir)
    elif not known_dataset(data_cfg.name, data_dir):
        raise _unknown_dataset_error(data_cfg.name)
    return data_dir


def get_source(data_cfg: Any, split: str) -> Sequence[Any]:
    """The random-access TFDS data source of one split (records are feature dicts)."""
    data_dir = ensure_dataset(data_cfg)
    name = stdlib_tfds_name() if data_cfg.name == STDLIB else data_cfg.name
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


def text_key_of(data_cfg: Any) -> str:
    """The record field that holds the text: ``text`` for stdlib, else ``data.text_key``."""
    return "text" if data_cfg.name == STDLIB else data_cfg.text_key


def text_of(record: Any, text_key: str) -> str:
    """The text of a record (a feature dict, or the text itself) as ``str``."""
    value = record[text_key] if isinstance(record, Mapping) else record
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value

