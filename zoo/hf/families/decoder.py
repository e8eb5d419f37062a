"""What every decoder-only family shares: the mapping onto :class:`routezoo.zoo.lm.DecoderLM`.

A :class:`DecoderFamily` is described by data (biases, QK norm, the fixed HF keys it writes,
the layout it is inferred from) and extended by the family groups through a few hooks:
``_attention_from_hf`` / ``_attention_maps`` (latent attention), ``_ffn_from_hf`` /
``_ffn_to_hf`` / ``_ffn_maps`` (mixture-of-experts), ``_layout_problems`` /
``_moe_problems`` (what an export refuses).

Einsum letters: ``D`` embed, ``H`` query heads, ``U`` key/value heads, ``A`` head dim,
``F`` mlp width.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import ml_collections

from routezoo.zoo.hf.registry import Family, HFError, default_model_config, ffn_kinds
from routezoo.zoo.hf.tensor_map import TensorMap, identity, linear


def rope_theta(hf: Mapping[str, Any]) -> float:
    """The rotary base of an HF config; :class:`HFError` for rope types other than default and YaRN.

    Args:
      hf: the HF config dict.

    Returns:
      ``rope_theta``.
    """
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ("default", "yarn"):
        raise HFError(f"rope type {kind!r} is not supported; supported: 'default', 'yarn'")
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    return float(theta)


def rope_scaling_from_hf(hf: Mapping[str, Any], m: Any) -> None:
    """Sets ``config.model.rope_scaling`` (in place) from the HF rope settings.

    Reads ``rope_parameters`` / ``rope_scaling`` (old configs: ``type``) as transformers'
    ``standardize_rope_params`` and ``_compute_yarn_parameters`` do; leaves ``type='none'``
    for default rotary embeddings.

    Args:
      hf: the HF config dict.
      m: the model config to update.
    """
    p = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    if (p.get("rope_type") or p.get("type") or "default") != "yarn":
        return
    orig = hf.get("original_max_position_embeddings") or p.get("original_max_position_embeddings") \
        or hf.get("max_position_embeddings")
    if not orig:
        raise HFError("rope type 'yarn' needs original_max_position_embeddings (or max_position_embeddings)")
    factor = p.get("factor")
    if factor is None:
        factor = float(hf.get("max_position_embeddings") or 0) / float(orig)
    r = m.rope_scaling
    r.type = "yarn"
    r.factor = float(factor)
    r.original_max_position_embeddings = int(orig)
    r.beta_fast = float(p.get("beta_fast") or 32)
    r.beta_slow = float(p.get("beta_slow") or 1)
    r.mscale = float(p.get("mscale") or 0.0)
    r.mscale_all_dim = float(p.get("mscale_all_dim") or 0.0)
    r.attention_factor = float(p.get("attention_factor") or 0.0)
    r.truncate = bool(p.get("truncate", True))
    from routezoo.layers.attention import RopeScaling
    try:
        RopeScaling.from_config(r)
    except ValueError as e:
        raise HFError(str(e)) from e


def rope_parameters_to_hf(m: Any) -> dict:
    """The HF ``rope_parameters`` of ``config.model`` (inverse of :func:`rope_scaling_from_hf`).

    Args:
      m: the model config.

    Returns:
      The ``rope_parameters`` dict.
    """
    out = {"rope_type": "default", "rope_theta": float(m.rope_theta)}
    r = m.get("rope_scaling", None)
    if r is None or str(r.type) == "none":
        return out
    out.update(rope_type=str(r.type), factor=float(r.factor),
               original_max_position_embeddings=int(r.original_max_position_embeddings),
               beta_fast=float(r.beta_fast), beta_slow=float(r.beta_slow))
    for key in ("mscale", "mscale_all_dim", "attention_factor"):
        if float(r[key]):
            out[key] = float(r[key])
    if not bool(r.truncate):
        out["truncate"] = False
    return out


def layout(m: Any) -> dict[str, Any]:
    """The features of a decoder config that pick its HF architecture.

    Args:
      m: the model config.

    Returns:
      ``mla``, ``moe`` (any MoE layer), ``all_moe``, ``qk_norm``, ``qkv_bias``, and for MoE
      models ``shared`` (shared experts), ``renormalize``, ``router``.
    """
    kinds = ffn_kinds(m)
    out = {"mla": str(m.get("attention", "mha")) == "mla", "moe": "moe" in kinds,
           "all_moe": all(k == "moe" for k in kinds), "qk_norm": str(m.get("qk_norm", "none")),
           "qkv_bias": bool(m.get("qkv_bias", False))}
    if out["moe"]:
        out.update(shared=int(m.moe.num_shared_experts) > 0, renormalize=bool(m.moe.renormalize),
                   router=str(m.moe.router))
    return out


@dataclasses.dataclass(frozen=True)
class DecoderFamily(Family):
    """A decoder-only HF architecture onto DecoderLM with dense SwiGLU MLPs.

    Attributes:
      qkv_bias: q/k/v projections have biases.
      qk_norm: ``'none'``, ``'head'`` or ``'full'`` (see ``layers.attention.Attention``).
      sliding_window_flag: sliding window enabled by ``use_sliding_window``.
      export_constants: ``(key, value)`` pairs every exported ``config.json`` carries.
      infer_when: ``(feature, value)`` pairs of :func:`layout` that pick this family when
        exporting without an architecture; ``None``: never picked.
      moe: the family has mixture-of-experts layers.
      mla: multi-head latent attention.
      mtp: multi-token-prediction layers.
      router: the routing an exported MoE layer must use.
      renormalize: ``True``/``False``: fixed; ``None``: from ``norm_topk_prob``.
    """

    qkv_bias: bool = False
    qk_norm: str = "none"
    sliding_window_flag: bool = False
    export_constants: tuple[tuple[str, Any], ...] = ()
    infer_when: tuple[tuple[str, Any], ...] | None = None
    moe: bool = False
    mla: bool = False
    mtp: bool = False
    router: str = "top_k"
    renormalize: bool | None = None

    # ------------------------------------------------------------------ config.json -> config.model

    def config_from_hf(self, hf: Mapping[str, Any], *, dtype: str = "float32",
                       param_dtype: str = "float32") -> ml_collections.ConfigDict:
        need = self.need(hf)
        act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
        if act != "silu":
            raise HFError(f"hidden_act {act!r} is not supported (only 'silu': SwiGLU MLPs)")
        for key in ("mlp_bias",) + (() if self.qkv_bias else ("attention_bias",)):
            if hf.get(key):
                raise HFError(f"{key}=true is not supported for {self.architecture}")
        if hf.get("clip_qkv") is not None:
            raise HFError(f"clip_qkv={hf['clip_qkv']} is not supported")
        window = hf.get("sliding_window")
        uses_window = hf.get("use_sliding_window", False) if self.sliding_window_flag else window is not None
        if uses_window and window:
            raise HFError(f"sliding-window attention (sliding_window={window}) is not supported")

        n = int(need("num_hidden_layers"))
        d, h = int(need("hidden_size")), int(need("num_attention_heads"))
        m = default_model_config()
        m.name = "decoder_lm"
        m.vocab_size = int(need("vocab_size"))
        m.num_layers = n
        m.d_model = d
        m.num_heads = h
        m.num_kv_heads = int(hf.get("num_key_value_heads") or h)
        m.head_dim = int(hf.get("head_dim") or d // h)
        m.mlp_dim = int(need("intermediate_size"))
        m.mlp_type = "swiglu"
        m.norm = "rmsnorm"
        m.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
        m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
        m.scale_tied_logits = False
        m.max_len = int(hf.get("max_position_embeddings") or m.max_len)
        m.rope_theta = rope_theta(hf)
        rope_scaling_from_hf(hf, m)
        m.dtype = dtype
        m.param_dtype = param_dtype
        m.qkv_bias = self.qkv_bias
        m.qk_norm = self.qk_norm
        m.hf_architecture = self.architecture
        self._attention_from_hf(hf, m, need)
        self._ffn_from_hf(hf, m, need)
        return m

    def _attention_from_hf(self, hf: Mapping[str, Any], m: Any, need: Callable[[str], Any]) -> None:
        """Attention keys of ``m`` beyond the shared ones (in place)."""

    def _ffn_from_hf(self, hf: Mapping[str, Any], m: Any, need: Callable[[str], Any]) -> None:
        """Feed-forward keys of ``m`` (in place): dense MLPs."""
        m.ffn = "mlp"

    # ------------------------------------------------------------------ config.model -> config.json

    def infers(self, m: Any) -> bool:
        if self.infer_when is None:
            return False
        lay = layout(m)
        return all(lay.get(key) == value for key, value in self.infer_when)

    def export_problems(self, m: Any) -> list[str]:
        """Why ``m`` cannot be written as this architecture.

        Args:
          m: the model config.

        Returns:
          The problems, in a fixed order; empty when ``m`` exports.
        """
        problems = []
        if (str(m.get("attention", "mha")) == "mla") != self.mla:
            problems.append(f"attention {m.get('attention', 'mha')!r} (needs {'mla' if self.mla else 'mha'!r})")
        if str(m.get("qk_norm", "none")) != self.qk_norm:
            problems.append(f"qk_norm {m.get('qk_norm', 'none')!r} (needs {self.qk_norm!r})")
        if bool(m.get("qkv_bias", False)) != self.qkv_bias:
            problems.append(f"qkv_bias {bool(m.get('qkv_bias', False))} (needs {self.qkv_bias})")
        kinds = ffn_kinds(m)
        if ("moe" in kinds) != self.moe:
            problems.append("a dense model for a MoE family or the reverse")
        if m.mlp_type != "swiglu":
            problems.append(f"mlp_type {m.mlp_type!r} (HF families here use swiglu)")
        if m.norm != "rmsnorm":
            problems.append(f"norm {m.norm!r} (needs rmsnorm)")
        problems += self._layout_problems(m)
        if m.tie_embeddings and bool(m.get("scale_tied_logits", True)):
            problems.append("tied logits scaled by d_model**-0.5 (HF computes plain x @ E^T; "
                            "needs scale_tied_logits=False)")
        if "moe" in kinds:
            mo = m.moe
            if mo.router != self.router or mo.expert_type != "swiglu" or mo.residual_mlp or mo.bias_update_rate:
                problems.append(f"MoE must be {self.router} routing with swiglu experts, no residual MLP, "
                                "no routing bias")
            problems += self._moe_problems(m)
            if int(mo.k) == 1 and self.renormalize is None and bool(mo.renormalize):
                problems.append("k=1 is never renormalised here, but norm_topk_prob would renormalise it")
            if self.renormalize is True and not bool(mo.renormalize):
                problems.append(f"{self.architecture} always renormalises top-k weights")
        if int(m.get("mtp_depth", 0) or 0) and not self.mtp:
            problems.append(f"multi-token prediction (model.mtp_depth={m.mtp_depth}; only DeepSeek-V3 has it)")
        return problems

    def _layout_problems(self, m: Any) -> list[str]:
        """Problems of the attention layout beyond the shared checks."""
        return []

    def _moe_problems(self, m: Any) -> list[str]:
        """Problems of the MoE layers beyond the shared checks."""
        return []

    def config_to_hf(self, m: Any, architecture: str, base: Mapping[str, Any] | None, dtype: str) -> dict:
        problems = self.export_problems(m)
        if problems:
            raise HFError(f"cannot export as {self.architecture}: " + "; ".join(problems))
        out = {k: v for k, v in dict(base or {}).items()
               if k not in ("rope_scaling", "rope_parameters", "torch_dtype", "dtype", "transformers_version")}
        out.update({
            "architectures": [architecture],
            "model_type": self.model_type,
            "vocab_size": int(m.vocab_size),
            "hidden_size": int(m.d_model),
            "intermediate_size": int(m.mlp_dim),
            "num_hidden_layers": int(m.num_layers),
            "num_attention_heads": int(m.num_heads),
            "num_key_value_heads": int(m.num_kv_heads),
            "head_dim": int(m.head_dim),
            "hidden_act": "silu",
            "rms_norm_eps": float(m.norm_eps),
            "max_position_embeddings": int(m.max_len),
            "rope_theta": float(m.rope_theta),
            "rope_parameters": rope_parameters_to_hf(m),
            "tie_word_embeddings": bool(m.tie_embeddings),
            "torch_dtype": dtype,
        })
        out.update(self.export_constants)
        self._ffn_to_hf(m, ffn_kinds(m), out)
        return out

    def _ffn_to_hf(self, m: Any, kinds: tuple[str, ...], out: dict) -> None:
        """HF keys of the feed-forward layers (and whatever else the family adds), into ``out``."""

    # ------------------------------------------------------------------ tensors

    def tensor_maps(self, m: Any) -> list[TensorMap]:
        d, v = int(m.d_model), int(m.vocab_size)
        maps = [identity(("embed", "embedding"), "model.embed_tokens.weight", (v, d)),
                identity(("final_norm", "scale"), "model.norm.weight", (d,))]
        if not m.tie_embeddings:
            maps.append(linear(("unembed",), "lm_head.weight", v, d))
        for i, kind in enumerate(ffn_kinds(m)):
            maps += self.layer_maps(m, kind, (f"layer{i}",), f"model.layers.{i}")
        return maps

    def layer_maps(self, m: Any, kind: str, p: tuple[str, ...], L: str) -> list[TensorMap]:
        """One decoder layer's parameters from the HF tensors of one layer.

        Args:
          m: the model config.
          kind: ``'mlp'`` or ``'moe'``.
          p: the layer's path prefix (``('layer3',)``).
          L: the HF layer's prefix (``'model.layers.3'``).

        Returns:
          The layer's maps.
        """
        d = int(m.d_model)
        maps = [identity((*p, "attn_norm", "scale"), f"{L}.input_layernorm.weight", (d,)),
                identity((*p, "ffn_norm", "scale"), f"{L}.post_attention_layernorm.weight", (d,))]
        maps += self._attention_maps(m, p, f"{L}.self_attn")
        if kind == "mlp":
            f = int(m.mlp_dim)
            return maps + [linear((*p, "mlp", "wi"), f"{L}.mlp.up_proj.weight", f, d),
                           linear((*p, "mlp", "wg"), f"{L}.mlp.gate_proj.weight", f, d),
                           linear((*p, "mlp", "wo"), f"{L}.mlp.down_proj.weight", d, f)]
        return maps + self._ffn_maps(m, kind, p, L)

    def _attention_maps(self, m: Any, p: tuple[str, ...], a: str) -> list[TensorMap]:
        """Attention parameters of layer ``p`` from the HF tensors under ``a``."""
        d, h, g, k = int(m.d_model), int(m.num_heads), int(m.num_kv_heads), int(m.head_dim)
        maps = [   # q/k/v: [H·A, D] -> [D, H, A]; o: [D, H·A] -> [H, A, D]
            TensorMap((*p, "attn", "q"), (f"{a}.q_proj.weight",), ((h, k), (d,)), (2, 0, 1)),
            TensorMap((*p, "attn", "k"), (f"{a}.k_proj.weight",), ((g, k), (d,)), (2, 0, 1)),
            TensorMap((*p, "attn", "v"), (f"{a}.v_proj.weight",), ((g, k), (d,)), (2, 0, 1)),
            TensorMap((*p, "attn", "o"), (f"{a}.o_proj.weight",), ((d,), (h, k)), (1, 2, 0)),
        ]
        return maps + self._qk_maps(m, p, a)

    def _qk_maps(self, m: Any, p: tuple[str, ...], a: str) -> list[TensorMap]:
        """The q/k/v biases and QK norms of layer ``p``, as the family has them."""
        h, g, k = int(m.num_heads), int(m.num_kv_heads), int(m.head_dim)
        maps = []
        if self.qkv_bias:
            for name, heads in (("q", h), ("k", g), ("v", g)):
                maps.append(TensorMap((*p, "attn", f"{name}_bias"), (f"{a}.{name}_proj.bias",), ((heads, k),),
                                      (0, 1)))
        if self.qk_norm == "head":
            maps += [identity((*p, "attn", "q_norm"), f"{a}.q_norm.weight", (k,)),
                     identity((*p, "attn", "k_norm"), f"{a}.k_norm.weight", (k,))]
        elif self.qk_norm == "full":
            maps += [TensorMap((*p, "attn", "q_norm"), (f"{a}.q_norm.weight",), ((h, k),), (0, 1)),
                     TensorMap((*p, "attn", "k_norm"), (f"{a}.k_norm.weight",), ((g, k),), (0, 1))]
        return maps

    def _ffn_maps(self, m: Any, kind: str, p: tuple[str, ...], L: str) -> list[TensorMap]:
        """Parameters of a feed-forward layer of ``kind`` other than ``'mlp'``."""
        raise HFError(f"{self.architecture} has no {kind} layers")
