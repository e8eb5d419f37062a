"""The mapping between a Hugging Face ``config.json`` and routezoo's ``config.model``,
through the family registry (each family holds its own rules and refusals)."""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from routezoo.zoo.hf.registry import (FAMILIES, MODEL_ARCH_KEYS, MOE_ARCH_KEYS, Family, HFError, claimant,
                                      default_model_config, family_named, family_of, ffn_kinds,
                                      supported_architectures)
from routezoo.zoo.hf.tensor_map import TensorMap


def model_config_from_hf(hf: Mapping[str, Any], *, dtype: str = "float32",
                         param_dtype: str = "float32") -> ml_collections.ConfigDict:
    """A complete ``config.model`` for an HF ``config.json`` dict.

    The schema's defaults (``configs/base.py``) with the architecture from the checkpoint,
    the family's routing (dropless for decoders) and the checkpoint's router loss coefficients.

    Args:
      hf: the HF config dict.
      dtype: ``model.dtype``.
      param_dtype: ``model.param_dtype``.

    Returns:
      The model config; :class:`HFError` for settings the zoo model cannot reproduce.
    """
    return family_of(hf).config_from_hf(hf, dtype=dtype, param_dtype=param_dtype)


def infer_architecture(m: Any) -> str:
    """The HF architecture a routezoo ``config.model`` exports to.

    Args:
      m: the model config.

    Returns:
      The HF class name; :class:`HFError` if no family fits.
    """
    owner = claimant(m)
    if owner is not None:
        return owner.architecture
    for fam in FAMILIES.values():
        if fam.infers(m):
            return fam.architecture
    kinds = ffn_kinds(m)
    qk = str(m.get("qk_norm", "none"))
    bias = bool(m.get("qkv_bias", False))
    raise HFError(f"no supported HF architecture has this model's layout (ffn {','.join(kinds)}, "
                  f"qk_norm {qk}, qkv_bias {bias}); supported: {', '.join(supported_architectures())}")


def hf_config_from_model(m: Any, architecture: str | None = None,
                         base: Mapping[str, Any] | None = None, dtype: str = "float32") -> dict:
    """The HF ``config.json`` dict for a routezoo ``config.model`` (inverse of :func:`model_config_from_hf`).

    Args:
      m: the model config.
      architecture: the HF class (default: ``model.hf_architecture``, else inferred).
      base: HF keys routezoo does not model (token ids, ...), e.g. the imported checkpoint's config.
      dtype: the ``dtype`` to record.

    Returns:
      The HF config dict; :class:`HFError` when ``m`` cannot be written as that architecture.
    """
    arch = architecture or str(m.get("hf_architecture", "") or "") or infer_architecture(m)
    fam = family_named(arch)
    # A model that only one family can write is judged by that family, whatever was asked.
    judge = claimant(m) or fam
    return judge.config_to_hf(m, arch, base, dtype)


def tensor_maps(m: Any, fam: Family) -> list[TensorMap]:
    """Every parameter of the zoo model of ``m`` as a :class:`TensorMap` of HF tensors of ``fam``.

    Args:
      m: the model config.
      fam: the family.

    Returns:
      The maps, in checkpoint order.
    """
    return fam.tensor_maps(m)


def arch_items(m: Any) -> dict[str, Any]:
    """The architecture keys of a model config (``'key'`` / ``'moe.key'``), for comparison.

    Args:
      m: the model config.

    Returns:
      ``{key: value}``; keys a config written before they existed lacks take the schema's default.
    """
    d = default_model_config()
    out = {k: m[k] if k in m else d[k] for k in MODEL_ARCH_KEYS}
    if "moe" in ffn_kinds(m):   # a dense model ignores its moe section
        out.update({f"moe.{k}": m.moe[k] if k in m.moe else d.moe[k] for k in MOE_ARCH_KEYS})
    owner = claimant(m)
    if owner is not None:
        out.update(owner.arch_items(m, d))
    return out


def check_same_architecture(run: Any, ckpt: Any, path: str) -> None:
    """Raises :class:`HFError` when a run's ``config.model`` and a checkpoint's differ in architecture.

    Args:
      run: the run's model config.
      ckpt: the checkpoint's model config.
      path: the checkpoint directory, for the message.
    """
    a, b = arch_items(run), arch_items(ckpt)
    diff = [f"model.{k}={a.get(k)!r} (checkpoint: {b[k]!r})" for k in sorted(b) if a.get(k) != b[k]]
    if diff:
        raise HFError(f"config.model does not match the checkpoint in {path}: {'; '.join(diff[:4])}; "
                      "call routezoo.zoo.hf.update_config_from_hf(config) first")
