"""Every file the Hugging Face conversion reads or writes: safetensors shards, their
index, ``config.json`` (and a converted directory's ``hf_config.json``), and the
tokenizer files a checkpoint carries (:func:`copy_tokenizer`).

safetensors files are opened lazily; bfloat16/float8 tensors, which numpy cannot name,
are read through a memory map of the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, Callable

import jax
import numpy as np

from routezoo.zoo.hf.registry import HFError

HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
RZ_HF_CONFIG = "hf_config.json"          # converted dir: the original HF config
RZ_INDEX = "params.safetensors.index.json"
RZ_SINGLE = "params.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 2 ** 30

_RAW_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class Reader:
    """Lazy reader of a set of safetensors files (an index with its shards, or one file).

    Args:
      directory: the checkpoint directory.
      index_name: the index file's name (read when present).
      single_name: the one file's name (read when there is no index).
    """

    def __init__(self, directory: str, index_name: str, single_name: str):
        from safetensors import safe_open

        self.directory = directory
        index_path = os.path.join(directory, index_name)
        single_path = os.path.join(directory, single_name)
        if os.path.exists(index_path):
            try:
                with open(index_path) as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise HFError(f"{index_path} is not a safetensors index (JSON with a weight_map): "
                              f"{' '.join(str(e).split())}") from None
            for file in sorted(set(weight_map.values())):
                if not os.path.exists(os.path.join(directory, file)):
                    users = sorted(n for n, f in weight_map.items() if f == file)
                    raise FileNotFoundError(
                        f"shard file {file!r} listed in {index_path} is missing (it holds "
                        f"{len(users)} tensors, e.g. {users[0]!r})")
        elif os.path.exists(single_path):
            weight_map = None
        else:
            found = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".safetensors")))
            raise FileNotFoundError(f"no {single_name} or {index_name} in {directory}"
                                    + (f" (found {', '.join(found[:5])}; only safetensors is read)" if found else ""))
        self._stack = contextlib.ExitStack()
        self._files: dict[str, Any] = {}
        self._headers: dict[str, dict] = {}
        files = sorted(set(weight_map.values())) if weight_map else [single_name]
        self.location: dict[str, str] = {}
        for file in files:
            path = os.path.join(directory, file)
            try:
                handle = self._stack.enter_context(safe_open(path, framework="numpy"))
            except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (no OSError)
                self._stack.close()
                raise HFError(f"{path} ({os.path.getsize(path) if os.path.exists(path) else 0} bytes) is not a "
                              f"readable safetensors file: {' '.join(str(e).split())}; it may be truncated "
                              "or damaged: copy or download it again") from None
            self._files[file] = handle
            for name in handle.keys():
                self.location[name] = file
        if weight_map:
            missing = sorted(n for n in weight_map if n not in self.location)
            if missing:
                raise HFError(f"tensor {missing[0]!r} is listed in {index_name} for "
                              f"{weight_map[missing[0]]!r} but that file does not hold it")

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def names(self) -> list[str]:
        """The names of all tensors of the checkpoint."""
        return list(self.location)

    def _slice(self, name: str):
        if name not in self.location:
            raise HFError(f"tensor {name!r} is missing from the checkpoint in {self.directory}")
        return self._files[self.location[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name``."""
        return tuple(self._slice(name).get_shape())

    def get(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The block ``index`` (one slice per dim) of tensor ``name``, read from disk."""
        sl = self._slice(name)
        if sl.get_dtype() in _RAW_DTYPES:
            return np.asarray(self._raw(name)[index])
        return np.asarray(sl[index])

    def _raw(self, name: str) -> np.ndarray:
        """A read-only memory map of a tensor whose dtype numpy cannot name (bfloat16, ...)."""
        import ml_dtypes

        file = os.path.join(self.directory, self.location[name])
        if file not in self._headers:
            with open(file, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                self._headers[file] = {"__start__": 8 + n, **json.loads(fh.read(n))}
        header = self._headers[file]
        info = header[name]
        b, e = info["data_offsets"]
        dtype = np.dtype(getattr(ml_dtypes, _RAW_DTYPES[info["dtype"]]))
        raw = np.memmap(file, dtype=np.uint8, mode="r", offset=header["__start__"] + b, shape=(e - b,))
        return raw.view(dtype).reshape(info["shape"])


def hf_reader(directory: str) -> Reader:
    """A :class:`Reader` of an HF checkpoint directory (``model*.safetensors``)."""
    return Reader(directory, HF_INDEX, HF_SINGLE)


def converted_reader(directory: str) -> Reader:
    """A :class:`Reader` of a converted routezoo directory (``params*.safetensors``)."""
    return Reader(directory, RZ_INDEX, RZ_SINGLE)


def hf_tensor_names(directory: str) -> set[str]:
    """The names of the tensors of the HF checkpoint in ``directory``."""
    with hf_reader(directory) as reader:
        return set(reader.names())


def read_configs(path: str) -> tuple[dict, dict | None]:
    """The configs of a checkpoint directory.

    Args:
      path: an HF checkpoint directory or a converted routezoo directory.

    Returns:
      ``(config.json, hf_config.json)``: the second is ``None`` unless ``path`` is a
      converted directory (its ``config.json`` a routezoo config with a ``model`` section).
    """
    cfg_path = os.path.join(path, HF_CONFIG)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: not a Hugging Face checkpoint directory")
    cfg = _read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise HFError(f"{cfg_path} holds a JSON {type(cfg).__name__}, not a checkpoint config (an object)")
    if isinstance(cfg.get("model"), dict) and os.path.exists(os.path.join(path, RZ_HF_CONFIG)):
        return cfg, _read_json(os.path.join(path, RZ_HF_CONFIG))
    return cfg, None


def _read_json(path: str) -> Any:
    """A JSON file; a file that does not parse is an :class:`HFError` naming it."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except ValueError as e:
        raise HFError(f"{path} is not valid JSON ({e})") from None


def make_dir(path: str) -> None:
    """Creates ``path`` (and its parents) if absent."""
    os.makedirs(path, exist_ok=True)


def write_hf_config(directory: str, hf_cfg: dict) -> None:
    """Writes ``config.json`` of an HF checkpoint (process 0 only).

    Args:
      directory: the checkpoint directory.
      hf_cfg: the HF config dict.
    """
    if jax.process_index() == 0:
        with open(os.path.join(directory, HF_CONFIG), "w") as fh:
            json.dump(hf_cfg, fh, indent=2, sort_keys=True)


def write_converted_configs(directory: str, config_text: str, hf_cfg: dict) -> None:
    """Writes ``config.json`` (a routezoo config, as text) and ``hf_config.json`` of a converted directory.

    Args:
      directory: the converted directory.
      config_text: the routezoo config's JSON.
      hf_cfg: the original HF config dict.
    """
    with open(os.path.join(directory, HF_CONFIG), "w") as fh:
        fh.write(config_text)
    with open(os.path.join(directory, RZ_HF_CONFIG), "w") as fh:
        json.dump(hf_cfg, fh, indent=2, sort_keys=True)


def write_shards(directory: str, tensors: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]],
                 index_name: str, single_name: str, max_shard_bytes: int, itemsize: Callable[[str], int]
                 ) -> list[str]:
    """Writes tensors into safetensors shards, one tensor in memory at a time per shard being written.

    Args:
      directory: where to write.
      tensors: ``(name, shape, get)``, in file order; ``get()`` gives the array.
      index_name: the index file (written when there is more than one shard, removed otherwise).
      single_name: the file name of one shard; ``stem-0000i-of-0000n.ext`` for several.
      max_shard_bytes: the size at which a new shard starts.
      itemsize: bytes per element of a tensor, by name.

    Returns:
      The shard file names.
    """
    from safetensors.numpy import save_file

    groups: list[list] = [[]]
    size = 0
    for item in tensors:
        nbytes = math.prod(item[1]) * itemsize(item[0])
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += nbytes
    stem, ext = os.path.splitext(single_name)
    names = ([single_name] if len(groups) == 1 else
             [f"{stem}-{i + 1:05d}-of-{len(groups):05d}{ext}" for i in range(len(groups))])
    weight_map, total = {}, 0
    is_main = jax.process_index() == 0
    for file, group in zip(names, groups):
        arrays = {}
        for name, _, get in group:
            arrays[name] = get()
            total += arrays[name].nbytes
            weight_map[name] = file
        if is_main:
            save_file(arrays, os.path.join(directory, file), metadata={"format": "pt"})
        del arrays
    for stale in (index_name,):
        if is_main and len(names) == 1 and os.path.exists(os.path.join(directory, stale)):
            os.remove(os.path.join(directory, stale))
    if is_main and len(names) > 1:
        with open(os.path.join(directory, index_name), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                      fh, indent=2)
    return names


# What a Hugging Face checkpoint keeps of its tokenizer (transformers' AutoTokenizer reads them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer(source: str, out_dir: str) -> list[str]:
    """Copies a tokenizer into ``out_dir`` (process 0 writes): from a directory, those of
    :data:`TOKENIZER_FILES` it holds; a file is copied as ``tokenizer.json`` (transformers
    then reads the special tokens from it). Returns the names written."""
    import shutil
    if os.path.isdir(source):
        pairs = [(os.path.join(source, n), n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]
    elif os.path.isfile(source):
        pairs = [(source, "tokenizer.json")]
    else:
        raise HFError(f"tokenizer {source}: no such file or directory")
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        for src, name in pairs:
            shutil.copyfile(src, os.path.join(out_dir, name))
    return [name for _, name in pairs]


# peft adapter directories (huggingface/peft's PeftModel.save_pretrained layout; routezoo.zoo.hf.peft)
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_INDEX = "adapter_model.safetensors.index.json"


def read_peft_config(directory: str) -> dict:
    """``adapter_config.json`` of a peft adapter directory; one-line errors when it is absent or not a JSON object."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"peft adapter {directory} is not a directory")
    path = os.path.join(directory, PEFT_CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: a peft adapter directory holds {PEFT_CONFIG} and {PEFT_WEIGHTS} "
                                "(PeftModel.save_pretrained)")
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise HFError(f"{path} holds a JSON {type(cfg).__name__}, not a peft config (an object)")
    return cfg


def peft_reader(directory: str) -> Reader:
    """A :class:`Reader` of a peft adapter's ``adapter_model.safetensors``."""
    return Reader(directory, PEFT_INDEX, PEFT_WEIGHTS)


def write_peft_dir(directory: str, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """Writes a peft adapter directory (process 0): ``adapter_model.safetensors`` and
    ``adapter_config.json``, each written under a temporary name and renamed into place.

    Args:
      directory: the directory (created if absent).
      config: the ``adapter_config.json`` dict.
      tensors: ``{name: array}``.
    """
    from safetensors.numpy import save_file

    if jax.process_index() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    weights, cfg = os.path.join(directory, PEFT_WEIGHTS), os.path.join(directory, PEFT_CONFIG)
    save_file(tensors, weights + ".tmp", metadata={"format": "pt"})
    with open(cfg + ".tmp", "w") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
    os.replace(weights + ".tmp", weights)
    os.replace(cfg + ".tmp", cfg)
