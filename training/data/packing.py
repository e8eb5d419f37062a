"""Documents to rows to batches: picklable grain maps and the packing iterator.

A document becomes its token ids followed by EOS (:class:`EncodeDocument`), or, for chat
data, ids with a loss mask (``{'ids', 'mask'}``, :mod:`routezoo.training.data.chat`).
:class:`PackIterDataset` concatenates documents and cuts rows of ``seq_len + 1`` tokens
(no padding, except the last row of an evaluation, and rows closed early to keep
examples whole); :class:`MakeBatch` turns rows into ``inputs = row[:-1]``,
``targets = row[1:]`` and ``weights``.

Two packings (``data.packing``):

* ``masked`` (the default): every row also carries ``segment_ids`` (1, 2, ... for the
  pieces of documents in the row, in order; 0 on padding) and ``positions`` (0 at the
  start of every piece). The model masks attention to its own segment, so no token sees
  another document, and rotary positions restart per document; a document cut across
  two rows starts again at position 0 in the second. Targets that cross a boundary
  (the token after a document's EOS is the next document's first token) get weight 0,
  as does padding: ``weights = (segment of the target != 0) & (same segment as the
  input)``.
* ``eos``: documents separated by EOS only; attention runs across them; ``weights =
  (targets != pad)``. Rows then hold tokens only (a plain array), as they always did.

``whole=True`` (chat data) keeps examples whole: one that does not fit in what is left of
a row closes the row (the rest is padding, weight 0), and one longer than a row is cut to
its first ``seq_len + 1`` tokens (the rest dropped). A loss mask (chat) multiplies the
weights: a target's weight is its token's mask.

The packer's state (the document with unemitted tokens and the offset in it) makes the
pipeline checkpointable.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from routezoo.training.data.sources import text_of
from routezoo.training.data.tokenizers import PAD_ID, Tokenizer

PACKINGS = ("masked", "eos")


class EncodeDocument:
    """record -> int32 token ids of its text followed by EOS (picklable grain map)."""

    def __init__(self, tokenizer: Tokenizer, text_key: str) -> None:
        self.tokenizer = tokenizer
        self.text_key = text_key

    def __call__(self, record: Any) -> np.ndarray:
        ids = self.tokenizer.encode(text_of(record, self.text_key))
        return np.append(ids, np.int32(self.tokenizer.eos_id)).astype(np.int32)


def _split_document(doc: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """A document as ``(ids, mask)``: a plain id array (mask None) or ``{'ids', 'mask'}``."""
    if isinstance(doc, Mapping):
        return np.asarray(doc["ids"], np.int32), np.asarray(doc["mask"], np.float32)
    return np.asarray(doc, np.int32), None


class PackIterDataset(grain.IterDataset):
    """Concatenates documents in order and cuts them into rows of ``length`` tokens.

    Every token appears in exactly one row, in order (``whole``: up to the cut of an
    example longer than a row). With ``pad_final`` the last, partial row is padded with
    ``pad_id``; otherwise it is dropped. Rows are int32 arrays, or with ``segments`` (or
    documents that carry a loss mask) dicts ``{'tokens', 'segment_ids', 'positions'[,
    'mask']}`` of ``[length]`` arrays (module docstring).
    """

    def __init__(self, parent: grain.IterDataset, length: int, *, pad_id: int = PAD_ID,
                 pad_final: bool = False, segments: bool = False, whole: bool = False) -> None:
        super().__init__(parent)
        self._length = length
        self._pad_id = pad_id
        self._pad_final = pad_final
        self._segments = segments
        self._whole = whole

    def __iter__(self) -> PackIterator:
        return PackIterator(self._parent.__iter__(), self._length, self._pad_id,
                            self._pad_final, self._segments, self._whole)

    def __str__(self) -> str:
        return f"PackIterDataset(length={self._length}, segments={self._segments}, whole={self._whole})"


class PackIterator(grain.DatasetIterator):
    """State: the parent's state before the oldest document with unemitted tokens, and
    how many of its tokens were emitted already; restoring re-reads that document."""

    def __init__(self, parent: grain.DatasetIterator, length: int, pad_id: int,
                 pad_final: bool, segments: bool = False, whole: bool = False) -> None:
        super().__init__(parent)
        self._length = length
        self._pad_id = pad_id
        self._pad_final = pad_final
        self._segments = segments
        self._whole = whole
        # [parent state before the document, its ids, its mask or None, tokens already emitted]
        self._docs: collections.deque[list[Any]] = collections.deque()
        self._available = 0

    def _read_document(self, offset: int = 0) -> bool:
        state = self._parent.get_state()
        try:
            ids, mask = _split_document(next(self._parent))
        except StopIteration:
            return False
        if self._whole and len(ids) > self._length:   # an example longer than a row: its start
            ids = ids[: self._length]
            mask = None if mask is None else mask[: self._length]
        if len(ids) > offset:
            self._docs.append([state, ids, mask, offset])
            self._available += len(ids) - offset
        return True

    def _take_pieces(self) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """The pieces of documents that make the next row (consumed from the deque)."""
        if self._whole:   # whole documents, as many as fit
            pieces, used = [], 0
            while True:
                if not self._docs and not self._read_document():
                    if not pieces or not self._pad_final:
                        raise StopIteration
                    break
                if not self._docs:
                    continue
                doc = self._docs[0]
                n = len(doc[1]) - doc[3]
                if pieces and used + n > self._length:
                    break
                pieces.append((doc[1][doc[3]:], None if doc[2] is None else doc[2][doc[3]:]))
                used += n
                self._available -= n
                self._docs.popleft()
                if used == self._length:
                    break
            return pieces
        while self._available < self._length:
            if not self._read_document():
                if self._available == 0 or not self._pad_final:
                    raise StopIteration
                break
        pieces, needed = [], min(self._length, self._available)
        while needed:
            doc = self._docs[0]
            take = min(needed, len(doc[1]) - doc[3])
            pieces.append((doc[1][doc[3]: doc[3] + take],
                           None if doc[2] is None else doc[2][doc[3]: doc[3] + take]))
            doc[3] += take
            needed -= take
            self._available -= take
            if doc[3] == len(doc[1]):
                self._docs.popleft()
        return pieces

    def __next__(self) -> np.ndarray | dict[str, np.ndarray]:
        pieces = self._take_pieces()
        pad = self._length - sum(len(ids) for ids, _ in pieces)
        tokens = np.pad(np.concatenate([ids for ids, _ in pieces]).astype(np.int32), (0, pad),
                        constant_values=self._pad_id)
        with_mask = any(mask is not None for _, mask in pieces)
        if not self._segments and not with_mask:
            return tokens
        row = {"tokens": tokens}
        if self._segments:
            lengths = np.array([len(ids) for ids, _ in pieces])
            starts = np.cumsum(lengths) - lengths
            seg = np.repeat(np.arange(1, len(pieces) + 1, dtype=np.int32), lengths)
            pos = (np.arange(len(seg)) - np.repeat(starts, lengths)).astype(np.int32)
            row["segment_ids"], row["positions"] = np.pad(seg, (0, pad)), np.pad(pos, (0, pad))
        if with_mask:
            row["mask"] = np.pad(np.concatenate(
                [np.ones(len(ids), np.float32) if mask is None else mask for ids, mask in pieces]), (0, pad))
        return row

    def get_state(self) -> dict[str, Any]:
        if self._docs:
            return {"parent": self._docs[0][0], "offset": int(self._docs[0][3])}
        return {"parent": self._parent.get_state(), "offset": 0}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._docs.clear()
        self._available = 0
        if state["offset"]:
            self._read_document(offset=state["offset"])


class MakeBatch:
    """Rows -> ``{'inputs', 'targets', 'weights'}`` int32/float32 ``[batch_size, L]`` (missing
    rows are padding, weight 0); rows with segments add ``'segment_ids'`` and
    ``'positions'`` of the inputs (module docstring for the weights)."""

    def __init__(self, batch_size: int, pad_id: int = PAD_ID) -> None:
        self.batch_size = batch_size
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[np.ndarray | Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        missing = self.batch_size - len(rows)
        if rows and isinstance(rows[0], Mapping):
            cols = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        else:
            cols = {"tokens": np.stack(rows)}
        cols = {k: np.pad(v, ((0, missing), (0, 0)), constant_values=self.pad_id if k == "tokens" else 0)
                for k, v in cols.items()}
        tokens = cols["tokens"].astype(np.int32)
        targets = tokens[:, 1:]
        out = {"inputs": tokens[:, :-1], "targets": targets}
        if "segment_ids" in cols:
            seg = cols["segment_ids"].astype(np.int32)
            weights = (seg[:, 1:] != 0) & (seg[:, 1:] == seg[:, :-1])
            out["segment_ids"] = seg[:, :-1]
            out["positions"] = cols["positions"][:, :-1].astype(np.int32)
        else:
            weights = targets != self.pad_id
        weights = weights.astype(np.float32)
        if "mask" in cols:
            weights = weights * cols["mask"][:, 1:].astype(np.float32)
        out["weights"] = weights
        return out


class TagTask:
    """row -> the row's columns plus ``'task_id'`` (an array row is ``{'tokens': row}``;
    picklable grain map)."""

    def __init__(self, task_id: int) -> None:
        self.task_id = task_id

    def __call__(self, row: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, Any]:
        cols = dict(row) if isinstance(row, Mapping) else {"tokens": row}
        return {**cols, "task_id": self.task_id}


class MakeTaskBatch:
    """Tagged rows -> :class:`MakeBatch`'s dict plus ``'task_id'`` int32[batch_size]
    (missing rows: pad tokens, weight 0, task id 0)."""

    def __init__(self, batch_size: int, pad_id: int = PAD_ID) -> None:
        self.make_batch = MakeBatch(batch_size, pad_id)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        batch = self.make_batch([{k: v for k, v in r.items() if k != "task_id"} for r in rows])
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

