"""The training and evaluation pipelines: checkpointable grain iterators per process.

Training pipeline (:func:`make_train_iterator`), per process, with
``data.process_sharding='documents'``::

    source[process_index::process_count]      disjoint documents per process
      -> shuffle(seed)  -> repeat()           reshuffled every epoch (grain MapDataset)
      -> encode + EOS                         int32 token ids per document
      -> PackIterDataset(seq_len + 1)         concatenate documents, cut rows, no padding
      -> batch(batch_size // process_count)   {'inputs', 'targets', 'weights'}

each process packs its own documents, so the processes' rows are disjoint and together
cover each epoch of the split once. With ``'rows'`` (the default) every process builds
the same global stream of batches and keeps its slice of rows, so the data a run sees
(and the iterator state) does not depend on the number of processes; that costs each
process the tokenizing and packing of the whole stream, cheap for text next to a
training step. The returned grain ``DatasetIterator`` is checkpointable
(``get_state``/``set_state``, JSON-able dicts); :func:`iterator_save_args` and
:func:`iterator_restore_args` give the Orbax args (grain's ``CheckpointSave`` /
``CheckpointRestore``, one ``process_<i>-of-<n>.json`` per process) for a composite
``CheckpointManager``. ``data.num_workers > 0`` adds grain's ``mp_prefetch`` (worker
processes; grain needs absl flags parsed, as under ``absl.app.run``); it changes the
order of the data, so a saved iterator state only restores with the same ``num_workers``.

``data.name='files'`` (:mod:`routezoo.training.data.files`) streams the documents instead
of indexing them: :class:`~routezoo.training.data.files.FileDocuments` shards files (or
records) over processes, shuffles file order per epoch and documents within windows of
``data.shuffle_buffer``, and repeats; the rest of the pipeline is the same. Packing is
``data.packing`` (:mod:`routezoo.training.data.packing`: ``masked`` rows carry
``segment_ids`` and ``positions``; ``eos`` joins documents with EOS only), and
``data.format='chat'`` encodes records with :class:`~routezoo.training.data.chat.ChatEncoder`
(loss on completions only) and packs examples whole.

Evaluation (:func:`eval_batches`): the eval split, unshuffled, packed the same way; the
last row and the last batch are padded with pad ids (weight 0), and every process yields
exactly ``train.eval_steps`` batches (all-pad batches once its share runs out) so that
multi-host evaluation steps stay in lockstep.

With ``data.tasks`` (:mod:`routezoo.training.data.tasks`) the training pipeline becomes,
per task ``t``::

    task t's documents[process_index::process_count] -> shuffle -> repeat -> encode + EOS
      -> PackIterDataset(seq_len + 1)                  rows of task t only, tagged id t
    IterDataset.mix(rows of all tasks, weights)        grain's deterministic interleaving
      -> batch                                         {..., 'task_id': int32[B]}

so no row mixes tasks. grain's mix is not a random draw: it interleaves the tasks in
fixed proportions (uniform over T tasks: rows cycle 0, 1, ..., T-1), so every window of
rows holds the tasks in (almost exactly) their proportions. The iterator state holds
every task's packer and the mix position, so it restores exactly like the untasked one.
Eval: each task's eval documents packed on their own (last row padded), the tasks' rows
interleaved round-robin until all run out (tasks without eval documents are left out);
``eval_batches(config, task=NAME)`` gives the batches of one task of ``data.tasks`` (for
per-task eval losses).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from routezoo.training.data.chat import ChatEncoder
from routezoo.training.data.packing import (PACKINGS, EncodeDocument, MakeBatch, MakeTaskBatch, PackIterDataset,
                                            Subset, TagTask, TakeRows)
from routezoo.training.data.sources import DocumentStream, get_source, text_key_of
from routezoo.training.data.tasks import Task, available_tasks, eval_task_names, split_tasks, task_names
from routezoo.training.data.tokenizers import Tokenizer, get_tokenizer

log = logging.getLogger(__name__)

_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=256)
# Per task (one reader per task): a row holds far less than a document, so a few do.
_TASK_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)


def _per_process_batch(batch_size: int, process_count: int) -> int:
    if batch_size % process_count:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by "
                         f"process_count={process_count}")
    return batch_size // process_count


def _process_shard(source: Sequence[Any], process_index: int,
                   process_count: int) -> grain.MapDataset:
    return grain.MapDataset.source(source)[process_index::process_count]


def _check_packing(packing: str) -> None:
    if packing not in PACKINGS:
        raise ValueError(f"unknown data.packing {packing!r}; allowed: {', '.join(PACKINGS)}")


def _encoder(tokenizer: Tokenizer, text_key: str, encoder: Any) -> Any:
    return EncodeDocument(tokenizer, text_key) if encoder is None else encoder


def _packer(docs: grain.IterDataset, seq_len: int, tokenizer: Tokenizer, packing: str, encoder: Any,
            pad_final: bool = False) -> PackIterDataset:
    return PackIterDataset(docs, seq_len + 1, pad_id=tokenizer.pad_id, pad_final=pad_final,
                           segments=packing == "masked", whole=bool(getattr(encoder, "whole_examples", False)))


def document_encoder(data_cfg: Any, tokenizer: Tokenizer) -> Any:
    """``data.format``'s map from a record to a document: ``text``: ids + EOS
    (:class:`EncodeDocument`); ``chat``: ``{'ids', 'mask'}`` (:class:`ChatEncoder`)."""
    if str(data_cfg.get("format", "text")) == "chat":
        return ChatEncoder(tokenizer, prompt_key=data_cfg.prompt_key, completion_key=data_cfg.completion_key,
                           messages_key=data_cfg.messages_key)
    return EncodeDocument(tokenizer, text_key_of(data_cfg))


PROCESS_SHARDING = ("rows", "documents")


def _check_sharding(sharding: str) -> None:
    if sharding not in PROCESS_SHARDING:
        raise ValueError(f"unknown data.process_sharding {sharding!r}; allowed: {', '.join(PROCESS_SHARDING)}")


def train_dataset(source: Sequence[Any], tokenizer: Tokenizer, *, text_key: str,
                  seq_len: int, batch_size: int, seed: int, shuffle: bool = True,
                  process_index: int = 0, process_count: int = 1,
                  num_workers: int = 0, process_sharding: str = "documents",
                  tasks: Sequence[Task] | None = None, packing: str = "masked",
                  encoder: Any = None) -> grain.IterDataset:
    """The endless training dataset of one process; ``batch_size`` is per process.

    ``source``: a random-access sequence of records, or a
    :class:`~routezoo.training.data.sources.DocumentStream` (``data.name='files'``).
    ``packing``: ``masked`` or ``eos`` (:mod:`~routezoo.training.data.packing`);
    ``encoder``: record -> document (default: :class:`EncodeDocument` of ``text_key``); an
    encoder whose ``whole_examples`` is true (:class:`ChatEncoder`) has its examples packed whole.

    ``process_sharding='documents'``: this process packs its own share of documents.
    ``'rows'``: every process packs the same global stream of ``batch_size *
    process_count`` rows per batch and keeps its slice, so the global batches do not
    depend on the number of processes. ``tasks``: each task's records packed on their
    own, the tasks' rows mixed by their weights, batches with ``'task_id'`` (module
    docstring); None or empty: the untasked pipeline.
    """
    _check_sharding(process_sharding)
    _check_packing(packing)
    encoder = _encoder(tokenizer, text_key, encoder)
    by_rows = process_sharding == "rows" and process_count > 1
    if by_rows:
        return train_dataset(source, tokenizer, text_key=text_key, seq_len=seq_len,
                             batch_size=batch_size * process_count, seed=seed, shuffle=shuffle,
                             num_workers=num_workers, tasks=tasks, packing=packing, encoder=encoder,
                             ).map(TakeRows(process_index, process_count))
    if tasks:
        if isinstance(source, DocumentStream):
            raise ValueError("data.tasks needs a random-access source (stdlib, shakespeare); data.name='files' streams")
        rows = _task_train_rows(source, tokenizer, tasks, seq_len=seq_len, seed=seed, shuffle=shuffle,
                                process_index=process_index, process_count=process_count,
                                packing=packing, encoder=encoder)
        batch_fn = MakeTaskBatch(batch_size, tokenizer.pad_id)
    elif isinstance(source, DocumentStream):
        docs = source.documents(process_index=process_index, process_count=process_count, seed=seed,
                                shuffle=shuffle, repeat=True)
        rows = _packer(docs.map(encoder), seq_len, tokenizer, packing, encoder)
        batch_fn = MakeBatch(batch_size, tokenizer.pad_id)
    else:
        rows = _packed_rows(_process_shard(source, process_index, process_count), tokenizer,
                            seq_len=seq_len, seed=seed, shuffle=shuffle,
                            read_options=_READ_OPTIONS, packing=packing, encoder=encoder,
                            empty=f"process {process_index} of {process_count} gets no documents "
                                  f"(the split has {len(source)})")
        batch_fn = MakeBatch(batch_size, tokenizer.pad_id)
    ds = rows.batch(batch_size, drop_remainder=True, batch_fn=batch_fn)
    if num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return ds


def _task_train_rows(source: Sequence[Any], tokenizer: Tokenizer, tasks: Sequence[Task], *,
                     seq_len: int, seed: int, shuffle: bool, process_index: int, process_count: int,
                     packing: str, encoder: Any) -> grain.IterDataset:
    """Endless rows ``{'tokens', 'task_id'}``: each task's share of documents shuffled,
    repeated and packed on its own, the tasks mixed by ``IterDataset.mix``."""
    parts = []
    for task in tasks:
        rows = _packed_rows(_process_shard(Subset(source, task.indices), process_index, process_count),
                            tokenizer, seq_len=seq_len, seed=seed, shuffle=shuffle,
                            read_options=_TASK_READ_OPTIONS, packing=packing, encoder=encoder,
                            empty=f"process {process_index} of {process_count} gets no documents of task "
                                  f"{task.name!r} (it has {len(task.indices)} in the split)")
        parts.append(rows.map(TagTask(task.id)))
    return grain.IterDataset.mix(parts, [task.weight for task in tasks])


def _packed_rows(docs: grain.MapDataset, tokenizer: Tokenizer, *, seq_len: int, seed: int,
                 shuffle: bool, read_options: Any, empty: str, packing: str, encoder: Any) -> grain.IterDataset:
    """Endless rows of ``seq_len + 1`` tokens packed from ``docs`` (a process's share),
    shuffled (each epoch anew) and repeated; ``ValueError(empty)`` if there are none."""
    if len(docs) == 0:
        raise ValueError(empty)
    if shuffle:
        docs = docs.shuffle(seed=seed)
    docs = docs.repeat().map(encoder)
    return _packer(docs.to_iter_dataset(read_options), seq_len, tokenizer, packing, encoder)


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    return process_index, process_count


def make_train_iterator(config: Any, *, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
    """The checkpointable training iterator of this process (see the module docstring)."""
    process_index, process_count = _process_info(process_index, process_count)
    d = config.data
    tasks = split_tasks(d, d.train_split) if task_names(d) else None
    tokenizer = get_tokenizer(d)
    ds = train_dataset(
        get_source(d, d.train_split), tokenizer, text_key=text_key_of(d),
        seq_len=d.seq_len, batch_size=_per_process_batch(config.train.batch_size,
                                                         process_count),
        seed=config.seed, shuffle=d.shuffle, process_index=process_index,
        process_count=process_count, num_workers=d.num_workers,
        process_sharding=d.process_sharding, tasks=tasks, packing=str(d.get("packing", "masked")),
        encoder=document_encoder(d, tokenizer))
    return iter(ds)


class EvalBatches:
    """Re-iterable: every pass yields the same ``num_batches`` batches.

    ``process_sharding`` as in :func:`train_dataset`: ``rows`` packs the global eval stream
    on every process and keeps this process's rows of each batch.
    """

    def __init__(self, source: Sequence[Any] | DocumentStream, tokenizer: Tokenizer, *, text_key: str,
                 seq_len: int, batch_size: int, num_batches: int, process_index: int = 0,
                 process_count: int = 1, process_sharding: str = "documents", packing: str = "masked",
                 encoder: Any = None) -> None:
        _check_sharding(process_sharding)
        _check_packing(packing)
        self._take = None
        if process_sharding == "rows" and process_count > 1:
            self._take = TakeRows(process_index, process_count)
            batch_size, process_index, process_count = batch_size * process_count, 0, 1
        self._encoder = _encoder(tokenizer, text_key, encoder)
        if isinstance(source, DocumentStream):
            self._docs = source.documents(process_index=process_index, process_count=process_count, seed=0,
                                          shuffle=False, repeat=False).map(self._encoder)
        else:
            self._docs = _process_shard(source, process_index, process_count).map(self._encoder)
        self._tokenizer = tokenizer
        self._packing = packing
        self._seq_len = seq_len
        self._batch_size = batch_size
        self._num_batches = max(num_batches, 0)
        self._pad_id = tokenizer.pad_id

    def __len__(self) -> int:
        return self._num_batches

    def _rows(self, docs: Any) -> PackIterDataset:
        if isinstance(docs, grain.MapDataset):
            docs = docs.to_iter_dataset(_READ_OPTIONS)
        return _packer(docs, self._seq_len, self._tokenizer, self._packing, self._encoder, pad_final=True)

    def _empty_row(self) -> np.ndarray | dict[str, np.ndarray]:
        tokens = np.full(self._seq_len + 1, self._pad_id, np.int32)
        if self._packing != "masked":
            return tokens
        zeros = np.zeros(self._seq_len + 1, np.int32)
        return {"tokens": tokens, "segment_ids": zeros, "positions": zeros}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        make_batch = MakeBatch(self._batch_size, self._pad_id)
        batches = iter(self._rows(self._docs).batch(self._batch_size, batch_fn=make_batch))
        empty = make_batch([self._empty_row()])
        for _ in range(self._num_batches):
            batch = next(batches, empty)
            yield self._take(batch) if self._take else batch


class TaskEvalBatches(EvalBatches):
    """Re-iterable eval batches with ``'task_id'``: each task's documents packed on their
    own (last row padded), the tasks' rows interleaved round-robin until all run out."""

    def __init__(self, source: Sequence[Any], tokenizer: Tokenizer, *, text_key: str,
                 seq_len: int, batch_size: int, num_batches: int, tasks: Sequence[Task],
                 process_index: int = 0, process_count: int = 1,
                 process_sharding: str = "documents", packing: str = "masked", encoder: Any = None) -> None:
        super().__init__(source, tokenizer, text_key=text_key, seq_len=seq_len,
                         batch_size=batch_size, num_batches=num_batches,
                         process_index=process_index, process_count=process_count,
                         process_sharding=process_sharding, packing=packing, encoder=encoder)
        if self._take is not None:   # rows: the global stream on every process
            process_index, process_count = 0, 1
        self._task_docs = [
            (task.id, _process_shard(Subset(source, task.indices), process_index,
                                     process_count).map(self._encoder))
            for task in tasks]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        make_batch = MakeTaskBatch(self._batch_size, self._pad_id)
        rows = _round_robin([
            iter(_packer(docs.to_iter_dataset(_TASK_READ_OPTIONS), self._seq_len, self._tokenizer, self._packing,
                         self._encoder, pad_final=True).map(TagTask(task_id)))
            for task_id, docs in self._task_docs if len(docs)])
        empty = make_batch([TagTask(0)(self._empty_row())])
        for _ in range(self._num_batches):
            chunk = [row for _, row in zip(range(self._batch_size), rows)]
            batch = make_batch(chunk) if chunk else empty
            yield self._take(batch) if self._take else batch


def _round_robin(iterators: Sequence[Iterator[Any]]) -> Iterator[Any]:
    """One item of each iterator in turn, skipping those that ran out, until all have."""
    active = list(iterators)
    while active:
        still = []
        for it in active:
            for item in it:
                yield item
                still.append(it)
                break
        active = still


_WARNED_NO_EVAL_DOCS: set[tuple[str, ...]] = set()


def eval_batches(config: Any, *, task: str | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> EvalBatches:
    """``train.eval_steps`` deterministic batches of the eval split for this process.

    With ``data.tasks``: rows of every task (with ``'task_id'``; tasks without eval
    documents left out, with a warning); ``task=NAME`` (one of ``data.tasks``): rows of
    that task only, for its own eval loss.
    """
    process_index, process_count = _process_info(process_index, process_count)
    d = config.data
    tokenizer = get_tokenizer(d)
    common = dict(text_key=text_key_of(d), seq_len=d.seq_len,
                  batch_size=_per_process_batch(config.train.batch_size, process_count),
                  num_batches=config.train.eval_steps, process_index=process_index,
                  process_count=process_count, process_sharding=d.process_sharding,
                  packing=str(d.get("packing", "masked")), encoder=document_encoder(d, tokenizer))
    if not task_names(d):
        if task is not None:
            raise ValueError(f"eval_batches(task={task!r}) needs data.tasks, which is empty")
        return EvalBatches(get_source(d, d.eval_split), tokenizer, **common)
    tasks = split_tasks(d, d.eval_split, None if task is None else [task])
    with_docs = [t for t in tasks if t.indices]
    if not with_docs:
        have = eval_task_names(d)
        what = f"task {task!r} has no" if task else f"no task of data.tasks ({d.tasks}) has"
        raise ValueError(f"{what} documents in the {d.eval_split!r} split, so it cannot be evaluated; "
                         f"tasks of data.tasks with some: {', '.join(have) or '(none)'}; tasks with "
                         f"validation files: {', '.join(available_tasks(d, d.eval_split))}")
    missing = tuple(t.name for t in tasks if not t.indices)
    if missing and missing not in _WARNED_NO_EVAL_DOCS:
        _WARNED_NO_EVAL_DOCS.add(missing)
        log.warning("tasks %s have no documents in the %r split: left out of evaluation",
                    ", ".join(missing), d.eval_split)
    return TaskEvalBatches(get_source(d, d.eval_split), tokenizer, tasks=with_docs, **common)


# -------------------------------------------------------------------------- orbax


def iterator_save_args(it: grain.DatasetIterator) -> Any:
    """Orbax args that save ``it`` (each process writes ``process_<i>-of-<n>.json``)."""
    return grain.checkpoint.CheckpointSave(item=it)


def iterator_restore_args(it: grain.DatasetIterator) -> Any:
    """Orbax args that restore this process's saved state into ``it`` (in place)."""
    return grain.checkpoint.CheckpointRestore(item=it)

