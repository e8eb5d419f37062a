"""The family registry: one :class:`Family` object per Hugging Face architecture.

A family says everything that is particular to its architecture: how its ``config.json``
maps onto ``config.model`` and back (with the settings it refuses), which tensors hold
which parameters, which zoo models it claims. The shared modules (``config_map``,
``loading``, ``export``) only look families up here and call their methods.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import ml_collections

if TYPE_CHECKING:
    from routezoo.zoo.hf.tensor_map import TensorMap


class HFError(ValueError):
    """A checkpoint or config this module cannot import or export; the message says why."""


# Keys of config.model that describe the architecture: taken from the checkpoint. The
# others (dtypes, dispatch, capacity, loss coefficients, ...) are choices of a run.
MODEL_ARCH_KEYS = ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                   "mlp_type", "norm", "norm_eps", "tie_embeddings", "scale_tied_logits", "rope_theta",
                   "qkv_bias", "qk_norm", "ffn", "attention", "mla_q_lora_rank", "mla_kv_lora_rank",
                   "mla_qk_nope_head_dim", "mla_qk_rope_head_dim", "mla_v_head_dim", "mla_rope_interleave",
                   "rope_scaling", "mtp_depth")
MOE_ARCH_KEYS = ("num_experts", "k", "router", "expert_dim", "expert_type", "num_shared_experts",
                 "shared_expert_dim", "shared_expert_gate", "residual_mlp", "every", "renormalize",
                 "bias_update_rate", "deepseek_v3_n_group", "deepseek_v3_topk_group", "deepseek_v3_scaling_factor")


def default_model_config() -> ml_collections.ConfigDict:
    """The schema's ``config.model`` defaults (``configs/base.py``).

    Returns:
      A fresh ConfigDict; families fill the architecture keys from a checkpoint into it.
    """
    # Imported lazily: configs sits above zoo; only its plain defaults are read here.
    from routezoo.configs import base
    return base.get_config().model


def ffn_kinds(m: Any) -> tuple[str, ...]:
    """Feed-forward kind (``'mlp'`` / ``'moe'``) of each decoder layer of ``config.model`` ``m``."""
    from routezoo.zoo.lm import ffn_kinds as kinds
    return kinds(m)


@dataclasses.dataclass(frozen=True)
class Family:
    """How one Hugging Face architecture maps onto a zoo model.

    Subclasses (one module per family group under ``families/``) override the methods;
    the defaults here are those of a family with nothing special to say.

    Attributes:
      architecture: HF class name (``architectures[0]`` of ``config.json``).
      model_type: HF ``model_type``.
    """

    architecture: str
    model_type: str

    def need(self, hf: Mapping[str, Any]) -> Callable[[str], Any]:
        """A reader of required ``config.json`` keys.

        Args:
          hf: the HF config dict.

        Returns:
          ``need(key)``: ``hf[key]``, or :class:`HFError` when it is absent or null.
        """
        def need(key):
            if key not in hf or hf[key] is None:
                raise HFError(f"config.json of {self.architecture} has no {key!r}")
            return hf[key]
        return need

    def config_from_hf(self, hf: Mapping[str, Any], *, dtype: str, param_dtype: str) -> ml_collections.ConfigDict:
        """A complete ``config.model`` for the HF config ``hf``.

        Args:
          hf: the HF ``config.json`` dict.
          dtype: ``model.dtype`` to set.
          param_dtype: ``model.param_dtype`` to set.

        Returns:
          The model config; :class:`HFError` for settings the zoo model cannot reproduce.
        """
        raise NotImplementedError

    def config_to_hf(self, m: Any, architecture: str, base: Mapping[str, Any] | None, dtype: str) -> dict:
        """The HF ``config.json`` dict of ``config.model`` ``m`` (inverse of :meth:`config_from_hf`).

        Args:
          m: the model config.
          architecture: the HF class asked for.
          base: HF keys the zoo does not model (token ids, ...) to keep.
          dtype: the ``dtype`` to record.

        Returns:
          The HF config dict; :class:`HFError` when ``m`` cannot be written as ``architecture``.
        """
        raise NotImplementedError

    def tensor_maps(self, m: Any) -> list["TensorMap"]:
        """Every parameter of the zoo model of ``m`` as a map of this family's HF tensors.

        Args:
          m: the model config.

        Returns:
          One :class:`~routezoo.zoo.hf.tensor_map.TensorMap` per parameter, in checkpoint order.
        """
        raise NotImplementedError

    def copies(self, m: Any) -> dict[str, tuple[str, ...]]:
        """HF tensors that repeat a parameter another map already holds.

        Args:
          m: the model config.

        Returns:
          ``{HF name: routezoo path}``: ignored on import, written on export.
        """
        return {}

    def stored_but_unused(self, m: Any) -> set[str]:
        """HF tensor names a checkpoint of ``m`` may hold that import does not read.

        Args:
          m: the model config.

        Returns:
          The names: the :meth:`copies`, and ``lm_head.weight`` of a tied model (some tied
          checkpoints store it anyway).
        """
        out = set(self.copies(m))
        if m.tie_embeddings:
            out.add("lm_head.weight")
        return out

    def claims(self, m: Any) -> bool:
        """Whether only this family can export ``m`` (its zoo model is no other family's).

        Args:
          m: the model config.

        Returns:
          ``True`` to be asked to export ``m`` whatever architecture is requested.
        """
        return False

    def infers(self, m: Any) -> bool:
        """Whether ``m`` (a model no family claims) has this family's layout.

        Args:
          m: the model config.

        Returns:
          ``True`` when :func:`~routezoo.zoo.hf.config_map.infer_architecture` picks this family.
        """
        return False

    def arch_items(self, m: Any, defaults: Any) -> dict[str, Any]:
        """Architecture keys of a model this family :meth:`claims`, beyond the shared ones.

        Args:
          m: the model config.
          defaults: the schema's model defaults, for keys ``m`` lacks.

        Returns:
          ``{"key" or "moe.key": value}``.
        """
        return {}

    def config_from_checkpoint(self, hf: Mapping[str, Any], m: Any, tensor_names: Callable[[], Iterable[str]]
                               ) -> None:
        """Settles, in place, keys of ``m`` that depend on which tensors a checkpoint holds.

        Args:
          hf: the HF config dict.
          m: the model config from :meth:`config_from_hf`.
          tensor_names: returns the names of the checkpoint's tensors (called only if needed).
        """


FAMILIES: dict[str, Family] = {}
_BY_MODEL_TYPE: dict[str, Family] = {}


def register(*families: Family) -> None:
    """Adds families to the registry, keyed by architecture and by model_type.

    Args:
      *families: the family objects, in the order they are tried.
    """
    for fam in families:
        FAMILIES[fam.architecture] = fam
        _BY_MODEL_TYPE[fam.model_type] = fam


def supported_architectures() -> list[str]:
    """The HF architectures that import and export.

    Returns:
      The class names, sorted.
    """
    return sorted(FAMILIES)


def family_of(hf_cfg: Mapping[str, Any]) -> Family:
    """The family of an HF config dict: by ``architectures``, else by ``model_type``.

    Args:
      hf_cfg: the HF ``config.json`` dict.

    Returns:
      The :class:`Family`; :class:`HFError` lists the supported ones.
    """
    archs = list(hf_cfg.get("architectures") or [])
    for a in archs:
        if a in FAMILIES:
            return FAMILIES[a]
    if not archs and hf_cfg.get("model_type") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[hf_cfg["model_type"]]
    got = ", ".join(archs) or f"model_type {hf_cfg.get('model_type')!r}"
    raise HFError(f"unsupported architecture {got}; supported: {', '.join(supported_architectures())}")


def family_named(architecture: str) -> Family:
    """The family of an HF class name.

    Args:
      architecture: e.g. ``'LlamaForCausalLM'``.

    Returns:
      The :class:`Family`; :class:`HFError` lists the supported ones.
    """
    if architecture not in FAMILIES:
        raise HFError(f"unsupported architecture {architecture}; supported: {', '.join(supported_architectures())}")
    return FAMILIES[architecture]


def claimant(m: Any) -> Family | None:
    """The family that :meth:`Family.claims` the model config ``m``, if any.

    Args:
      m: the model config.

    Returns:
      The family, or ``None`` (``m`` is judged by the family asked for).
    """
    return next((fam for fam in FAMILIES.values() if fam.claims(m)), None)
