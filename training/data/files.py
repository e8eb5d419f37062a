"""``data.name='files'``: documents streamed from your own files, checkpointable.

Formats (by suffix, :data:`FILE_SUFFIXES`); every reader streams with bounded memory and
keeps a resumable position (a list of ints) in its file:

* ``.txt``: UTF-8 text (undecodable bytes replaced). ``data.txt_unit`` (:data:`TXT_UNITS`)
  says what one document is: ``file`` (the whole file), ``paragraph`` (blocks separated by
  one or more blank lines, i.e. empty or whitespace-only lines; the block's lines joined,
  its last newline dropped) or ``line`` (every non-blank line, its newline dropped). A
  record is ``{'text': str}``: the key is always ``'text'``, whatever ``text_key`` is, and
  the text of a ``.txt`` document is taken from there (``text_key`` does not apply to
  ``.txt``). Position ``[byte offset, line]``.
* ``.jsonl`` / ``.jsonl.gz`` (gzip): one JSON object per line, blank lines skipped; a line
  that is not a JSON object is an error naming ``file:line``. Position ``[byte offset,
  line]`` (a seek) for ``.jsonl``, ``[line]`` for ``.jsonl.gz`` (reopened, lines skipped).
* ``.parquet``: read one row group at a time, in batches of rows, only the ``text_key``
  column when a key is asked for (all columns otherwise). Position ``[row group, row]``.
* ``.array_record``: each record is bytes; one that parses as a JSON object is that
  object, any other is ``{'text': bytes.decode('utf-8')}``. (TFDS-prepared array_record
  files hold serialized ``tf.train.Example`` protos: read those with ``data.name=<the TFDS
  name>``.) Position ``[record index]``.

Errors name the place: ``file:N`` with N the line (``.jsonl``, ``.jsonl.gz``, ``.txt``:
the first line of the document) or the record number from 1 (``.parquet``,
``.array_record``). :func:`expand_files` turns ``data.files`` (comma-separated globs) into
the file list; :func:`check_files` validates a ``files`` config cheaply (the globs, empty
files, and the first record of each file only) before anything is built.

:class:`FileDocuments` (a parentless grain ``IterDataset``, picklable) yields each
document's text (``text_key`` set) or the whole record as a dict (``text_key=None``: chat
data needs several fields):

* **Split** (``split='train' | 'eval' | 'all'``): a document is in eval iff the first 8
  bytes (little-endian) of ``blake2b(text_bytes, digest_size=8)`` over ``2**64`` fall below
  ``eval_fraction`` (a dict record without ``text_key``: its canonical ``json.dumps(record,
  sort_keys=True)``). It depends on the document only, so it is the same whatever the file
  order, the number of processes or the shuffling, and equal documents share a split.
* **Sharding**: with at least as many files as processes, process ``p`` of ``n`` reads
  files ``files[p::n]``; with fewer, every process reads every file and keeps the records
  whose running index in their file is ``p`` modulo ``n``. The processes' records are
  disjoint and together are each epoch's records once. grain's ``mp_prefetch`` workers
  shard a process's share once more the same way (``set_slice``).
* **Shuffling** (``shuffle=True``): each epoch visits this process's files in the order
  ``numpy.random.default_rng([seed, epoch]).permutation``, and the records (after the
  sharding and the split) are cut into consecutive windows of ``shuffle_buffer`` that are
  each permuted by ``default_rng([seed, epoch, window])`` (the window index restarts each
  epoch; the last window of an epoch may be short). ``shuffle=False``: the files in the
  given order, records in file order.
* **Epochs**: ``repeat=True`` runs epochs 0, 1, ... without end (an epoch of this process
  that holds no record at all is an error, not an endless loop); ``repeat=False`` stops
  after one.
* **State** (``get_state``; JSON: ints, strings and lists only)::

      {"files": "<count>:<hash of the names>", "shard": [[process_index, process_count]],
       "shuffle": shuffle_buffer or 0, "epoch": e, "file": i, "reader": [...],
       "index": k, "window": w, "emitted": m}

  ``file`` is the position in epoch ``e``'s file order, ``reader`` the reader's position in
  that file (``[]``: its start), ``index`` the records read from it so far (the running
  index of the sharding). Unshuffled, that is the place after the last document yielded
  (``window``, ``emitted`` are 0); shuffled, it is the start of window ``w`` of which
  ``m`` documents were yielded: ``set_state`` re-reads and re-permutes the window and skips
  those, so the continued stream equals the uninterrupted one exactly. A state of another
  file list (count and hash of the paths relative to their common directory, so a moved
  corpus still matches), another sharding (``shard``: the process's ``[index, count]``,
  then a grain worker's) or another shuffle buffer is refused.
* **Memory**: one shuffle window of documents, one batch of Parquet rows (256) or
  array_record records (64), and the file buffers of one open file: independent of the
  corpus size (a ``.txt`` with ``txt_unit='file'`` is one document, read whole).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet", ".array_record")
TXT_UNITS = ("file", "paragraph", "line")
SPLITS = ("all", "train", "eval")

_FROM_CONFIG = "__cfg__"
_PARQUET_BATCH = 256
_ARRAY_RECORD_CHUNK = 64
_MAX_KEYS_SHOWN = 20

# A record, the reader position after it, and its place (line, or record number from 1).
_Read = Iterator[tuple[dict[str, Any], list[int], int]]


def file_suffix(path: str) -> str | None:
    """The suffix of :data:`FILE_SUFFIXES` that ``path`` ends with (case-insensitive), or None."""
    name = path.lower()
    return next((s for s in FILE_SUFFIXES if name.endswith(s)), None)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _keys_of(record: Mapping[str, Any]) -> str:
    keys = [str(k) for k in record]
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    more = f", ... ({len(keys)} in all)" if len(keys) > _MAX_KEYS_SHOWN else ""
    return (shown + more) or "(none)"


# ------------------------------------------------------------------------ file lists


def expand_files(spec: str, key: str = "data.files") -> list[str]:
    """Comma-separated globs (``~`` expanded, ``**`` recursive) -> sorted, de-duplicated
    absolute paths of supported files; ``ValueError`` naming ``key`` otherwise."""
    globs = [g.strip() for g in str(spec or "").split(",") if g.strip()]
    allowed = ", ".join(FILE_SUFFIXES)
    if not globs:
        raise ValueError(f"{key} is empty; set it to comma-separated globs of {allowed} files")
    found: set[str] = set()
    for pattern in globs:
        matches = glob.glob(os.path.expanduser(pattern), recursive=True)
        if not matches:
            raise ValueError(f"{key}: the glob {pattern!r} matches no file")
        for match in matches:
            if os.path.isdir(match):
                raise ValueError(f"{key}: the glob {pattern!r} matches the directory {match}; "
                                 f"name its files, e.g. {match.rstrip(os.sep)}/*.jsonl")
            if file_suffix(match) is None:
                raise ValueError(f"{key}: {match} has an unsupported suffix; allowed: {allowed}")
            found.add(os.path.abspath(match))
    return sorted(found)


def _fingerprint(files: Sequence[str]) -> str:
    """``count:hash`` of the paths relative to their common directory."""
    paths = [os.path.abspath(f) for f in files]
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    names = "\0".join(os.path.relpath(p, root) for p in paths)
    return f"{len(paths)}:{hashlib.blake2b(names.encode('utf-8'), digest_size=8).hexdigest()}"


# ------------------------------------------------------------------------ readers


def _parse_json_line(raw: bytes, path: str, line: int) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        why = e.msg if isinstance(e, json.JSONDecodeError) else _first_line(e)
        raise ValueError(f"{path}:{line}: invalid JSON ({why}); each line must be one "
                         "JSON object") from e
    if not isinstance(record, dict):  # bad input data, not a caller's type error
        raise ValueError(f"{path}:{line}: a JSON {type(record).__name__} is not an object; "  # noqa: TRY004
                         "each line must be one JSON object")
    return record


def _read_jsonl(path: str, pos: Sequence[int], column: str | None, txt_unit: str) -> _Read:
    offset, line = (pos[0], pos[1]) if pos else (0, 0)
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            offset += len(raw)
            line += 1
            if raw.strip():
                yield _parse_json_line(raw, path, line), [offset, line], line


def _read_jsonl_gz(path: str, pos: Sequence[int], column: str | None, txt_unit: str) -> _Read:
    skip = pos[0] if pos else 0
    line = 0
    try:
        with gzip.open(path, "rb") as f:
            for raw in f:
                line += 1
                if line > skip and raw.strip():
                    yield _parse_json_line(raw, path, line), [line], line
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: cannot decompress after line {line}: {_first_line(e)}") from e


def _open_parquet(path: str) -> Any:
    """``pyarrow.parquet.ParquetFile(path)``, or one line saying why it cannot be read."""
    import pyarrow.parquet as pq
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types; report one line
        raise ValueError(f"cannot read {path} as Parquet: {_first_line(e)}") from e


def _read_parquet(path: str, pos: Sequence[int], column: str | None, txt_unit: str) -> _Read:
    group0, row0 = (pos[0], pos[1]) if pos else (0, 0)
    with _open_parquet(path) as pf:
        names = pf.schema_arrow.names
        if column is not None and column not in names:
            raise ValueError(f"{path}: no column {column!r}; its columns: {_keys_of(names)}")
        meta = pf.metadata
        before = sum(meta.row_group(g).num_rows for g in range(min(group0, meta.num_row_groups)))
        for group in range(group0, meta.num_row_groups):
            first = row0 if group == group0 else 0
            start = 0   # row of the batch's first row in the group
            if first < meta.row_group(group).num_rows:
                for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, row_groups=[group],
                                             columns=None if column is None else [column]):
                    end = start + batch.num_rows
                    if end > first:
                        skip = max(first - start, 0)
                        rows = (batch.column(0).to_pylist()[skip:] if column is not None
                                else batch.slice(skip).to_pylist())
                        for row, value in enumerate(rows, start + skip):
                            record = {column: value} if column is not None else value
                            yield record, [group, row + 1], before + row + 1
                    start = end
            before += meta.row_group(group).num_rows


def _decode_array_record(raw: bytes) -> dict[str, Any]:
    if raw.lstrip()[:1] == b"{":
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if isinstance(record, dict):
            return record
    return {"text": raw.decode("utf-8", errors="replace")}


def _read_array_record(path: str, pos: Sequence[int], column: str | None,
                       txt_unit: str) -> _Read:
    from array_record.python import array_record_module

    index = pos[0] if pos else 0
    try:
        reader = array_record_module.ArrayRecordReader(path)
    except Exception as e:  # the C++ reader raises RuntimeError or ValueError
        raise ValueError(f"cannot read {path} as array_record: {_first_line(e)}") from e
    try:
        count = reader.num_records()
        while index < count:
            for raw in reader.read(index, min(index + _ARRAY_RECORD_CHUNK, count)):
                index += 1
                yield _decode_array_record(raw), [index], index
    finally:
        reader.close()


def _decode_text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _read_txt(path: str, pos: Sequence[int], column: str | None, txt_unit: str) -> _Read:
    offset, line = (pos[0], pos[1]) if pos else (0, 0)
    with open(path, "rb") as f:
        if txt_unit == "file":
            if offset == 0:
                data = f.read()
                if data:
                    yield {"text": _decode_text(data)}, [len(data), 1], 1
            return
        f.seek(offset)
        block: list[bytes] = []
        first = 0
        for raw in f:
            offset += len(raw)
            line += 1
            blank = not raw.strip()
            if txt_unit == "line":
                if not blank:
                    yield {"text": _decode_text(raw.rstrip(b"\r\n"))}, [offset, line], line
            elif not blank:
                first = first if block else line
                block.append(raw)
            elif block:
                yield {"text": _decode_text(b"".join(block).rstrip(b"\r\n"))}, [offset, line], first
                block = []
        if block:
            yield {"text": _decode_text(b"".join(block).rstrip(b"\r\n"))}, [offset, line], first


_READERS: dict[str, Callable[[str, Sequence[int], str | None, str], _Read]] = {
    ".txt": _read_txt, ".jsonl": _read_jsonl, ".jsonl.gz": _read_jsonl_gz,
    ".parquet": _read_parquet, ".array_record": _read_array_record}


def _reader(path: str) -> Callable[[str, Sequence[int], str | None, str], _Read]:
    suffix = file_suffix(path)
    if suffix is None:
        raise ValueError(f"{path} has an unsupported suffix; allowed: {', '.join(FILE_SUFFIXES)}")
    return _READERS[suffix]


def _text_of(record: Mapping[str, Any], key: str, path: str, place: int) -> str:
    if key not in record:
        raise ValueError(f"{path}:{place}: the record has no key {key!r}; its keys: "
                         f"{_keys_of(record)}")
    value = record[key]
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    raise ValueError(f"{path}:{place}: {key!r} holds {type(value).__name__}, not text")


def _in_eval(document: str | Mapping[str, Any], eval_fraction: float) -> bool:
    if isinstance(document, str):
        data = document.encode("utf-8")
    else:
        data = json.dumps(document, sort_keys=True, default=str).encode("utf-8")
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < eval_fraction


# ------------------------------------------------------------------------ config check


def _check_file(path: str, text_key: str | None, txt_unit: str) -> None:
    """Not empty, and the first record has ``text_key`` (read that record only)."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty (0 bytes)")
    suffix = file_suffix(path)
    key = None if suffix == ".txt" else text_key
    if suffix == ".parquet":
        with _open_parquet(path) as pf:
            names = pf.schema_arrow.names
            if pf.metadata.num_rows == 0:
                raise ValueError(f"{path} holds no rows")
            if key is not None and key not in names:
                raise ValueError(f"{path}: the first record has no key {key!r} (no such column); "
                                 f"its keys: {_keys_of(names)}")
        return
    records = _reader(path)(path, [], None, txt_unit)
    try:
        first = next(records, None)
    finally:
        records.close()
    if first is None:
        what = {".jsonl.gz": "decompresses to no JSON record",
                ".txt": f"holds no document (data.txt_unit={txt_unit!r}: only blank lines)"}
        raise ValueError(f"{path} {what.get(suffix, 'holds no records')}")
    record, _, place = first
    if key is not None and key not in record:
        raise ValueError(f"{path}:{place}: the first record has no key {key!r}; its keys: "
                         f"{_keys_of(record)}")


def record_key(data_cfg: Any) -> str | None:
    """The field a record's text is read from: ``data.text_key``; None for
    ``data.format='chat'``, whose records are read whole."""
    return None if str(data_cfg.get("format", "text")) == "chat" else data_cfg.text_key


def check_files(data_cfg: Any, *, text_key: str | None = _FROM_CONFIG) -> None:
    """For ``data.name == 'files'``: the settings, the globs of ``data.files`` (and
    ``data.eval_files``), no empty file, and the first record of every file holds the text
    key (``text_key``: default :func:`record_key`; None: no key check)."""
    if data_cfg.name != "files":
        return
    if data_cfg.txt_unit not in TXT_UNITS:
        raise ValueError(f"unknown data.txt_unit {data_cfg.txt_unit!r}; allowed: {', '.join(TXT_UNITS)}")
    fraction = data_cfg.eval_fraction
    if not 0 <= fraction < 1:
        raise ValueError(f"data.eval_fraction={fraction} is not in [0, 1)")
    if not data_cfg.eval_files and fraction <= 0:
        raise ValueError("data.eval_fraction=0 with data.eval_files empty leaves no validation "
                         "documents; set data.eval_fraction in (0, 1) or data.eval_files")
    if data_cfg.shuffle_buffer < 1:
        raise ValueError(f"data.shuffle_buffer={data_cfg.shuffle_buffer} must be at least 1")
    key = record_key(data_cfg) if text_key == _FROM_CONFIG else text_key
    for cfg_key, spec in (("data.files", data_cfg.files), ("data.eval_files", data_cfg.eval_files)):
        if cfg_key == "data.eval_files" and not str(spec or "").strip():
            continue
        for path in expand_files(spec, cfg_key):
            _check_file(path, key, data_cfg.txt_unit)


# ------------------------------------------------------------------------ dataset


_END = object()   # end of the epoch


class FileDocuments(grain.IterDataset):
    """Documents of ``files`` (see the module docstring): texts, or records with
    ``text_key=None``; this process's share, one split, optionally shuffled and repeated."""

    def __init__(self, files: Sequence[str], *, text_key: str | None = "text",
                 txt_unit: str = "file", split: str = "all", eval_fraction: float = 0.0,
                 seed: int = 0, shuffle: bool = False, shuffle_buffer: int = 1024,
                 repeat: bool = False, process_index: int = 0, process_count: int = 1) -> None:
        super().__init__()
        files = tuple(os.fspath(f) for f in files)
        if not files:
            raise ValueError("FileDocuments needs at least one file")
        for path in files:
            _reader(path)
        if txt_unit not in TXT_UNITS:
            raise ValueError(f"unknown txt_unit {txt_unit!r}; allowed: {', '.join(TXT_UNITS)}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        if not 0 <= eval_fraction < 1:
            raise ValueError(f"eval_fraction={eval_fraction} is not in [0, 1)")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer={shuffle_buffer} must be at least 1")
        if seed < 0:
            raise ValueError(f"seed={seed} must be a non-negative int")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self._files = files
        self._text_key = text_key
        self._txt_unit = txt_unit
        self._split = split
        self._eval_fraction = float(eval_fraction)
        self._seed = int(seed)
        self._shuffle = bool(shuffle)
        self._shuffle_buffer = int(shuffle_buffer)
        self._repeat = bool(repeat)
        self._process_index = int(process_index)
        self._process_count = int(process_count)
        self._levels: tuple[tuple[int, int], ...] = ((self._process_index, self._process_count),)
        self._fingerprint = _fingerprint(files)
        self._assign()

    def _assign(self) -> None:
        """This share's files and record-level sharding from the levels (process, workers)."""
        files, record_levels = self._files, []
        for index, count in self._levels:
            if len(files) >= count:
                files = files[index::count]
            else:
                record_levels.append((index, count))
        self._shard_files: tuple[str, ...] = files
        self._record_levels: tuple[tuple[int, int], ...] = tuple(record_levels)

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """grain's in-place slicing (``mp_prefetch`` worker ``i`` of ``n`` gets ``slice(i,
        None, n)``): shards this share once more, by files or records like the processes."""
        del sequential_slice   # strided either way
        index, count = sl.start or 0, sl.step or 1
        if sl.stop is not None or not 0 <= index < count:
            raise ValueError(f"FileDocuments supports slices [i::n] with 0 <= i < n only, not {sl}")
        self._levels += ((index, count),)
        self._assign()

    def __iter__(self) -> FileDocumentsIterator:
        return FileDocumentsIterator(self)

    def __str__(self) -> str:
        return (f"FileDocuments({len(self._files)} files, split={self._split!r}, "
                f"shuffle={self._shuffle}, repeat={self._repeat}, "
                f"process={self._process_index}/{self._process_count})")


class FileDocumentsIterator(grain.DatasetIterator):
    """The iterator of :class:`FileDocuments`; its state is in the module docstring."""

    def __init__(self, ds: FileDocuments) -> None:
        super().__init__()
        self._ds = ds
        self._epoch = 0
        # (position in the epoch's file order, reader position, records read in that file)
        self._cursor: tuple[int, list[int], int] = (0, [], 0)
        self._stream: Iterator[tuple[Any, tuple[int, list[int], int]]] | None = None
        self._fresh = True        # this epoch is read from its start
        self._seen = False        # a document of this epoch was read
        # shuffling: window index in the epoch, its start, its documents, how many emitted
        self._window_index = 0
        self._window_start = self._cursor
        self._window: list[Any] | None = None
        self._emitted = 0

    # ------------------------------------------------------------------ reading

    def _order(self, epoch: int) -> list[int]:
        count = len(self._ds._shard_files)
        if not self._ds._shuffle:
            return list(range(count))
        return [int(i) for i in np.random.default_rng([self._ds._seed, epoch]).permutation(count)]

    def _records(self, epoch: int, cursor: tuple[int, list[int], int]
                 ) -> Iterator[tuple[Any, tuple[int, list[int], int]]]:
        """This process's documents of ``epoch`` from ``cursor``, each with the cursor after it."""
        ds = self._ds
        order = self._order(epoch)
        column = ds._text_key
        file0, pos0, index0 = cursor
        for file_pos in range(file0, len(order)):
            path = ds._shard_files[order[file_pos]]
            is_txt = file_suffix(path) == ".txt"
            pos, index = (pos0, index0) if file_pos == file0 else ([], 0)
            for record, pos_after, place in _reader(path)(
                    path, pos, None if is_txt else column, ds._txt_unit):
                local, mine = index, True
                for shard, count in ds._record_levels:
                    mine, local = mine and local % count == shard, local // count
                index += 1
                if not mine:
                    continue
                if ds._text_key is None:
                    item: Any = record
                else:
                    item = _text_of(record, "text" if is_txt else ds._text_key, path, place)
                if ds._split != "all" and _in_eval(item, ds._eval_fraction) != (ds._split == "eval"):
                    continue
                yield item, (file_pos, pos_after, index)

    def _pull(self) -> Any:
        """The next document of the epoch, or ``_END`` (the cursor then at the epoch's end)."""
        if self._stream is None:
            self._stream = self._records(self._epoch, self._cursor)
        try:
            item, self._cursor = next(self._stream)
        except StopIteration:
            self._stream = None
            self._cursor = (len(self._ds._shard_files), [], 0)
            return _END
        self._seen = True
        return item

    def _next_epoch(self) -> None:
        if self._fresh and not self._seen:
            ds = self._ds
            share = ", ".join(f"{what} {i} of {n}" for (i, n), what in
                              zip(ds._levels, ["process"] + ["worker"] * len(ds._levels)))
            raise ValueError(
                f"{share} gets no {ds._split!r} "
                f"document from its {len(ds._shard_files)} of {len(ds._files)} files "
                f"(eval_fraction={ds._eval_fraction}): repeating would loop forever")
        self._close_stream()
        self._epoch += 1
        self._cursor = (0, [], 0)
        self._fresh, self._seen = True, False
        self._window_index, self._window_start, self._window, self._emitted = 0, self._cursor, None, 0

    def _fill_window(self) -> None:
        self._window_start = self._cursor
        items = []
        while len(items) < self._ds._shuffle_buffer:
            item = self._pull()
            if item is _END:
                break
            items.append(item)
        rng = np.random.default_rng([self._ds._seed, self._epoch, self._window_index])
        self._window = [items[i] for i in rng.permutation(len(items))]
        self._emitted = 0

    def __next__(self) -> Any:
        if not self._ds._shuffle:
            while (item := self._pull()) is _END:
                if not self._ds._repeat:
                    raise StopIteration
                self._next_epoch()
            return item
        while self._window is None or self._emitted == len(self._window):
            if self._window is not None:
                if not self._window:      # the epoch is over
                    if not self._ds._repeat:
                        raise StopIteration
                    self._next_epoch()
                    continue
                self._window_index += 1
                self._window = None
            self._fill_window()
        item = self._window[self._emitted]
        self._emitted += 1
        return item

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    # ------------------------------------------------------------------ state

    def get_state(self) -> dict[str, Any]:
        ds = self._ds
        window, emitted = 0, 0
        cursor = self._cursor
        if ds._shuffle:
            window = self._window_index
            if self._window is not None and self._emitted == len(self._window):
                window += 1   # used up: the next window starts at the cursor
            elif self._window is not None:
                cursor, emitted = self._window_start, self._emitted
        file_pos, reader, index = cursor
        return {"files": ds._fingerprint, "shard": [list(level) for level in ds._levels],
                "shuffle": ds._shuffle_buffer if ds._shuffle else 0, "epoch": self._epoch,
                "file": file_pos, "reader": [int(p) for p in reader], "index": index,
                "window": window, "emitted": emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        ds = self._ds
        if state.get("files") != ds._fingerprint:
            raise ValueError(f"the iterator state is of another file list ({state.get('files')}, "
                             f"count:hash) than this one ({ds._fingerprint})")
        shard = [list(level) for level in ds._levels]
        if [list(level) for level in state["shard"]] != shard:
            raise ValueError(f"the iterator state is of shard {state['shard']} ([index, count] of the "
                             f"process, then of grain workers), this iterator is of {shard}")
        buffer = ds._shuffle_buffer if ds._shuffle else 0
        if state["shuffle"] != buffer:
            raise ValueError(f"the iterator state was saved with shuffle buffer {state['shuffle']} "
                             f"(0: unshuffled), this dataset has {buffer}")
        file_pos = int(state["file"])
        if not 0 <= file_pos <= len(ds._shard_files):
            raise ValueError(f"the iterator state's file position {file_pos} is not in "
                             f"[0, {len(ds._shard_files)}]")
        self._close_stream()
        self._epoch = int(state["epoch"])
        self._cursor = (file_pos, [int(p) for p in state["reader"]], int(state["index"]))
        self._window_index = int(state["window"])
        self._window_start, self._window, self._emitted = self._cursor, None, 0
        self._fresh = self._cursor == (0, [], 0) and self._window_index == 0
        self._seen = False
        emitted = int(state["emitted"])
        if emitted:
            self._fill_window()
            if emitted > len(self._window):
                raise ValueError(f"the iterator state has {emitted} documents of a window emitted, "
                                 f"the window holds {len(self._window)}: the files changed")
            self._emitted = emitted

    def __str__(self) -> str:
        return f"FileDocumentsIterator({self._ds})"
