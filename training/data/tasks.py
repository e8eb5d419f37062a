"""Tasks for multi-task adapters (Poly/MHR, ScaLearn, PHATGOOSE, many adapters per batch).

``data.tasks`` ("" = off, the pipelines unchanged) is a comma-separated list of task
names of one of the two built-in corpora:

* ``stdlib``: top-level packages (:func:`task_of_path`: the first component of a file's
  path in a subdirectory, e.g. ``email/message.py`` -> ``email``; top-level modules such as
  ``os.py`` belong to no task; the ``test`` suites are not in the dataset at all).
* ``shakespeare``: genres (:data:`SHAKESPEARE_GENRES`, :func:`task_of_work`): ``comedy``,
  ``history`` and ``tragedy`` as the First Folio (1623) groups the plays, with the four
  late plays modern criticism calls romances (``romance``) and the five poems (``poem``)
  apart. The corpus splits by work, so a genre has validation text only where one of its
  works is held out: comedy, history and tragedy do, romance and poem do not.

A task's id is its position in the list; :func:`available_tasks` lists the names with their file
counts. ``data.task_sampling``: ``uniform`` (equal weights) or ``proportional`` (weights =
the tasks' UTF-8 text bytes in the train split, i.e. each task's share of the untasked
stream). How the pipelines mix and evaluate tasks: :mod:`routezoo.training.data.pipeline`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from routezoo.training.data.shakespeare import SHAKESPEARE, shakespeare_tfds_name
from routezoo.training.data.sources import get_source, resolve_data_dir, text_of
from routezoo.training.data.stdlib import STDLIB, stdlib_tfds_name

TASK_SAMPLING = ("uniform", "proportional")


def task_of_path(path: str) -> str | None:
    """The task of a stdlib file: its top-level package, the first component of a path in
    a subdirectory (``email/mime/text.py`` -> ``email``); None for a top-level module
    (``os.py``) and for a directory that is no package name (``config-3.11-x86_64-linux-gnu``)."""
    head, sep, _ = path.partition("/")
    return head if sep and head.isidentifier() else None


# The genre of each of the 42 works of data.name='shakespeare' (names as the corpus's `work`
# feature spells them). Comedies, histories and tragedies follow the First Folio's three
# sections (Heminges and Condell 1623; Troilus and Cressida, printed between the histories
# and the tragedies, as the tragedy its Folio title calls it); Pericles (not in the Folio),
# Cymbeline, The Winter's Tale and The Tempest are the romances (Dowden 1875); the poems are
# the works outside the Folio's plays.
SHAKESPEARE_GENRES: dict[str, tuple[str, ...]] = {
    "comedy": ("alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors", "loves_labours_lost",
               "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
               "much_ado_about_nothing", "taming_of_the_shrew", "twelfth_night", "two_gentlemen_of_verona"),
    "history": ("henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
                "henry_vi_part_3", "henry_viii", "john", "richard_ii", "richard_iii"),
    "tragedy": ("antony_and_cleopatra", "coriolanus", "hamlet", "julius_caesar", "lear", "macbeth", "othello",
                "romeo_and_juliet", "timon_of_athens", "tragedy_of_titus_andronicus", "troilus_and_cressida"),
    "romance": ("cymbeline", "pericles", "tempest", "winters_tale"),
    "poem": ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets"),
}
_GENRE_OF_WORK = {work: genre for genre, works in SHAKESPEARE_GENRES.items() for work in works}


def task_of_work(work: str) -> str | None:
    """The task (genre) of a Shakespeare work (``hamlet`` -> ``tragedy``); None for a work
    :data:`SHAKESPEARE_GENRES` does not name."""
    return _GENRE_OF_WORK.get(work)


# data.name -> (what its tasks are, TFDS name, the record field a task is read from,
# field value -> task or None)
_TASKED = {STDLIB: ("top-level stdlib packages", stdlib_tfds_name, "path", task_of_path),
           SHAKESPEARE: ("Shakespeare genres", shakespeare_tfds_name, "work", task_of_work)}


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a split: its name, its id (position in ``data.tasks``), the indices of
    its records in the split's source and its mixing weight."""

    name: str
    id: int
    indices: tuple[int, ...]
    weight: float = 1.0


# (data dir, dataset, split) -> (task of each record or None, UTF-8 text bytes) of the split
_SPLIT_FILES: dict[tuple[str, str, str], tuple[tuple[str | None, ...], tuple[int, ...]]] = {}


def _split_files(data_cfg: Any, split: str) -> tuple[tuple[str | None, ...], tuple[int, ...]]:
    """The task and text size of each record of a split, in source order (read once)."""
    _, tfds_name, field, task_of = _TASKED[data_cfg.name]
    key = (resolve_data_dir(data_cfg), tfds_name(), split)
    if key not in _SPLIT_FILES:
        source = get_source(data_cfg, split)
        records = [source[i] for i in range(len(source))]
        _SPLIT_FILES[key] = (
            tuple(task_of(text_of(r, field)) for r in records),
            tuple(len(text_of(r, "text").encode("utf-8")) for r in records))
    return _SPLIT_FILES[key]


def check_task_corpus(data_cfg: Any) -> None:
    """``ValueError`` in one line unless ``data.name`` is a corpus with tasks (reads nothing)."""
    if data_cfg.name not in _TASKED:
        allowed = " or ".join(f"{name!r} ({what})" for name, (what, *_) in _TASKED.items())
        raise ValueError(f"data.tasks needs data.name={allowed}, got data.name={data_cfg.name!r}")


def _task_records(tasks: Sequence[str | None]) -> dict[str, list[int]]:
    """Record indices per task name, in record order."""
    out: dict[str, list[int]] = {}
    for i, name in enumerate(tasks):
        if name is not None:
            out.setdefault(name, []).append(i)
    return out


def available_tasks(data_cfg: Any, split: str | None = None) -> dict[str, int]:
    """``{task name: number of files}`` in ``split`` (default ``data.train_split``), sorted
    by name: the names ``data.tasks`` accepts (stdlib packages or Shakespeare genres; a
    genre counts works)."""
    check_task_corpus(data_cfg)
    tasks, _ = _split_files(data_cfg, split or data_cfg.train_split)
    return {name: len(idx) for name, idx in sorted(_task_records(tasks).items())}


def task_names(data_cfg: Any) -> list[str]:
    """The checked names of ``data.tasks`` (task id = position); [] when it is empty."""
    spec = data_cfg.tasks.strip()
    if not spec:
        return []
    check_task_corpus(data_cfg)
    if data_cfg.task_sampling not in TASK_SAMPLING:
        raise ValueError(f"unknown data.task_sampling {data_cfg.task_sampling!r}; allowed: "
                         f"{', '.join(TASK_SAMPLING)}")
    names = [n.strip() for n in spec.split(",")]
    available = available_tasks(data_cfg)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))} in data.tasks; "
                         f"allowed ({_TASKED[data_cfg.name][0]}): {', '.join(sorted(available))}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"data.tasks names {', '.join(repeated)} more than once; "
                         "each task once (its id is its position)")
    return names


def split_tasks(data_cfg: Any, split: str, names: Sequence[str] | None = None) -> list[Task]:
    """The :class:`Task` of every name of ``data.tasks`` (or of ``names``, which must be in
    it) in ``split``, with ``data.task_sampling``'s weights; a task without records in the
    split has no indices."""
    all_names = task_names(data_cfg)
    of_record, sizes = _split_files(data_cfg, split)
    records = _task_records(of_record)
    tasks = []
    for name in names if names is not None else all_names:
        if name not in all_names:
            raise ValueError(f"task {name!r} is not in data.tasks; allowed: "
                             f"{', '.join(all_names) or '(data.tasks is empty)'}")
        indices = tuple(records.get(name, ()))
        weight = (float(sum(sizes[i] for i in indices)) or 1.0
                  if data_cfg.task_sampling == "proportional" else 1.0)
        tasks.append(Task(name, all_names.index(name), indices, weight))
    return tasks


def check_tasks(config: Any) -> None:
    """``data.tasks`` checked against the built dataset before a run starts: known names
    (:func:`task_names`) and, when the run evaluates, at least one task with validation
    files. ``ValueError`` in one line."""
    d = config.data
    if not task_names(d):
        return
    if config.train.eval_steps > 0 and not eval_task_names(d):
        raise ValueError(f"no task of data.tasks ({d.tasks}) has files in the {d.eval_split!r} split, so the "
                         f"run cannot be evaluated; tasks with validation files: "
                         f"{', '.join(available_tasks(d, d.eval_split))}")


def eval_task_names(data_cfg: Any) -> list[str]:
    """The names of ``data.tasks`` with documents in ``data.eval_split`` (those that
    ``eval_batches(config, task=NAME)`` accepts), in task-id order."""
    return [t.name for t in split_tasks(data_cfg, data_cfg.eval_split) if t.indices]

