"""Tokenizers: the :class:`Tokenizer` protocol, bytes and SentencePiece.

:func:`get_tokenizer`: ``byte`` (pad 0, eos 1, byte b -> b + 2, 258 ids) or
``sentencepiece`` (pad 0, eos 1, unk 2, byte fallback; loaded from ``data.spm_model`` or
trained once on a bounded sample of the train split, :data:`SPM_SAMPLE_CHARS`
characters, and cached in the data dir). ``token_bytes[id]`` is the number of UTF-8
bytes a token stands for (0 for pad, eos and other control ids), for bits per byte =
sum NLL / ln 2 / sum token_bytes[targets].
"""

from __future__ import annotations

import io
import logging
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import grain
import numpy as np

from routezoo.training.data.sources import ensure_dataset, get_source, text_key_of, text_of
from routezoo.training.data.stdlib import STDLIB, file_lock, stdlib_tfds_name

log = logging.getLogger(__name__)

PAD_ID = 0
EOS_ID = 1
BYTE_OFFSET = 2                      # byte b -> id b + 2
SPM_SAMPLE_CHARS = 4_000_000         # train-split characters to train SentencePiece on


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
        text = text_of(source[index], text_key)
        yield text[: max_chars - total]
        total += len(text)
        if total >= max_chars:
            return


def _spm_cache_path(data_cfg: Any, data_dir: str) -> pathlib.Path:
    dataset = stdlib_tfds_name() if data_cfg.name == STDLIB else data_cfg.name
    key = f"{dataset.replace('/', '_').replace(':', '_')}-{data_cfg.spm_vocab_size}"
    return pathlib.Path(data_dir) / "routezoo_spm" / f"{key}.model"


def _cached_spm_model(data_cfg: Any) -> bytes:
    """The SentencePiece model of this dataset and vocab size, trained on first use."""
    path = _spm_cache_path(data_cfg, ensure_dataset(data_cfg))
    if path.exists():
        return path.read_bytes()
    with file_lock(path.with_suffix(".lock")):
        if not path.exists():
            source = get_source(data_cfg, data_cfg.train_split)
            texts = _sample_texts(source, text_key_of(data_cfg), SPM_SAMPLE_CHARS)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(train_sentencepiece(texts, data_cfg.spm_vocab_size))
            tmp.rename(path)
            log.info("trained SentencePiece model %s", path)
    return path.read_bytes()


def get_tokenizer(data_cfg: Any) -> Tokenizer:
    """The tokenizer ``data.tokenizer`` names (module docstring)."""
    if data_cfg.tokenizer == "byte":
        return ByteTokenizer()
    if data_cfg.tokenizer == "sentencepiece":
        if data_cfg.spm_model:
            return SentencePieceTokenizer(pathlib.Path(data_cfg.spm_model).read_bytes())
        return SentencePieceTokenizer(_cached_spm_model(data_cfg))
    raise ValueError(f"data.tokenizer={data_cfg.tokenizer!r}; allowed: byte | sentencepiece")

