"""Documents to rows to batches: picklable grain maps and the packing iterator.

A document becomes its token ids followed by EOS (:class:`EncodeDocument`);
:class:`PackIterDataset` concatenates documents and cuts rows of ``seq_len + 1`` tokens
(no padding, except the last row of an evaluation); :class:`MakeBatch` turns rows into
``inputs = row[:-1]``, ``targets = row[1:]``, ``weights = (targets != pad)``. Rows carry
no segment ids: documents are separated by EOS only. The packer's state (the document
with unemitted tokens and the offset in it) makes the pipeline checkpointable.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from routezoo.training.data.sources import text_of
from routezoo.training.data.tokenizers import PAD_ID, Tokenizer


class EncodeDocument:
    """record -> int32 token ids of its text followed by EOS (picklable grain map)."""

    def __init__(self, tokenizer: Tokenizer, text_key: str) -> None:
        self.tokenizer = tokenizer
        self.text_key = text_key

    def __call__(self, record: Any) -> np.ndarray:
        ids = self.tokenizer.encode(text_of(record, self.text_key))
        return np.append(ids, np.int32(self.tokenizer.eos_id)).astype(np.int32)


class PackIterDataset(grain.IterDataset):
    """Concatenates 1-D token arrays in order and cuts them into rows of ``length``.

    Every token appears in exactly one row, in order. With ``pad_final`` the last,
    partial row is padded with ``pad_id``; otherwise it is dropped.
    """

    def __init__(self, parent: grain.IterDataset, length: int, *, pad_id: int = PAD_ID,
                 pad_final: bool = False) -> None:
        super().__init__(parent)
        self._length = length
        self._pad_id = pad_id
        self._pad_final = pad_final

    def __iter__(self) -> PackIterator:
        return PackIterator(self._parent.__iter__(), self._length, self._pad_id,
                            self._pad_final)

    def __str__(self) -> str:
        return f"PackIterDataset(length={self._length})"


class PackIterator(grain.DatasetIterator):
    """State: the parent's state before the oldest document with unemitted tokens, and
    how many of its tokens were emitted already; restoring re-reads that document."""

    def __init__(self, parent: grain.DatasetIterator, length: int, pad_id: int,
                 pad_final: bool) -> None:
        super().__init__(parent)
        self._length = length
        self._pad_id = pad_id
        self._pad_final = pad_final
        # [parent state before the document, its tokens, tokens already emitted]
        self._docs: collections.deque[list[Any]] = collections.deque()
        self._available = 0

    def _read_document(self, offset: int = 0) -> bool:
        state = self._parent.get_state()
        try:
            tokens = next(self._parent)
        except StopIteration:
            return False
        if len(tokens) > offset:
            self._docs.append([state, tokens, offset])
            self._available += len(tokens) - offset
        return True

    def __next__(self) -> np.ndarray:
        while self._available < self._length:
            if not self._read_document():
                if self._available == 0 or not self._pad_final:
                    raise StopIteration
                break
        pieces, needed = [], min(self._length, self._available)
        while needed:
            doc = self._docs[0]
            take = min(needed, len(doc[1]) - doc[2])
            pieces.append(doc[1][doc[2]: doc[2] + take])
            doc[2] += take
            needed -= take
            if doc[2] == len(doc[1]):
                self._docs.popleft()
        row = np.concatenate(pieces).astype(np.int32)
        self._available -= len(row)
        return np.pad(row, (0, self._length - len(row)), constant_values=self._pad_id)

    def get_state(self) -> dict[str, Any]:
        if self._docs:
            return {"parent": self._docs[0][0], "offset": int(self._docs[0][2])}
        return {"parent": self._parent.get_state(), "offset": 0}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._docs.clear()
        self._available = 0
        if state["offset"]:
            self._read_document(offset=state["offset"])


class MakeBatch:
    """Rows int32[n, L + 1] -> {'inputs', 'targets', 'weights'} with ``batch_size`` rows
    (missing rows are pad, weight 0)."""

    def __init__(self, batch_size: int, pad_id: int = PAD_ID) -> None:
        self.batch_size = batch_size
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        tokens = np.stack(rows).astype(np.int32)
        missing = self.batch_size - tokens.shape[0]
        tokens = np.pad(tokens, ((0, missing), (0, 0)), constant_values=self.pad_id)
        targets = tokens[:, 1:]
        return {"inputs": tokens[:, :-1], "targets": targets,
                "weights": (targets != self.pad_id).astype(np.float32)}


class TagTask:
    """row -> ``{'tokens': row, 'task_id': id}`` (picklable grain map)."""

    def __init__(self, task_id: int) -> None:
        self.task_id = task_id

    def __call__(self, row: np.ndarray) -> dict[str, Any]:
        return {"tokens": row, "task_id": self.task_id}


class MakeTaskBatch:
    """Tagged rows -> :class:`MakeBatch`'s dict plus ``'task_id'`` int32[batch_size]
    (missing rows: pad tokens, weight 0, task id 0)."""

    def __init__(self, batch_size: int, pad_id: int = PAD_ID) -> None:
        self.make_batch = MakeBatch(batch_size, pad_id)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        batch = self.make_batch([r["tokens"] for r in rows])
        task_id = np.zeros(self.make_batch.batch_size, np.int32)
        task_id[: len(rows)] = [r["task_id"] for r in rows]
        batch["task_id"] = task_id
        return batch


class Subset:
    """The records ``indices`` of ``source``, as a random-access source (picklable)."""

    def __init__(self, source: Sequence[Any], indices: Sequence[int]) -> None:
        self.source, self.indices = source, tuple(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.source[self.indices[i]]


class TakeRows:
    """Keeps rows ``[index * n, (index + 1) * n)`` of a global batch (``rows`` sharding)."""

    def __init__(self, process_index: int, process_count: int) -> None:
        self.index, self.count = process_index, process_count

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = next(iter(batch.values())).shape[0] // self.count
        return {k: v[self.index * n:(self.index + 1) * n] for k, v in batch.items()}

