"""Tokenizers: the :class:`Tokenizer` protocol, bytes and SentencePiece.

:func:`get_tokenizer`: ``byte`` (pad 0, eos 1, byte b -> b + 2, 258 ids) or
``sentencepiece`` (pad 0, eos 1, unk 2, byte fallback; loaded from ``data.spm_model`` or
trained once on a bounded sample of the train split, :data:`SPM_SAMPLE_CHARS`
characters, and cached in the data dir) or ``hf`` (:class:`HFTokenizer`: a Hugging Face
``tokenizer.json`` at ``data.tokenizer_path``, a file or a checkpoint directory holding
one). ``auto`` (the default) is ``hf`` from ``init.from_hf``'s directory when it holds a
``tokenizer.json`` (:func:`resolve_tokenizer`), else ``byte``. ``token_bytes[id]`` is the
number of UTF-8 bytes a token stands for (0 for pad, eos and other control ids), for
bits per byte = sum NLL / ln 2 / sum token_bytes[targets].
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import pathlib
import re
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
TOKENIZERS = ("auto", "byte", "sentencepiece", "hf")   # values of data.tokenizer
HF_TOKENIZER_FILE = "tokenizer.json"


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


def _stream_texts(stream: Any, max_chars: int) -> Iterator[str]:
    """Texts of a :class:`~routezoo.training.data.sources.DocumentStream` in file order, up to ``max_chars``."""
    total = 0
    for text in stream.documents(process_index=0, process_count=1, seed=0, shuffle=False, repeat=False):
        text = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
        yield text[: max_chars - total]
        total += len(text)
        if total >= max_chars:
            return


def _spm_cache_path(data_cfg: Any, data_dir: str) -> pathlib.Path:
    dataset = stdlib_tfds_name() if data_cfg.name == STDLIB else data_cfg.name
    if data_cfg.name == "files":   # the file list names the corpus
        import hashlib
        from routezoo.training.data.files import expand_files
        dataset = "files_" + hashlib.blake2b("\n".join(expand_files(data_cfg.files)).encode(), digest_size=8).hexdigest()
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
            texts = (_stream_texts(source, SPM_SAMPLE_CHARS) if hasattr(source, "documents")
                     else _sample_texts(source, text_key_of(data_cfg), SPM_SAMPLE_CHARS))
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(train_sentencepiece(texts, data_cfg.spm_vocab_size))
            tmp.rename(path)
            log.info("trained SentencePiece model %s", path)
    return path.read_bytes()


def _byte_level_chars() -> dict[str, int]:
    """Character -> byte of the byte-level BPE alphabet (GPT-2 and its successors).

    Bytes that are printable Latin-1 characters stand for themselves; the other 68
    bytes, in increasing order, take the characters from U+0100 upwards.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_FALLBACK_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Token strings looked for among a tokenizer's special tokens when neither
# tokenizer_config.json nor config.json names an id.
_SPECIAL_CANDIDATES = {
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]"),
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]"),
    "pad": ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>"),
}


def _components(node: Any, kind: str) -> list[dict]:
    """The ``kind`` entries of a tokenizer.json pipeline stage (nested Sequences too)."""
    if not isinstance(node, dict):
        return []
    found = [node] if node.get("type") == kind else []
    for key in ("pretokenizers", "decoders", "normalizers", "processors"):
        for child in node.get(key) or ():
            found += _components(child, kind)
    return found


def hf_tokenizer_file(path: str) -> pathlib.Path | None:
    """``path`` itself when it is a file, ``path/tokenizer.json`` when that exists, else None."""
    p = pathlib.Path(path)
    if p.is_file():
        return p
    if (p / HF_TOKENIZER_FILE).is_file():
        return p / HF_TOKENIZER_FILE
    return None


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer (a ``tokenizer.json``).

    Special ids: ``eos_id``, ``bos_id`` and ``pad_id`` come from the checkpoint
    directory's ``tokenizer_config.json`` (``eos_token``, ``bos_token``, ``pad_token``:
    token strings, looked up in the vocabulary), else its ``config.json``
    (``eos_token_id``, ``bos_token_id``, ``pad_token_id``; a list of eos ids gives its
    first), else the tokenizer's own special tokens with a usual name (``</s>``,
    ``<|endoftext|>``, ``<pad>``, ...). A tokenizer without an end-of-text token is
    refused. Without a pad token, ``pad_id`` is ``eos_id``: padding stays out of the
    loss (weights are ``targets != pad_id``), and so do the end-of-document targets,
    which the model then is not trained to predict (they count 0 bytes, so bits per
    byte only loses their NLL).

    :meth:`encode` runs the tokenizer's post-processor: what it puts before the text
    (e.g. Llama's BOS) is kept; an eos it puts after the text is dropped, since the
    pipeline appends one eos to every document.

    ``token_bytes``: byte-level BPE vocabularies (a ``ByteLevel`` pre-tokenizer or
    decoder) count each character through the inverse of the byte-to-character table;
    byte-fallback pieces ``<0xAB>`` count 1; other pieces count their UTF-8 length with
    the Metaspace replacement (``▁``) as a space and WordPiece's continuation prefix
    removed; special tokens and the unknown token count 0; other added tokens count
    their content's UTF-8 length. A Metaspace tokenizer that prepends ``▁`` to the text
    (``prepend_scheme`` ``first``/``always``) counts that space as one byte of the first
    word, once per document.

    Args:
      tokenizer_file: the ``tokenizer.json``.
      config_dir: the directory to read ``tokenizer_config.json`` / ``config.json`` from
        (default: the file's directory).
    """

    def __init__(self, tokenizer_file: str | os.PathLike, config_dir: str | os.PathLike | None = None) -> None:
        from tokenizers import Tokenizer as _Tokenizer
        self.path = str(tokenizer_file)
        self._tok = _Tokenizer.from_file(self.path)
        self._info = json.loads(self._tok.to_str())
        added = {int(a["id"]): a for a in self._info.get("added_tokens") or ()}
        self.vocab_size = max([self._tok.get_vocab_size(with_added_tokens=True), *(i + 1 for i in added)])
        directory = pathlib.Path(config_dir) if config_dir is not None else pathlib.Path(self.path).parent
        ids = self._special_ids(directory, added)
        if ids["eos"] is None:
            raise ValueError(f"Hugging Face tokenizer {self.path} has no end-of-text token; set eos_token in "
                             f"{directory / 'tokenizer_config.json'} (or eos_token_id in config.json)")
        self.eos_id = ids["eos"]
        self.bos_id = ids["bos"]
        self.pad_id = ids["eos"] if ids["pad"] is None else ids["pad"]
        self.token_bytes = self._token_bytes(added)
        self.chat_template = self._chat_template(directory)
        # what chat templates call the special tokens (bos_token, eos_token, ...)
        self.special_tokens = {f"{kind}_token": self._tok.id_to_token(i) or ""
                               for kind, i in (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id))
                               if i is not None}

    def _chat_template(self, directory: pathlib.Path) -> str | None:
        """The checkpoint's chat template: ``chat_template.jinja``, else ``tokenizer_config.json``'s
        ``chat_template`` (a string, or a list of named templates: the one named ``default``)."""
        jinja = directory / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        f = directory / "tokenizer_config.json"
        try:
            template = json.loads(f.read_text()).get("chat_template") if f.is_file() else None
        except (OSError, ValueError):
            return None
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        return template if isinstance(template, str) and template else None

    # ------------------------------------------------------------------ special ids
    def _id_of(self, token: Any) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        if not isinstance(token, str):
            return None
        i = self._tok.token_to_id(token)
        return None if i is None else int(i)

    def _special_ids(self, directory: pathlib.Path, added: dict[int, dict]) -> dict[str, int | None]:
        def read(name: str) -> dict:
            f = directory / name
            if not f.is_file():
                return {}
            try:
                return json.loads(f.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"{f}: not readable as JSON ({e})") from None

        tok_cfg, model_cfg = read("tokenizer_config.json"), read("config.json")
        specials = {a["content"] for a in added.values() if a.get("special")}
        out: dict[str, int | None] = {}
        for kind, candidates in _SPECIAL_CANDIDATES.items():
            found = self._id_of(tok_cfg.get(f"{kind}_token"))
            if found is None:
                value = model_cfg.get(f"{kind}_token_id")
                if isinstance(value, list):
                    value = value[0] if value else None
                if isinstance(value, int) and 0 <= value < self.vocab_size:
                    found = value
            if found is None:
                found = next((self._id_of(c) for c in candidates if c in specials), None)
            out[kind] = found
        return out

    # ------------------------------------------------------------------ token bytes
    def _token_bytes(self, added: dict[int, dict]) -> np.ndarray:
        info = self._info
        model = info.get("model") or {}
        stages = [info.get(k) for k in ("pre_tokenizer", "decoder", "normalizer")]
        byte_level = any(_components(st, "ByteLevel") for st in stages)
        replacements = {m.get("replacement", "\u2581") for st in stages for m in _components(st, "Metaspace")}
        replacements.add("\u2581")
        byte_fallback = bool(model.get("byte_fallback", False))
        prefix = model.get("continuing_subword_prefix") or "" if model.get("type") == "WordPiece" else ""
        unk = model.get("unk_token")
        unk_id = model.get("unk_id") if model.get("type") == "Unigram" else self._id_of(unk)
        chars = _byte_level_chars() if byte_level else {}
        out = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if i in added:
                a = added[i]
                out[i] = 0 if a.get("special") else len(a["content"].encode("utf-8"))
                continue
            piece = self._tok.id_to_token(i)
            if piece is None or i == unk_id:
                continue
            if byte_fallback and _BYTE_FALLBACK_PIECE.fullmatch(piece):
                out[i] = 1
            elif byte_level:
                out[i] = sum(1 if c in chars else len(c.encode("utf-8")) for c in piece)
            else:
                if prefix and piece.startswith(prefix):
                    piece = piece[len(prefix):]
                for r in replacements:
                    piece = piece.replace(r, " ")
                out[i] = len(piece.encode("utf-8"))
        return out

    # ------------------------------------------------------------------ protocol
    def encode(self, text: str) -> np.ndarray:
        enc = self._tok.encode(text)
        ids = enc.ids
        if ids and ids[-1] == self.eos_id and enc.special_tokens_mask[-1]:
            ids = ids[:-1]
        return np.asarray(ids, np.int32)

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Ids of ``text`` without the tokenizer's own special tokens (a chat template
        writes them) and the character offset where each token starts."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return np.asarray(enc.ids, np.int32), np.asarray([a for a, _ in enc.offsets], np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        ids = _as_ids(ids)
        ids = ids[(ids != self.pad_id) & (ids != self.eos_id)]
        return self._tok.decode(ids.tolist(), skip_special_tokens=True)


@functools.lru_cache(maxsize=8)
def _cached_hf_tokenizer(path: str, mtime: float) -> HFTokenizer:
    del mtime   # part of the key only: a rewritten file is read again
    found = hf_tokenizer_file(path)
    if found is None:
        raise ValueError(f"data.tokenizer_path {path!r} is neither a {HF_TOKENIZER_FILE} file nor a "
                         f"directory holding one")
    return HFTokenizer(found, path if pathlib.Path(path).is_dir() else None)


def load_hf_tokenizer(path: str) -> HFTokenizer:
    """The :class:`HFTokenizer` of ``path`` (a ``tokenizer.json`` or a directory holding one;
    special ids from that directory), cached per path while the file is unchanged.

    Raises:
      ValueError: no ``tokenizer.json`` at ``path``, or one without an end-of-text token.
    """
    if not path:
        raise ValueError("data.tokenizer='hf' needs data.tokenizer_path: a tokenizer.json file or a "
                         "directory holding one")
    found = hf_tokenizer_file(path)
    return _cached_hf_tokenizer(str(path), found.stat().st_mtime if found else 0.0)


def tokenizer_choice(config: Any) -> tuple[str, str]:
    """``(kind, path)`` of the run's tokenizer, with ``auto`` decided.

    ``auto``: ``('hf', init.from_hf)`` when ``init.from_hf`` is a directory holding a
    ``tokenizer.json``, else ``('byte', '')``. Other kinds come back as set, with
    ``data.tokenizer_path``.
    """
    d = config.data
    kind, path = str(d.tokenizer), str(d.get("tokenizer_path", ""))
    if kind != "auto":
        return kind, path
    init = config.get("init", None)
    from_hf = str(init.get("from_hf", "")) if init is not None else ""
    if from_hf and os.path.isdir(from_hf) and hf_tokenizer_file(from_hf) is not None:
        return "hf", from_hf
    return "byte", ""


def resolve_tokenizer(config: Any) -> list[str]:
    """Replaces ``data.tokenizer='auto'`` by what it stands for when that is a Hugging Face
    checkpoint's tokenizer (:func:`tokenizer_choice`), so the data stack, which sees
    ``config.data`` only, uses it. Idempotent.

    Args:
      config: the run config (changed in place).

    Returns:
      The ``data.KEY=value`` changes.
    """
    kind, path = tokenizer_choice(config)
    if config.data.tokenizer != "auto" or kind != "hf":
        return []
    config.data.tokenizer, config.data.tokenizer_path = kind, path
    return [f"data.tokenizer={kind!r}", f"data.tokenizer_path={path!r}"]


def get_tokenizer(data_cfg: Any) -> Tokenizer:
    """The tokenizer ``data.tokenizer`` names (module docstring); ``auto`` not resolved by
    :func:`resolve_tokenizer` is ``byte``."""
    if data_cfg.tokenizer in ("byte", "auto"):
        return ByteTokenizer()
    if data_cfg.tokenizer == "sentencepiece":
        if data_cfg.spm_model:
            return SentencePieceTokenizer(pathlib.Path(data_cfg.spm_model).read_bytes())
        return SentencePieceTokenizer(_cached_spm_model(data_cfg))
    if data_cfg.tokenizer == "hf":
        return load_hf_tokenizer(str(data_cfg.get("tokenizer_path", "")))
    raise ValueError(f"unknown data.tokenizer {data_cfg.tokenizer!r}; allowed: {', '.join(TOKENIZERS)}")
