"""Data: TFDS sources, tokenizers and checkpointable grain pipelines.

Sources. Every split is read through ``tfds.data_source`` (array_record files, random
access, no TensorFlow):

* ``stdlib`` (the default, offline): the ``.py`` files of the running interpreter's
  standard library (``sysconfig.get_paths()['stdlib']``, subpackages included;
  ``site-packages``, ``__pycache__`` and the test suites, i.e. directories named
  ``test``, ``tests`` or ``idle_test``, left out; for 3.11: 734 files, 11.9 MB).
  A file belongs to ``validation`` when a SHA-1 of its POSIX path relative to the stdlib
  root falls in the lowest 5% (:func:`stdlib_split_of`), else to ``train``. It is built
  once per data dir by the local TFDS builder ``routezoo_stdlib`` whose config is keyed
  by the Python version (``routezoo_stdlib/py3_11``); features ``text`` and ``path``.
  The build runs under an ``fcntl`` lock, so concurrent processes build it once.
* any other ``data.name``: a TFDS dataset already prepared in array_record format in
  the data dir (``tfds build NAME --file_format=array_record``); ``data.text_key`` holds
  the text. Nothing is downloaded here.

The data dir is ``data.data_dir``, else ``$ROUTEZOO_DATA_DIR``, else
``~/tensorflow_datasets``.

Tokenizers (:func:`get_tokenizer`): ``byte`` (pad 0, eos 1, byte b -> b + 2, 258 ids) or
``sentencepiece`` (pad 0, eos 1, unk 2, byte fallback; loaded from ``data.spm_model`` or
trained once on a bounded sample of the train split and cached in the data dir).
``token_bytes[id]`` is the number of UTF-8 bytes a token stands for (0 for pad, eos and
other control ids), for bits per byte = sum NLL / ln 2 / sum token_bytes[targets].

Training pipeline (:func:`make_train_iterator`), per process, with
``data.process_sharding='documents'``::

    source[process_index::process_count]      disjoint documents per process
      -> shuffle(seed)  -> repeat()           reshuffled every epoch (grain MapDataset)
      -> encode + EOS                         int32 token ids per document
      -> PackIterDataset(seq_len + 1)         concatenate documents, cut rows, no padding
      -> batch(batch_size // process_count)   {'inputs', 'targets', 'weights'}

``inputs = row[:-1]``, ``targets = row[1:]``, ``weights = (targets != pad)``; each
process packs its own documents, so the processes' rows are disjoint and together cover
each epoch of the split once. With ``'rows'`` (the default) every process builds the
same global stream of batches and keeps its slice of rows, so the data a run sees (and
the iterator state) does not depend on the number of processes; that costs each process
the tokenizing and packing of the whole stream, cheap for text next to a training step.
The returned grain ``DatasetIterator`` is checkpointable
(``get_state``/``set_state``, JSON-able dicts); :func:`iterator_save_args` and
:func:`iterator_restore_args` give the Orbax args (grain's ``CheckpointSave`` /
``CheckpointRestore``, one ``process_<i>-of-<n>.json`` per process) for a composite
``CheckpointManager``. Rows carry no segment ids: documents are separated by EOS only.
``data.num_workers > 0`` adds grain's ``mp_prefetch`` (worker processes; grain needs
absl flags parsed, as under ``absl.app.run``); it changes the order of the data, so a
saved iterator state only restores with the same ``num_workers``.

Evaluation (:func:`eval_batches`): the eval split, unshuffled, packed the same way; the
last row and the last batch are padded with pad ids (weight 0), and every process yields
exactly ``train.eval_steps`` batches (all-pad batches once its share runs out) so that
multi-host evaluation steps stay in lockstep.

Tasks (multi-task adapters: Poly/MHR, ScaLearn, PHATGOOSE, many adapters per batch).
``data.tasks`` (stdlib only; "" = off, the pipelines above unchanged) is a comma-separated
list of top-level stdlib packages (:func:`task_of_path`: the first component of a file's
path in a subdirectory, e.g. ``email/message.py`` -> ``email``; top-level modules such as
``os.py`` belong to no task; the ``test`` suites are not in the dataset at all). A task's
id is its position in the list; :func:`available_tasks` lists the names with their file
counts. The training pipeline becomes, per task ``t``::

    task t's documents[process_index::process_count] -> shuffle -> repeat -> encode + EOS
      -> PackIterDataset(seq_len + 1)                  rows of task t only, tagged id t
    IterDataset.mix(rows of all tasks, weights)        grain's deterministic interleaving
      -> batch                                         {..., 'task_id': int32[B]}

so no row mixes tasks. ``data.task_sampling``: ``uniform`` (equal weights) or
``proportional`` (weights = the tasks' UTF-8 text bytes in the train split, i.e. each
task's share of the untasked stream). grain's mix is not a random draw: it interleaves the
tasks in fixed proportions (uniform over T tasks: rows cycle 0, 1, ..., T-1), so every
window of rows holds the tasks in (almost exactly) their proportions. The iterator state
holds every task's packer and the mix position, so it restores exactly like the untasked
one. Eval (:func:`eval_batches`): each task's eval documents packed on their own
(last row padded), the tasks' rows interleaved round-robin until all run out (tasks
without eval documents are left out); ``eval_batches(config, task=NAME)`` gives the
batches of one task of ``data.tasks`` (for per-task eval losses).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib
import io
import logging
import os
import pathlib
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np
import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

STDLIB = "stdlib"
PAD_ID = 0
EOS_ID = 1
BYTE_OFFSET = 2                      # byte b -> id b + 2
VALIDATION_PER_MILLE = 50            # 5% of the stdlib files go to validation
SPM_SAMPLE_CHARS = 4_000_000         # train-split characters to train SentencePiece on
_EXCLUDED_DIRS = frozenset({"site-packages", "__pycache__", "test", "tests", "idle_test"})
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=256)
# Per task (one reader per task): a row holds far less than a document, so a few do.
_TASK_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)


# ------------------------------------------------------------------------- data dir


def resolve_data_dir(data_cfg: Any) -> str:
    """``data.data_dir``, else ``$ROUTEZOO_DATA_DIR``, else ``~/tensorflow_datasets``."""
    data_dir = data_cfg.data_dir or os.environ.get("ROUTEZOO_DATA_DIR", "")
    return os.path.expanduser(data_dir or "~/tensorflow_datasets")


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    """Exclusive ``fcntl`` lock on ``path`` (created if missing), across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------ stdlib dataset


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


def _stdlib_tfds_name() -> str:
    return f"{RoutezooStdlib.name}/{_stdlib_config_name()}"


def _stdlib_builder(data_dir: str) -> RoutezooStdlib:
    return RoutezooStdlib(data_dir=data_dir, config=_stdlib_config_name(),
                          file_format="array_record")


def _build_stdlib(data_dir: str) -> None:
    """Prepares the stdlib dataset in ``data_dir`` unless it is there already.

    TFDS writes into a temporary directory and renames it when complete, so a prepared
    dataset is never partial; the lock makes concurrent callers build it only once.
    """
    if _stdlib_builder(data_dir).is_prepared():   # fast path, works on read-only dirs
        return
    with _file_lock(pathlib.Path(data_dir) / f"{RoutezooStdlib.name}.lock"):
        builder = _stdlib_builder(data_dir)
        if builder.is_prepared():
            return
        tfds.disable_progress_bar()
        with contextlib.redirect_stdout(io.StringIO()):   # TFDS's own banner
            builder.download_and_prepare()
        log.info("built %s in %s: %s", _stdlib_tfds_name(), data_dir, ", ".join(
            f"{name} {split.num_examples} files {int(split.num_bytes)} bytes"
            for name, split in sorted(builder.info.splits.items())))


# ------------------------------------------------------------------- named datasets


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
        _build_stdlib(data_dir)
    elif not known_dataset(data_cfg.name, data_dir):
        raise _unknown_dataset_error(data_cfg.name)
    return data_dir


def get_source(data_cfg: Any, split: str) -> Sequence[Any]:
    """The random-access TFDS data source of one split (records are feature dicts)."""
    data_dir = ensure_dataset(data_cfg)
    name = _stdlib_tfds_name() if data_cfg.name == STDLIB else data_cfg.name
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


def _text_key(data_cfg: Any) -> str:
    return "text" if data_cfg.name == STDLIB else data_cfg.text_key


# --------------------------------------------------------------------------- tasks

TASK_SAMPLING = ("uniform", "proportional")


def task_of_path(path: str) -> str | None:
    """The task of a stdlib file: its top-level package, the first component of a path in
    a subdirectory (``email/mime/text.py`` -> ``email``); None for a top-level module
    (``os.py``) and for a directory that is no package name (``config-3.11-x86_64-linux-gnu``)."""
    head, sep, _ = path.partition("/")
    return head if sep and head.isidentifier() else None


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a split: its name, its id (position in ``data.tasks``), the indices of
    its records in the split's source and its mixing weight."""

    name: str
    id: int
    indices: tuple[int, ...]
    weight: float = 1.0


# (data dir, dataset, split) -> (relative paths, UTF-8 text bytes) of the split's records
_SPLIT_FILES: dict[tuple[str, str, str], tuple[tuple[str, ...], tuple[int, ...]]] = {}


def _split_files(data_cfg: Any, split: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Paths and text sizes of a stdlib split's records, in source order (read once)."""
    key = (resolve_data_dir(data_cfg), _stdlib_tfds_name(), split)
    if key not in _SPLIT_FILES:
        source = get_source(data_cfg, split)
        records = [source[i] for i in range(len(source))]
        _SPLIT_FILES[key] = (
            tuple(_text_of(r, "path") for r in records),
            tuple(len(_text_of(r, "text").encode("utf-8")) for r in records))
    return _SPLIT_FILES[key]


def _require_stdlib(data_cfg: Any) -> None:
    if data_cfg.name != STDLIB:
        raise ValueError(f"data.tasks needs data.name='stdlib' (tasks are its top-level "
                         f"packages), got data.name={data_cfg.name!r}")


def _task_records(paths: Sequence[str]) -> dict[str, list[int]]:
    """Record indices per task name, in record order."""
    out: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        name = task_of_path(path)
        if name is not None:
            out.setdefault(name, []).append(i)
    return out


def available_tasks(data_cfg: Any, split: str | None = None) -> dict[str, int]:
    """``{task name: number of files}`` in ``split`` (default ``data.train_split``), sorted
    by name: the names ``data.tasks`` accepts (stdlib only)."""
    _require_stdlib(data_cfg)
    paths, _ = _split_files(data_cfg, split or data_cfg.train_split)
    return {name: len(idx) for name, idx in sorted(_task_records(paths).items())}


def task_names(data_cfg: Any) -> list[str]:
    """The checked names of ``data.tasks`` (task id = position); [] when it is empty."""
    spec = data_cfg.tasks.strip()
    if not spec:
        return []
    _require_stdlib(data_cfg)
    if data_cfg.task_sampling not in TASK_SAMPLING:
        raise ValueError(f"unknown data.task_sampling {data_cfg.task_sampling!r}; allowed: "
                         f"{', '.join(TASK_SAMPLING)}")
    names = [n.strip() for n in spec.split(",")]
    available = available_tasks(data_cfg)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))} in data.tasks; "
                         f"allowed (top-level stdlib packages): {', '.join(sorted(available))}")
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
    paths, sizes = _split_files(data_cfg, split)
    records = _task_records(paths)
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


# ---------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    """What the pipeline and the training loop use of a tokenizer."""

    vocab_size: int
    pad_id: int
    eos_id: int
    token_bytes: np.ndarray   # int32[vocab_size]: UTF-8 bytes per id, 0 for control ids

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def _as_ids(ids: Iterable[int]) -> np.ndarray:
    return np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), np.int64).ravel()


class ByteTokenizer:
    """UTF-8 bytes: pad 0, eos 1, byte b -> b + 2."""

    vocab_size = 256 + BYTE_OFFSET
    pad_id = PAD_ID
    eos_id = EOS_ID

    def __init__(self) -> None:
        self.token_bytes = np.array([0] * BYTE_OFFSET + [1] * 256, np.int32)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + BYTE_OFFSET

    def decode(self, ids: Iterable[int]) -> str:
        ids = _as_ids(ids)
        ids = ids[ids >= BYTE_OFFSET] - BYTE_OFFSET
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model trained (or expected) with pad 0, eos 1 and byte fallback."""

    def __init__(self, model_proto: bytes) -> None:
        import sentencepiece as spm
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = int(self._sp.vocab_size())
        self.pad_id = int(self._sp.pad_id())
        self.eos_id = int(self._sp.eos_id())
        if (self.pad_id, self.eos_id) != (PAD_ID, EOS_ID):
            raise ValueError(f"SentencePiece model must have pad_id={PAD_ID} and "
                             f"eos_id={EOS_ID}, got {self.pad_id} and {self.eos_id}")
        self.token_bytes = np.array([self._piece_bytes(i) for i in range(self.vocab_size)],
                                    np.int32)

    def _piece_bytes(self, i: int) -> int:
        sp = self._sp
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            return 0
        if sp.is_byte(i):
            return 1
        return len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        ids = _as_ids(ids)
        return self._sp.decode(ids[(ids != self.pad_id) & (ids != self.eos_id)].tolist())

    def __getstate__(self) -> dict[str, bytes]:   # picklable for grain worker processes
        return {"proto": self._proto}

    def __setstate__(self, state: dict[str, bytes]) -> None:
        self.__init__(state["proto"])


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> bytes:
    """Trains a unigram SentencePiece model on ``texts``; returns the model proto.

    Ids: pad 0, eos 1, unk 2, newline 3, then 256 byte-fallback pieces. Whitespace is
    kept as is (identity normalisation, no dummy prefix), so decode(encode(t)) == t.
    """
    import sentencepiece as spm
    lines = (line for text in texts for line in text.split("\n") if line)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, vocab_size=vocab_size,
        model_type="unigram", pad_id=PAD_ID, eos_id=EOS_ID, unk_id=2, bos_id=-1,
        user_defined_symbols=["\n"], byte_fallback=True, character_coverage=0.9995,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        num_threads=os.cpu_count() or 1, minloglevel=2)
    return model.getvalue()


def _sample_texts(source: Sequence[Any], text_key: str, max_chars: int) -> Iterator[str]:
    """Texts of a fixed pseudo-random order of ``source``, up to ``max_chars``."""
    order = grain.MapDataset.range(len(source)).shuffle(seed=0)
    total = 0
    for index in order:
        text = _text_of(source[index], text_key)
        yield text[: max_chars - total]
        total += len(text)
        if total >= max_chars:
            return


def _spm_cache_path(data_cfg: Any, data_dir: str) -> pathlib.Path:
    dataset = _stdlib_tfds_name() if data_cfg.name == STDLIB else data_cfg.name
    key = f"{dataset.replace('/', '_').replace(':', '_')}-{data_cfg.spm_vocab_size}"
    return pathlib.Path(data_dir) / "routezoo_spm" / f"{key}.model"


def _cached_spm_model(data_cfg: Any) -> bytes:
    """The SentencePiece model of this dataset and vocab size, trained on first use."""
    path = _spm_cache_path(data_cfg, ensure_dataset(data_cfg))
    if path.exists():
        return path.read_bytes()
    with _file_lock(path.with_suffix(".lock")):
        if not path.exists():
            source = get_source(data_cfg, data_cfg.train_split)
            texts = _sample_texts(source, _text_key(data_cfg), SPM_SAMPLE_CHARS)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(train_sentencepiece(texts, data_cfg.spm_vocab_size))
            tmp.rename(path)
            log.info("trained SentencePiece model %s", path)
    return path.read_bytes()


def get_tokenizer(data_cfg: Any) -> Tokenizer:
    if data_cfg.tokenizer == "byte":
        return ByteTokenizer()
    if data_cfg.tokenizer == "sentencepiece":
        if data_cfg.spm_model:
            return SentencePieceTokenizer(pathlib.Path(data_cfg.spm_model).read_bytes())
        return SentencePieceTokenizer(_cached_spm_model(data_cfg))
    raise ValueError(f"data.tokenizer={data_cfg.tokenizer!r}; allowed: byte | sentencepiece")


# ------------------------------------------------------------------------- packing


def _text_of(record: Any, text_key: str) -> str:
    value = record[text_key] if isinstance(record, Mapping) else record
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


class EncodeDocument:
    """record -> int32 token ids of its text followed by EOS (picklable grain map)."""

    def __init__(self, tokenizer: Tokenizer, text_key: str) -> None:
        self.tokenizer = tokenizer
        self.text_key = text_key

    def __call__(self, record: Any) -> np.ndarray:
        ids = self.tokenizer.encode(_text_of(record, self.text_key))
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


class _Subset:
    """The records ``indices`` of ``source``, as a random-access source (picklable)."""

    def __init__(self, source: Sequence[Any], indices: Sequence[int]) -> None:
        self.source, self.indices = source, tuple(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.source[self.indices[i]]


# ------------------------------------------------------------------------ pipelines


def _per_process_batch(batch_size: int, process_count: int) -> int:
    if batch_size % process_count:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by "
                         f"process_count={process_count}")
    return batch_size // process_count


def _process_shard(source: Sequence[Any], process_index: int,
                   process_count: int) -> grain.MapDataset:
    return grain.MapDataset.source(source)[process_index::process_count]


class TakeRows:
    """Keeps rows ``[index * n, (index + 1) * n)`` of a global batch (``rows`` sharding)."""

    def __init__(self, process_index: int, process_count: int) -> None:
        self.index, self.count = process_index, process_count

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = next(iter(batch.values())).shape[0] // self.count
        return {k: v[self.index * n:(self.index + 1) * n] for k, v in batch.items()}


PROCESS_SHARDING = ("rows", "documents")


def _check_sharding(sharding: str) -> None:
    if sharding not in PROCESS_SHARDING:
        raise ValueError(f"unknown data.process_sharding {sharding!r}; allowed: {', '.join(PROCESS_SHARDING)}")


def train_dataset(source: Sequence[Any], tokenizer: Tokenizer, *, text_key: str,
                  seq_len: int, batch_size: int, seed: int, shuffle: bool = True,
                  process_index: int = 0, process_count: int = 1,
                  num_workers: int = 0, process_sharding: str = "documents",
                  tasks: Sequence[Task] | None = None) -> grain.IterDataset:
    """The endless training dataset of one process; ``batch_size`` is per process.

    ``process_sharding='documents'``: this process packs its own share of documents.
    ``'rows'``: every process packs the same global stream of ``batch_size *
    process_count`` rows per batch and keeps its slice, so the global batches do not
    depend on the number of processes. ``tasks``: each task's records packed on their
    own, the tasks' rows mixed by their weights, batches with ``'task_id'`` (module
    docstring); None or empty: the untasked pipeline.
    """
    _check_sharding(process_sharding)
    by_rows = process_sharding == "rows" and process_count > 1
    if by_rows:
        return train_dataset(source, tokenizer, text_key=text_key, seq_len=seq_len,
                             batch_size=batch_size * process_count, seed=seed, shuffle=shuffle,
                             num_workers=num_workers, tasks=tasks,
                             ).map(TakeRows(process_index, process_count))
    if tasks:
        rows = _task_train_rows(source, tokenizer, tasks, text_key=text_key, seq_len=seq_len,
                                seed=seed, shuffle=shuffle, process_index=process_index,
                                process_count=process_count)
        batch_fn = MakeTaskBatch(batch_size, tokenizer.pad_id)
    else:
        rows = _packed_rows(_process_shard(source, process_index, process_count), tokenizer,
                            text_key=text_key, seq_len=seq_len, seed=seed, shuffle=shuffle,
                            read_options=_READ_OPTIONS,
                            empty=f"process {process_index} of {process_count} gets no documents "
                                  f"(the split has {len(source)})")
        batch_fn = MakeBatch(batch_size, tokenizer.pad_id)
    ds = rows.batch(batch_size, drop_remainder=True, batch_fn=batch_fn)
    if num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return ds


def _task_train_rows(source: Sequence[Any], tokenizer: Tokenizer, tasks: Sequence[Task], *,
                     text_key: str, seq_len: int, seed: int, shuffle: bool,
                     process_index: int, process_count: int) -> grain.IterDataset:
    """Endless rows ``{'tokens', 'task_id'}``: each task's share of documents shuffled,
    repeated and packed on its own, the tasks mixed by ``IterDataset.mix``."""
    parts = []
    for task in tasks:
        rows = _packed_rows(_process_shard(_Subset(source, task.indices), process_index, process_count),
                            tokenizer, text_key=text_key, seq_len=seq_len, seed=seed, shuffle=shuffle,
                            read_options=_TASK_READ_OPTIONS,
                            empty=f"process {process_index} of {process_count} gets no documents of task "
                                  f"{task.name!r} (it has {len(task.indices)} in the split)")
        parts.append(rows.map(TagTask(task.id)))
    return grain.IterDataset.mix(parts, [task.weight for task in tasks])


def _packed_rows(docs: grain.MapDataset, tokenizer: Tokenizer, *, text_key: str, seq_len: int, seed: int,
                 shuffle: bool, read_options: Any, empty: str) -> grain.IterDataset:
    """Endless rows of ``seq_len + 1`` tokens packed from ``docs`` (a process's share),
    shuffled (each epoch anew) and repeated; ``ValueError(empty)`` if there are none."""
    if len(docs) == 0:
        raise ValueError(empty)
    if shuffle:
        docs = docs.shuffle(seed=seed)
    docs = docs.repeat().map(EncodeDocument(tokenizer, text_key))
    return PackIterDataset(docs.to_iter_dataset(read_options), seq_len + 1, pad_id=tokenizer.pad_id)


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
    ds = train_dataset(
        get_source(d, d.train_split), get_tokenizer(d), text_key=_text_key(d),
        seq_len=d.seq_len, batch_size=_per_process_batch(config.train.batch_size,
                                                         process_count),
        seed=config.seed, shuffle=d.shuffle, process_index=process_index,
        process_count=process_count, num_workers=d.num_workers,
        process_sharding=d.process_sharding, tasks=tasks)
    return iter(ds)


class EvalBatches:
    """Re-iterable: every pass yields the same ``num_batches`` batches.

    ``process_sharding`` as in :func:`train_dataset`: ``rows`` packs the global eval stream
    on every process and keeps this process's rows of each batch.
    """

    def __init__(self, source: Sequence[Any], tokenizer: Tokenizer, *, text_key: str,
                 seq_len: int, batch_size: int, num_batches: int, process_index: int = 0,
                 process_count: int = 1, process_sharding: str = "documents") -> None:
        _check_sharding(process_sharding)
        self._take = None
        if process_sharding == "rows" and process_count > 1:
            self._take = TakeRows(process_index, process_count)
            batch_size, process_index, process_count = batch_size * process_count, 0, 1
        self._docs = _process_shard(source, process_index, process_count).map(
            EncodeDocument(tokenizer, text_key))
        self._seq_len = seq_len
        self._batch_size = batch_size
        self._num_batches = max(num_batches, 0)
        self._pad_id = tokenizer.pad_id

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        make_batch = MakeBatch(self._batch_size, self._pad_id)
        rows = PackIterDataset(self._docs.to_iter_dataset(_READ_OPTIONS), self._seq_len + 1,
                               pad_id=self._pad_id, pad_final=True)
        batches = iter(rows.batch(self._batch_size, batch_fn=make_batch))
        empty = make_batch([np.full(self._seq_len + 1, self._pad_id, np.int32)])
        for _ in range(self._num_batches):
            batch = next(batches, empty)
            yield self._take(batch) if self._take else batch


class TaskEvalBatches(EvalBatches):
    """Re-iterable eval batches with ``'task_id'``: each task's documents packed on their
    own (last row padded), the tasks' rows interleaved round-robin until all run out."""

    def __init__(self, source: Sequence[Any], tokenizer: Tokenizer, *, text_key: str,
                 seq_len: int, batch_size: int, num_batches: int, tasks: Sequence[Task],
                 process_index: int = 0, process_count: int = 1,
                 process_sharding: str = "documents") -> None:
        super().__init__(source, tokenizer, text_key=text_key, seq_len=seq_len,
                         batch_size=batch_size, num_batches=num_batches,
                         process_index=process_index, process_count=process_count,
                         process_sharding=process_sharding)
        if self._take is not None:   # rows: the global stream on every process
            process_index, process_count = 0, 1
        encode = EncodeDocument(tokenizer, text_key)
        self._task_docs = [
            (task.id, _process_shard(_Subset(source, task.indices), process_index,
                                     process_count).map(encode))
            for task in tasks]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        make_batch = MakeTaskBatch(self._batch_size, self._pad_id)
        rows = _round_robin([
            iter(PackIterDataset(docs.to_iter_dataset(_TASK_READ_OPTIONS), self._seq_len + 1,
                                 pad_id=self._pad_id, pad_final=True).map(TagTask(task_id)))
            for task_id, docs in self._task_docs if len(docs)])
        empty = make_batch([{"tokens": np.full(self._seq_len + 1, self._pad_id, np.int32),
                             "task_id": 0}])
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
    common = dict(text_key=_text_key(d), seq_len=d.seq_len,
                  batch_size=_per_process_batch(config.train.batch_size, process_count),
                  num_batches=config.train.eval_steps, process_index=process_index,
                  process_count=process_count, process_sharding=d.process_sharding)
    if not task_names(d):
        if task is not None:
            raise ValueError(f"eval_batches(task={task!r}) needs data.tasks, which is empty")
        return EvalBatches(get_source(d, d.eval_split), get_tokenizer(d), **common)
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
    return TaskEvalBatches(get_source(d, d.eval_split), get_tokenizer(d), tasks=with_docs,
                           **common)


# -------------------------------------------------------------------------- orbax


def iterator_save_args(it: grain.DatasetIterator) -> Any:
    """Orbax args that save ``it`` (each process writes ``process_<i>-of-<n>.json``)."""
    return grain.checkpoint.CheckpointSave(item=it)


def iterator_restore_args(it: grain.DatasetIterator) -> Any:
    """Orbax args that restore this process's saved state into ``it`` (in place)."""
    return grain.checkpoint.CheckpointRestore(item=it)
