"""The reversible mapping between routezoo parameters and Hugging Face tensors.

Each routezoo parameter is a :class:`TensorMap` of one HF tensor (or one per expert,
stacked on a leading ``E`` axis): the HF tensor is reshaped to its ``split`` dims and
transposed by ``perm``; export applies the inverse. Nothing here touches files: reading
goes through any object with ``get(name, index) -> np.ndarray``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Protocol

import numpy as np


class TensorSource(Protocol):
    """Where :meth:`TensorMap.read` takes HF tensors from."""

    def get(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The block ``index`` (one slice per dim) of HF tensor ``name``."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One routezoo parameter from one HF tensor, or one per expert stacked on axis 0.

    The HF tensor (shape ``prod(g) for g in split``) is reshaped to the flattened ``split``
    dims and transposed by ``perm``: ``target = hf.reshape(split dims).transpose(perm)``.

    Attributes:
      path: the parameter's path in the params tree.
      hf: HF tensor names (one, or one per expert when ``stacked``).
      split: the factors of each HF dim.
      perm: the order of the split dims in the target.
      stacked: the HF tensors stack on a leading axis of the target.
    """

    path: tuple[str, ...]
    hf: tuple[str, ...]
    split: tuple[tuple[int, ...], ...]
    perm: tuple[int, ...]
    stacked: bool = False

    @property
    def split_dims(self) -> tuple[int, ...]:
        """The split dims, flattened (the axes ``perm`` orders)."""
        return tuple(s for group in self.split for s in group)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """The shape of each HF tensor."""
        return tuple(math.prod(g) for g in self.split)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the routezoo parameter."""
        inner = tuple(self.split_dims[p] for p in self.perm)
        return ((len(self.hf),) + inner) if self.stacked else inner

    def read(self, reader: TensorSource, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The target-layout block ``index``, reading only the HF rows (and experts) it needs.

        Args:
          reader: gives HF tensor blocks.
          index: a tuple of slices in the target layout; ``None``: all of it.

        Returns:
          The block.
        """
        bounds = block_bounds(index, self.shape)
        if self.stacked:
            (e0, e1), rest = bounds[0], bounds[1:]
            return np.stack([self._read_one(reader, self.hf[e], rest) for e in range(e0, e1)])
        return self._read_one(reader, self.hf[0], bounds)

    def _read_one(self, reader: TensorSource, name: str, bounds: list[tuple[int, int]]) -> np.ndarray:
        split_bounds: list[tuple[int, int]] = [(0, 0)] * len(self.split_dims)
        for t, p in enumerate(self.perm):
            split_bounds[p] = bounds[t]
        hf_index, block_shape, post, j = [], [], [], 0
        for group in self.split:
            inner = math.prod(group[1:])
            a0, a1 = split_bounds[j]
            # Outer split dim: a contiguous row range of the HF dim; inner ones sliced after.
            hf_index.append(slice(a0 * inner, a1 * inner))
            block_shape += [a1 - a0, *group[1:]]
            post.append(slice(None))
            post += [slice(*split_bounds[j + q]) for q in range(1, len(group))]
            j += len(group)
        block = reader.get(name, tuple(hf_index)).reshape(block_shape)[tuple(post)]
        return block.transpose(self.perm)

    def to_hf(self, value: np.ndarray) -> Iterable[tuple[str, np.ndarray]]:
        """The HF tensors of a full target-layout ``value``.

        Args:
          value: the parameter.

        Returns:
          ``(HF name, HF-layout array)`` pairs.
        """
        inv = tuple(np.argsort(self.perm))
        values = list(value) if self.stacked else [value]
        for name, v in zip(self.hf, values):
            yield name, np.ascontiguousarray(np.asarray(v).transpose(inv).reshape(self.hf_shape))


def block_bounds(index: tuple[slice, ...] | None, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """``(start, stop)`` per dim of a block of an array of ``shape``.

    Args:
      index: slices (fewer than dims: the rest whole), or ``None`` for the whole array.
      shape: the array's shape.

    Returns:
      One pair per dim; ``ValueError`` for a strided slice.
    """
    if index is None:
        return [(0, n) for n in shape]
    out = []
    for s, n in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {s} is not supported")
        out.append((start, stop))
    return out


def identity(path: tuple[str, ...], name: str, shape: tuple[int, ...]) -> TensorMap:
    """A parameter stored as it is.

    Args:
      path: the parameter's path.
      name: the HF tensor.
      shape: the shape of both.

    Returns:
      The map.
    """
    return TensorMap(path, (name,), tuple((n,) for n in shape), tuple(range(len(shape))))


def linear(path: tuple[str, ...], name: str, out_dim: int, in_dim: int) -> TensorMap:
    """A kernel ``[in, out]`` from a torch Linear weight ``[out, in]``.

    Args:
      path: the parameter's path.
      name: the HF tensor.
      out_dim: output features.
      in_dim: input features.

    Returns:
      The map.
    """
    return TensorMap(path, (name,), ((out_dim,), (in_dim,)), (1, 0))


def stacked_linear(path: tuple[str, ...], names: Iterable[str], out_dim: int, in_dim: int) -> TensorMap:
    """Expert kernels ``[E, in, out]`` from one torch Linear weight ``[out, in]`` per expert.

    Args:
      path: the parameter's path.
      names: the HF tensors, expert by expert.
      out_dim: output features.
      in_dim: input features.

    Returns:
      The map.
    """
    return TensorMap(path, tuple(names), ((out_dim,), (in_dim,)), (1, 0), stacked=True)


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """``{path: leaf}`` of a nested params dict.

    Args:
      tree: the nested dict.
      prefix: path of ``tree`` itself.

    Returns:
      The flat dict.
    """
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    """The nested dict of ``{path: leaf}`` (inverse of :func:`flatten`).

    Args:
      flat: the flat dict.

    Returns:
      The nested dict.
    """
    out: dict = {}
    for path, value in flat.items():
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out
