"""Hugging Face checkpoints: import into zoo models, sharded onto a mesh; export back.

Einsum letters: ``D`` embed, ``H`` query heads, ``G`` key/value heads, ``K`` head dim,
``F`` mlp / expert_mlp, ``E`` experts, ``V`` vocab.

    model, params = from_hf("path/to/hf_dir", mesh=None)
    logits, aux = model.apply({"params": params}, tokens)      # logits as the HF model's
    to_hf(model.cfg, params, "out_dir")                         # loadable by transformers

Families (``architectures[0]`` of ``config.json``): dense ``LlamaForCausalLM``,
``MistralForCausalLM`` (no sliding window), ``Qwen2ForCausalLM`` (q/k/v bias),
``Qwen3ForCausalLM`` (per-head QK norm); mixture-of-experts ``MixtralForCausalLM``,
``Qwen2MoeForCausalLM`` (shared expert with sigmoid gate), ``Qwen3MoeForCausalLM``,
``OlmoeForCausalLM`` (QK norm over all heads), ``DeepseekV3ForCausalLM`` (multi-head latent
attention, :mod:`routezoo.layers.mla`; sigmoid group-limited routing with a correction
bias and scaled weights, :mod:`routezoo.layers.routers.deepseek`; shared experts; the
first ``first_k_dense_replace`` layers dense; no MTP module), ``DeepseekV2ForCausalLM``
(latent attention with or without a query latent, interleaved rope; softmax routing
``topk_method`` 'greedy' or 'group_limited_greedy' with scaled weights, ``moe.router=
'deepseek_v2'``; shared experts; ``first_k_dense_replace``; ``norm_topk_prob`` and
``moe_layer_freq`` other than 1 refused, as transformers ignores them). DeepSeek-V2/V3 import
YaRN rope scaling (``rope_type`` 'yarn', into ``model.rope_scaling``, see
:class:`routezoo.layers.attention.RopeScaling`); other families and rope types are refused. Each maps onto
:class:`routezoo.zoo.lm.DecoderLM` with dropless top-k routing (softmax over all experts,
top-k, renormalised when the family does: Mixtral always, Qwen/OLMoE by
``norm_topk_prob``), plain ``x @ E^T`` tied logits (``scale_tied_logits=False``).

Encoder-decoder: ``SwitchTransformersForConditionalGeneration`` maps onto
:class:`routezoo.zoo.encoder_decoder.EncoderDecoderLM` (``model.name='encoder_decoder'``;
``model.apply({'params': p}, encoder_tokens, decoder_tokens, encoder_mask=,
decoder_mask=)``): T5 relative position buckets, ReLU FFNs, top-1 routing with the raw
probability as the weight and HF's ``expert_capacity`` per sequence (capacity dispatch,
tokens beyond it dropped in sequence order); tied embeddings only (see the Switch
Transformers section at the end).

Loading never holds the whole model on one device, nor (except for one tensor at a time
when a device's shard needs all of it) on the host: safetensors files are opened lazily
and every parameter is placed with :func:`jax.make_array_from_callback`, whose callback
reads only the slice each device holds (for stacked experts, only the experts of that
slice, each from its own HF tensor). bfloat16/float8 tensors, which numpy cannot name,
are read through a memory map of the file.

Each routezoo parameter is a :class:`TensorMap` of one HF tensor (or one per expert,
stacked on a leading ``E`` axis): the HF tensor is reshaped to its ``split`` dims and
transposed by ``perm``. Export applies the inverse and writes safetensors shards, an
index and ``config.json`` (with ``architectures``) in the HF layout and naming.

A *converted* directory (``routezoo convert``) holds ``config.json`` (a full routezoo
config), ``hf_config.json`` (the original HF config) and ``params*.safetensors`` in
routezoo naming (``layer0/attn/q``); :func:`from_hf` and :func:`load_params_for_config`
read it as well.

Only ``numpy``, ``safetensors``, ``jax`` and ``flax`` are needed; ``torch`` and
``transformers`` are not imported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
RZ_HF_CONFIG = "hf_config.json"          # converted dir: the original HF config
RZ_INDEX = "params.safetensors.index.json"
RZ_SINGLE = "params.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 2 ** 30

# HF checkpoint tensors that carry no parameter (buffers some old checkpoints saved).
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.masked_bias|\.attn\.bias)$")


class HFError(ValueError):
    """A checkpoint or config this module cannot import or export; the message says why."""


# ----------------------------------------------------------------------------- families


@dataclasses.dataclass(frozen=True)
class Family:
    """How one HF architecture maps onto DecoderLM.

    Attributes:
      architecture / model_type: HF names.
      moe: ``None`` (dense) or ``'mixtral'`` / ``'qwen'`` (tensor naming of the MoE block).
      qkv_bias: q/k/v projections have biases.
      qk_norm: ``'none'``, ``'head'`` or ``'full'`` (see ``layers.dense.Attention``).
      shared_expert: one shared expert with a sigmoid gate (Qwen2-MoE).
      renormalize: ``True``/``False``: fixed; ``None``: from ``norm_topk_prob``.
      sparse_step: the family has ``decoder_sparse_step`` / ``mlp_only_layers``.
      expert_dim_key: HF config key of the expert width.
      num_experts_keys: HF config keys of the expert count, first present wins.
    """

    architecture: str
    model_type: str
    moe: str | None = None
    qkv_bias: bool = False
    qk_norm: str = "none"
    shared_expert: bool = False
    renormalize: bool | None = None
    sparse_step: bool = False
    expert_dim_key: str = "intermediate_size"
    num_experts_keys: tuple[str, ...] = ("num_experts",)
    sliding_window_flag: bool = False   # sliding window enabled by `use_sliding_window`
    mla: bool = False                   # DeepSeek-V2/V3: latent attention, deepseek_v2/v3 routing, shared experts


FAMILIES: dict[str, Family] = {f.architecture: f for f in (
    Family("LlamaForCausalLM", "llama"),
    Family("MistralForCausalLM", "mistral"),
    Family("Qwen2ForCausalLM", "qwen2", qkv_bias=True, sliding_window_flag=True),
    Family("Qwen3ForCausalLM", "qwen3", qk_norm="head", sliding_window_flag=True),
    Family("MixtralForCausalLM", "mixtral", moe="mixtral", renormalize=True,
           num_experts_keys=("num_local_experts", "num_experts")),
    Family("Qwen2MoeForCausalLM", "qwen2_moe", moe="qwen", qkv_bias=True, shared_expert=True,
           sparse_step=True, expert_dim_key="moe_intermediate_size", sliding_window_flag=True),
    Family("Qwen3MoeForCausalLM", "qwen3_moe", moe="qwen", qk_norm="head", sparse_step=True,
           expert_dim_key="moe_intermediate_size", num_experts_keys=("num_experts", "num_local_experts"),
           sliding_window_flag=True),
    Family("OlmoeForCausalLM", "olmoe", moe="qwen", qk_norm="full"),
    Family("DeepseekV3ForCausalLM", "deepseek_v3", moe="qwen", mla=True, expert_dim_key="moe_intermediate_size",
           num_experts_keys=("n_routed_experts",)),
    Family("DeepseekV2ForCausalLM", "deepseek_v2", moe="qwen", mla=True, expert_dim_key="moe_intermediate_size",
           num_experts_keys=("n_routed_experts",)),
)}
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}

# Encoder-decoder: Switch Transformers onto zoo/encoder_decoder.py (its own config and tensor
# tables, in the "Switch Transformers" section at the end of this module).
SWITCH = Family("SwitchTransformersForConditionalGeneration", "switch_transformers", moe="switch")
FAMILIES[SWITCH.architecture] = SWITCH
_BY_MODEL_TYPE[SWITCH.model_type] = SWITCH


def supported_architectures() -> list[str]:
    return sorted(FAMILIES)


def family_of(hf_cfg: Mapping[str, Any]) -> Family:
    """The :class:`Family` of an HF config dict; :class:`HFError` lists the supported ones."""
    archs = list(hf_cfg.get("architectures") or [])
    for a in archs:
        if a in FAMILIES:
            return FAMILIES[a]
    if not archs and hf_cfg.get("model_type") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[hf_cfg["model_type"]]
    got = ", ".join(archs) or f"model_type {hf_cfg.get('model_type')!r}"
    raise HFError(f"unsupported architecture {got}; supported: {', '.join(supported_architectures())}")


# ----------------------------------------------------------------------------- configs

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


def _default_model_config() -> ml_collections.ConfigDict:
    # The schema's defaults for every key not set from the checkpoint (imported lazily:
    # configs sits above zoo; only its plain defaults are read here).
    from routezoo.configs import base
    return base.get_config().model


def _rope(hf: Mapping[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ("default", "yarn"):
        raise HFError(f"rope type {kind!r} is not supported; supported: 'default', 'yarn'")
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    return float(theta)


def _rope_scaling_from_hf(hf: Mapping[str, Any], m: Any) -> None:
    """``config.model.rope_scaling`` (in place) from the HF ``rope_parameters`` /
    ``rope_scaling`` (old configs: ``type``), read as transformers' ``standardize_rope_params``
    and ``_compute_yarn_parameters`` do; ``type='none'`` for default rotary embeddings."""
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


def _rope_parameters_to_hf(m: Any) -> dict:
    """The HF ``rope_parameters`` of ``config.model`` (inverse of :func:`_rope_scaling_from_hf`)."""
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


def _layer_kinds(fam: Family, hf: Mapping[str, Any], n: int, num_experts: int) -> list[str]:
    if fam.moe is None:
        return ["mlp"] * n
    if fam.mla:
        first = int(hf.get("first_k_dense_replace") or 0)
        return ["mlp" if i < first else "moe" for i in range(n)]
    if not fam.sparse_step:
        return ["moe"] * n
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    only = set(hf.get("mlp_only_layers") or [])
    return ["moe" if (i not in only and num_experts > 0 and (i + 1) % step == 0) else "mlp"
            for i in range(n)]


def model_config_from_hf(hf: Mapping[str, Any], *, dtype: str = "float32",
                         param_dtype: str = "float32") -> ml_collections.ConfigDict:
    """A complete ``config.model`` for an HF ``config.json`` dict: the schema's defaults
    (``configs/base.py``) with the architecture from the checkpoint, dropless routing and
    the checkpoint's router loss coefficient. :class:`HFError` for settings DecoderLM
    cannot reproduce."""
    fam = family_of(hf)
    if fam is SWITCH:
        return _switch_config_from_hf(hf, dtype=dtype, param_dtype=param_dtype)

    def need(key):
        if key not in hf or hf[key] is None:
            raise HFError(f"config.json of {fam.architecture} has no {key!r}")
        return hf[key]

    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act != "silu":
        raise HFError(f"hidden_act {act!r} is not supported (only 'silu': SwiGLU MLPs)")
    for key in ("mlp_bias",) + (() if fam.qkv_bias else ("attention_bias",)):
        if hf.get(key):
            raise HFError(f"{key}=true is not supported for {fam.architecture}")
    if hf.get("clip_qkv") is not None:
        raise HFError(f"clip_qkv={hf['clip_qkv']} is not supported")
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", False) if fam.sliding_window_flag else window is not None
    if uses_window and window:
        raise HFError(f"sliding-window attention (sliding_window={window}) is not supported")

    n = int(need("num_hidden_layers"))
    d, h = int(need("hidden_size")), int(need("num_attention_heads"))
    m = _default_model_config()
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
    m.rope_theta = _rope(hf)
    _rope_scaling_from_hf(hf, m)
    m.dtype = dtype
    m.param_dtype = param_dtype
    m.qkv_bias = fam.qkv_bias
    m.qk_norm = fam.qk_norm
    m.hf_architecture = fam.architecture
    if fam.mla:
        _mla_config_from_hf(hf, m, need)
    if fam.moe is None:
        m.ffn = "mlp"
        return m

    moe = m.moe
    num_experts = next((int(hf[k]) for k in fam.num_experts_keys if hf.get(k)), 0)
    if num_experts < 1:
        raise HFError(f"config.json of {fam.architecture} has no expert count "
                      f"({' or '.join(fam.num_experts_keys)})")
    kinds = _layer_kinds(fam, hf, n, num_experts)
    m.ffn = "mlp" if "moe" not in kinds else ("moe" if all(k == "moe" for k in kinds) else ",".join(kinds))
    moe.num_experts = num_experts
    moe.k = int(need("num_experts_per_tok"))
    moe.router = "top_k"
    moe.dispatch = "dropless"          # HF models drop no token
    moe.expert_dim = int(hf.get(fam.expert_dim_key) or m.mlp_dim)
    moe.expert_type = "swiglu"
    moe.num_shared_experts = 1 if fam.shared_expert else 0
    moe.shared_expert_dim = int(need("shared_expert_intermediate_size")) if fam.shared_expert else 0
    moe.shared_expert_gate = fam.shared_expert
    moe.residual_mlp = False
    moe.every = 1
    moe.renormalize = fam.renormalize if fam.renormalize is not None else bool(hf.get("norm_topk_prob", False))
    if moe.k == 1 and moe.renormalize and not fam.mla:
        raise HFError("num_experts_per_tok=1 with renormalised top-k weights (always 1.0) is not supported: "
                      "routezoo's top-1 routing keeps the raw probability (Switch)")
    moe.jitter = 0.0
    moe.load_balance_coef = float(hf.get("router_aux_loss_coef", 0.0) or 0.0)
    moe.z_loss_coef = float(hf.get("router_z_loss_coef", 0.0) or 0.0)
    moe.bias_update_rate = 0.0
    moe.batch_prioritized = False
    if fam.mla:   # DeepSeek-V3 routing and shared experts
        moe.router = "deepseek_v3"
        moe.renormalize = bool(hf.get("norm_topk_prob", False))
        moe.deepseek_v3_n_group = int(hf.get("n_group") or 1)
        moe.deepseek_v3_topk_group = int(hf.get("topk_group") or moe.deepseek_v3_n_group)
        moe.deepseek_v3_scaling_factor = float(hf.get("routed_scaling_factor", 1.0) or 1.0)
        moe.num_shared_experts = int(hf.get("n_shared_experts") or 0)
        moe.shared_expert_dim = moe.expert_dim if moe.num_shared_experts else 0
        if fam.model_type == "deepseek_v2":
            _deepseek_v2_routing_from_hf(hf, moe, need)
        try:
            from routezoo.layers.routers import ROUTERS
            ROUTERS[moe.router].check_config(moe, causal=True)
        except ValueError as e:
            raise HFError(f"{fam.architecture}: {e}") from e
    return m


def _deepseek_v2_routing_from_hf(hf: Mapping[str, Any], moe: Any, need: Callable[[str], Any]) -> None:
    """DeepSeek-V2 routing keys of ``config.model.moe`` (in place): ``topk_method`` 'greedy'
    (``n_group = 1``) or 'group_limited_greedy' (``n_group``/``topk_group``), softmax
    scores times ``routed_scaling_factor``, as transformers' DeepseekV2TopkRouter."""
    moe.router = "deepseek_v2"
    method = hf.get("topk_method") or "greedy"
    if method == "greedy":
        moe.deepseek_v3_n_group = moe.deepseek_v3_topk_group = 1
    elif method == "group_limited_greedy":
        moe.deepseek_v3_n_group = int(need("n_group"))
        moe.deepseek_v3_topk_group = int(need("topk_group"))
    else:
        raise HFError(f"DeepseekV2ForCausalLM: topk_method={method!r} is not supported; allowed: greedy, "
                      "group_limited_greedy")
    if hf.get("norm_topk_prob"):
        raise HFError("DeepseekV2ForCausalLM: norm_topk_prob=true is not supported (transformers' DeepSeek-V2 "
                      "ignores it, DeepSeek's code renormalises; released checkpoints use false)")
    if int(hf.get("moe_layer_freq") or 1) != 1:
        raise HFError(f"DeepseekV2ForCausalLM: moe_layer_freq={hf['moe_layer_freq']} is not supported (transformers "
                      "puts a MoE block in every layer after first_k_dense_replace); allowed: 1")
    if moe.num_shared_experts < 1:
        raise HFError(f"DeepseekV2ForCausalLM: n_shared_experts={hf.get('n_shared_experts')} is not supported "
                      "(transformers always builds the shared experts); allowed: >= 1")
    moe.renormalize = False


def _mla_config_from_hf(hf: Mapping[str, Any], m: Any, need: Callable[[str], Any]) -> None:
    """DeepSeek-V2/V3 multi-head latent attention keys of ``config.model`` (in place)."""
    if int(m.num_kv_heads) != int(m.num_heads):
        raise HFError(f"num_key_value_heads={m.num_kv_heads} != num_attention_heads={m.num_heads} is not "
                      "supported for DeepSeek-V2/V3 (latent attention expands keys to every head)")
    m.attention = "mla"
    m.mla_q_lora_rank = int(hf.get("q_lora_rank") or 0)
    m.mla_kv_lora_rank = int(need("kv_lora_rank"))
    m.mla_qk_nope_head_dim = int(need("qk_nope_head_dim"))
    m.mla_qk_rope_head_dim = int(need("qk_rope_head_dim"))
    m.mla_v_head_dim = int(need("v_head_dim"))
    # DeepSeek-V2 in transformers always rotates interleaved pairs (no rope_interleave key).
    m.mla_rope_interleave = True if hf.get("model_type") == "deepseek_v2" else bool(hf.get("rope_interleave", True))
    m.head_dim = m.mla_qk_rope_head_dim   # as transformers sets it (unused by latent attention)


def _ffn_kinds(m: Any) -> tuple[str, ...]:
    from routezoo.zoo.lm import ffn_kinds
    return ffn_kinds(m)


def infer_architecture(m: Any) -> str:
    """The HF architecture a routezoo ``config.model`` exports to; :class:`HFError` if none fits."""
    if _is_encoder_decoder(m):
        return SWITCH.architecture
    kinds = _ffn_kinds(m)
    qk = str(m.get("qk_norm", "none"))
    bias = bool(m.get("qkv_bias", False))
    if str(m.get("attention", "mha")) == "mla":
        return "DeepseekV2ForCausalLM" if "moe" in kinds and m.moe.router == "deepseek_v2" else "DeepseekV3ForCausalLM"
    if "moe" not in kinds:
        if qk == "head" and not bias:
            return "Qwen3ForCausalLM"
        if qk == "none":
            return "Qwen2ForCausalLM" if bias else "LlamaForCausalLM"
    else:
        shared = int(m.moe.num_shared_experts) > 0
        if shared and bias and qk == "none":
            return "Qwen2MoeForCausalLM"
        if not shared and not bias:
            if qk == "full" and all(k == "moe" for k in kinds):
                return "OlmoeForCausalLM"
            if qk == "head":
                return "Qwen3MoeForCausalLM"
            if qk == "none" and all(k == "moe" for k in kinds) and bool(m.moe.renormalize):
                return "MixtralForCausalLM"
    raise HFError(f"no supported HF architecture has this model's layout (ffn {','.join(kinds)}, "
                  f"qk_norm {qk}, qkv_bias {bias}); supported: {', '.join(supported_architectures())}")


def _check_exportable(m: Any, fam: Family) -> None:
    problems = []
    if (str(m.get("attention", "mha")) == "mla") != fam.mla:
        problems.append(f"attention {m.get('attention', 'mha')!r} (needs {'mla' if fam.mla else 'mha'!r})")
    if str(m.get("qk_norm", "none")) != fam.qk_norm:
        problems.append(f"qk_norm {m.get('qk_norm', 'none')!r} (needs {fam.qk_norm!r})")
    if bool(m.get("qkv_bias", False)) != fam.qkv_bias:
        problems.append(f"qkv_bias {bool(m.get('qkv_bias', False))} (needs {fam.qkv_bias})")
    if ("moe" in _ffn_kinds(m)) != (fam.moe is not None):
        problems.append("a dense model for a MoE family or the reverse")
    if m.mlp_type != "swiglu":
        problems.append(f"mlp_type {m.mlp_type!r} (HF families here use swiglu)")
    if m.norm != "rmsnorm":
        problems.append(f"norm {m.norm!r} (needs rmsnorm)")
    if fam.model_type == "deepseek_v2" and not bool(m.get("mla_rope_interleave", True)):
        problems.append("mla_rope_interleave False (DeepSeek-V2 rotates interleaved pairs)")
    if m.tie_embeddings and bool(m.get("scale_tied_logits", True)):
        problems.append("tied logits scaled by d_model**-0.5 (HF computes plain x @ E^T; "
                        "needs scale_tied_logits=False)")
    if "moe" in _ffn_kinds(m):
        mo = m.moe
        router = ("deepseek_v2" if fam.model_type == "deepseek_v2" else "deepseek_v3") if fam.mla else "top_k"
        if mo.router != router or mo.expert_type != "swiglu" or mo.residual_mlp or mo.bias_update_rate:
            problems.append(f"MoE must be {router} routing with swiglu experts, no residual MLP, no routing bias")
        if fam.mla:
            if bool(mo.get("shared_expert_gate")) or (int(mo.num_shared_experts) and
                                                      int(mo.shared_expert_dim or mo.expert_dim) != int(mo.expert_dim)):
                problems.append("DeepSeek-V3 shared experts are ungated, each of width expert_dim")
            if fam.model_type == "deepseek_v2" and (bool(mo.renormalize) or int(mo.num_shared_experts) < 1):
                problems.append("DeepSeek-V2 needs moe.renormalize=False and at least one shared expert")
            n_dense = next((i for i, k in enumerate(_ffn_kinds(m)) if k == "moe"), 0)
            if any(k != "mlp" for k in _ffn_kinds(m)[:n_dense]) or any(k != "moe" for k in _ffn_kinds(m)[n_dense:]):
                problems.append("DeepSeek-V3 layers are dense first, then all MoE (first_k_dense_replace)")
        if fam.shared_expert and (int(mo.num_shared_experts) != 1 or not bool(mo.get("shared_expert_gate"))):
            problems.append("Qwen2-MoE needs exactly one gated shared expert")
        if int(mo.k) == 1 and fam.renormalize is None and bool(mo.renormalize):
            problems.append("k=1 is never renormalised here, but norm_topk_prob would renormalise it")
        if fam.renormalize is True and not bool(mo.renormalize):
            problems.append(f"{fam.architecture} always renormalises top-k weights")
    if int(m.get("mtp_depth", 0) or 0) and fam.model_type != "deepseek_v3":
        problems.append(f"multi-token prediction (model.mtp_depth={m.mtp_depth}; only DeepSeek-V3 has it)")
    if problems:
        raise HFError(f"cannot export as {fam.architecture}: " + "; ".join(problems))


def hf_config_from_model(m: Any, architecture: str | None = None,
                         base: Mapping[str, Any] | None = None, dtype: str = "float32") -> dict:
    """The HF ``config.json`` dict for a routezoo ``config.model`` (inverse of
    :func:`model_config_from_hf`); ``base`` (e.g. the imported checkpoint's config) supplies
    the keys routezoo does not model (token ids, ...)."""
    arch = architecture or str(m.get("hf_architecture", "") or "") or infer_architecture(m)
    if arch not in FAMILIES:
        raise HFError(f"unsupported architecture {arch}; supported: {', '.join(supported_architectures())}")
    fam = FAMILIES[arch]
    if fam is SWITCH or _is_encoder_decoder(m):
        return _switch_hf_config(m, arch, base, dtype)
    _check_exportable(m, fam)
    kinds = _ffn_kinds(m)
    out = {k: v for k, v in dict(base or {}).items()
           if k not in ("rope_scaling", "rope_parameters", "torch_dtype", "dtype", "transformers_version")}
    out.update({
        "architectures": [arch],
        "model_type": fam.model_type,
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
        "rope_parameters": _rope_parameters_to_hf(m),
        "tie_word_embeddings": bool(m.tie_embeddings),
        "torch_dtype": dtype,
    })
    if fam.model_type in ("llama", "mistral", "olmoe", "qwen3", "qwen3_moe"):
        out["attention_bias"] = False
    if fam.model_type in ("mistral", "mixtral"):
        out["sliding_window"] = None
    if fam.sliding_window_flag:
        out["use_sliding_window"] = False
    if fam.model_type == "olmoe":
        out["clip_qkv"] = None
    if fam.mla:
        mo = m.moe
        q_rank = int(m.mla_q_lora_rank)
        out.update({
            "attention_bias": False, "num_key_value_heads": int(m.num_heads),
            "q_lora_rank": q_rank if q_rank > 0 else None, "kv_lora_rank": int(m.mla_kv_lora_rank),
            "qk_nope_head_dim": int(m.mla_qk_nope_head_dim), "qk_rope_head_dim": int(m.mla_qk_rope_head_dim),
            "qk_head_dim": int(m.mla_qk_nope_head_dim) + int(m.mla_qk_rope_head_dim),
            "head_dim": int(m.mla_qk_rope_head_dim), "v_head_dim": int(m.mla_v_head_dim),
            "rope_interleave": bool(m.mla_rope_interleave),
            "n_routed_experts": int(mo.num_experts), "num_experts_per_tok": int(mo.k),
            "moe_intermediate_size": int(mo.expert_dim), "n_shared_experts": int(mo.num_shared_experts),
            "n_group": int(mo.deepseek_v3_n_group), "topk_group": int(mo.deepseek_v3_topk_group),
            "routed_scaling_factor": float(mo.deepseek_v3_scaling_factor), "norm_topk_prob": bool(mo.renormalize),
            "first_k_dense_replace": sum(k == "mlp" for k in kinds),
            "num_nextn_predict_layers": int(m.get("mtp_depth", 0) or 0),
        })
        if fam.model_type == "deepseek_v2":
            grouped = int(mo.deepseek_v3_n_group) > 1
            out.update(topk_method="group_limited_greedy" if grouped else "greedy", norm_topk_prob=False,
                       n_group=int(mo.deepseek_v3_n_group) if grouped else None,
                       topk_group=int(mo.deepseek_v3_topk_group) if grouped else None)
            for key in ("rope_interleave", "num_nextn_predict_layers"):   # DeepSeek-V3 only
                del out[key]
        return out
    if fam.moe:
        mo = m.moe
        out["num_experts_per_tok"] = int(mo.k)
        for key in fam.num_experts_keys:
            out[key] = int(mo.num_experts)
        out["router_aux_loss_coef"] = float(mo.load_balance_coef)
        out["output_router_logits"] = False
        if fam.renormalize is None:
            out["norm_topk_prob"] = bool(mo.renormalize)
        if fam.sparse_step:
            out["decoder_sparse_step"] = 1
            out["mlp_only_layers"] = [i for i, k in enumerate(kinds) if k == "mlp"]
            out["moe_intermediate_size"] = int(mo.expert_dim)
        elif not all(k == "moe" for k in kinds):
            raise HFError(f"{arch} has a MoE block in every layer; this model has ffn {','.join(kinds)}")
        else:
            out["intermediate_size"] = int(mo.expert_dim)
        if fam.shared_expert:
            out["shared_expert_intermediate_size"] = int(mo.num_shared_experts) * int(
                mo.shared_expert_dim or mo.expert_dim)
    return out


# ----------------------------------------------------------------------------- tensor maps


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One routezoo parameter from one HF tensor, or one per expert stacked on axis 0.

    The HF tensor (shape ``prod(g) for g in split``) is reshaped to the flattened ``split``
    dims and transposed by ``perm``: ``target = hf.reshape(split dims).transpose(perm)``.
    """

    path: tuple[str, ...]
    hf: tuple[str, ...]
    split: tuple[tuple[int, ...], ...]
    perm: tuple[int, ...]
    stacked: bool = False

    @property
    def split_dims(self) -> tuple[int, ...]:
        return tuple(s for group in self.split for s in group)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(g) for g in self.split)

    @property
    def shape(self) -> tuple[int, ...]:
        inner = tuple(self.split_dims[p] for p in self.perm)
        return ((len(self.hf),) + inner) if self.stacked else inner

    def read(self, reader: "_Reader", index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The target-layout block ``index`` (a tuple of slices; ``None``: all), reading
        only the HF rows (and experts) it needs."""
        bounds = _bounds(index, self.shape)
        if self.stacked:
            (e0, e1), rest = bounds[0], bounds[1:]
            return np.stack([self._read_one(reader, self.hf[e], rest) for e in range(e0, e1)])
        return self._read_one(reader, self.hf[0], bounds)

    def _read_one(self, reader: "_Reader", name: str, bounds: list[tuple[int, int]]) -> np.ndarray:
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
        """(HF name, HF-layout array) pairs of a full target-layout ``value``."""
        inv = tuple(np.argsort(self.perm))
        values = list(value) if self.stacked else [value]
        for name, v in zip(self.hf, values):
            yield name, np.ascontiguousarray(np.asarray(v).transpose(inv).reshape(self.hf_shape))


def _bounds(index: tuple[slice, ...] | None, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    if index is None:
        return [(0, n) for n in shape]
    out = []
    for s, n in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {s} is not supported")
        out.append((start, stop))
    return out


def _identity(path: tuple[str, ...], name: str, shape: tuple[int, ...]) -> TensorMap:
    return TensorMap(path, (name,), tuple((n,) for n in shape), tuple(range(len(shape))))


def _linear(path, name, out_dim: int, in_dim: int) -> TensorMap:
    # torch Linear weight [out, in] -> kernel [in, out]
    return TensorMap(path, (name,), ((out_dim,), (in_dim,)), (1, 0))


def _stacked_linear(path, names, out_dim: int, in_dim: int) -> TensorMap:
    return TensorMap(path, tuple(names), ((out_dim,), (in_dim,)), (1, 0), stacked=True)


def tensor_maps(m: Any, fam: Family) -> list[TensorMap]:
    """Every parameter of DecoderLM(``m``) as a :class:`TensorMap` of HF tensors of ``fam``."""
    if fam is SWITCH:
        return _switch_maps(m)
    d, v = int(m.d_model), int(m.vocab_size)
    maps = [_identity(("embed", "embedding"), "model.embed_tokens.weight", (v, d)),
            _identity(("final_norm", "scale"), "model.norm.weight", (d,))]
    if not m.tie_embeddings:
        maps.append(_linear(("unembed",), "lm_head.weight", v, d))
    for i, kind in enumerate(_ffn_kinds(m)):
        maps += _layer_maps(m, fam, kind, (f"layer{i}",), f"model.layers.{i}")
    for k in range(1, int(m.get("mtp_depth", 0) or 0) + 1):   # DeepSeek-V3 multi-token prediction
        p, L = (f"mtp{k}",), _mtp_layer(int(m.num_layers), k)
        maps += [_identity((*p, "enorm", "scale"), f"{L}.enorm.weight", (d,)),
                 _identity((*p, "hnorm", "scale"), f"{L}.hnorm.weight", (d,)),
                 _linear((*p, "eh_proj"), f"{L}.eh_proj.weight", d, 2 * d),
                 _identity((*p, "norm", "scale"), f"{L}.shared_head.norm.weight", (d,))]
        maps += _layer_maps(m, fam, _ffn_kinds(m)[-1], (*p, "block"), L)
    return maps


def _mtp_layer(num_layers: int, k: int) -> str:
    """HF name of multi-token-prediction module ``k`` (1-based): the layers after the trunk's."""
    return f"model.layers.{num_layers + k - 1}"


def mtp_copies(m: Any) -> dict[str, tuple[str, ...]]:
    """``{HF name: routezoo path}`` of the tensors DeepSeek-V3 checkpoints repeat in each
    multi-token-prediction layer: the (shared) embedding and output head. Import ignores
    them (the trunk's are used, as the report says the modules share them); export writes
    them, as the engines that serve MTP read them there."""
    out = {}
    head = ("embed", "embedding") if m.tie_embeddings else ("unembed",)
    for k in range(1, int(m.get("mtp_depth", 0) or 0) + 1):
        L = _mtp_layer(int(m.num_layers), k)
        out[f"{L}.embed_tokens.weight"] = ("embed", "embedding")
        out[f"{L}.shared_head.head.weight"] = head
    return out


def _layer_maps(m: Any, fam: Family, kind: str, p: tuple[str, ...], L: str) -> list[TensorMap]:
    """One decoder layer's parameters (under path prefix ``p``) from the HF tensors of
    layer ``L`` (e.g. ``model.layers.3``)."""
    d, h, g, k = int(m.d_model), int(m.num_heads), int(m.num_kv_heads), int(m.head_dim)
    a = f"{L}.self_attn"
    maps = [_identity((*p, "attn_norm", "scale"), f"{L}.input_layernorm.weight", (d,)),
            _identity((*p, "ffn_norm", "scale"), f"{L}.post_attention_layernorm.weight", (d,))]
    if fam.mla:
        maps += _mla_maps(m, p, a)
    else:
        maps += [   # q/k/v: [H·K, D] -> [D, H, K]; o: [D, H·K] -> [H, K, D]
            TensorMap((*p, "attn", "q"), (f"{a}.q_proj.weight",), ((h, k), (d,)), (2, 0, 1)),
            TensorMap((*p, "attn", "k"), (f"{a}.k_proj.weight",), ((g, k), (d,)), (2, 0, 1)),
            TensorMap((*p, "attn", "v"), (f"{a}.v_proj.weight",), ((g, k), (d,)), (2, 0, 1)),
            TensorMap((*p, "attn", "o"), (f"{a}.o_proj.weight",), ((d,), (h, k)), (1, 2, 0)),
        ]
    if fam.qkv_bias:
        for name, heads in (("q", h), ("k", g), ("v", g)):
            maps.append(TensorMap((*p, "attn", f"{name}_bias"), (f"{a}.{name}_proj.bias",), ((heads, k),), (0, 1)))
    if fam.qk_norm == "head":
        maps += [_identity((*p, "attn", "q_norm"), f"{a}.q_norm.weight", (k,)),
                 _identity((*p, "attn", "k_norm"), f"{a}.k_norm.weight", (k,))]
    elif fam.qk_norm == "full":
        maps += [TensorMap((*p, "attn", "q_norm"), (f"{a}.q_norm.weight",), ((h, k),), (0, 1)),
                 TensorMap((*p, "attn", "k_norm"), (f"{a}.k_norm.weight",), ((g, k),), (0, 1))]
    if kind == "mlp":
        f = int(m.mlp_dim)
        maps += [_linear((*p, "mlp", "wi"), f"{L}.mlp.up_proj.weight", f, d),
                 _linear((*p, "mlp", "wg"), f"{L}.mlp.gate_proj.weight", f, d),
                 _linear((*p, "mlp", "wo"), f"{L}.mlp.down_proj.weight", d, f)]
        return maps
    mo = m.moe
    e, f = int(mo.num_experts), int(mo.expert_dim)
    if fam.moe == "mixtral":
        blk = f"{L}.block_sparse_moe"
        up, gate, down = "w3", "w1", "w2"
    else:
        blk = f"{L}.mlp"
        up, gate, down = "up_proj", "gate_proj", "down_proj"
    ex = lambda w: [f"{blk}.experts.{j}.{w}.weight" for j in range(e)]
    maps += [
        _linear((*p, "moe", "router", "kernel"), f"{blk}.gate.weight", e, d),
        _stacked_linear((*p, "moe", "experts", "wi"), ex(up), f, d),
        _stacked_linear((*p, "moe", "experts", "wi_gate"), ex(gate), f, d),
        _stacked_linear((*p, "moe", "experts", "wo"), ex(down), d, f),
    ]
    if fam.mla:
        fs = int(mo.num_shared_experts) * int(mo.shared_expert_dim or mo.expert_dim)
        s = f"{blk}.shared_experts"
        if fam.model_type != "deepseek_v2":   # DeepSeek-V2 has no correction bias
            maps += [_identity((*p, "moe", "router", "score_bias"), f"{blk}.gate.e_score_correction_bias", (e,))]
        if fs:
            maps += [_linear((*p, "moe", "shared_experts", "wi"), f"{s}.up_proj.weight", fs, d),
                     _linear((*p, "moe", "shared_experts", "wg"), f"{s}.gate_proj.weight", fs, d),
                     _linear((*p, "moe", "shared_experts", "wo"), f"{s}.down_proj.weight", d, fs)]
    if fam.shared_expert:
        fs = int(mo.num_shared_experts) * int(mo.shared_expert_dim or mo.expert_dim)
        s = f"{blk}.shared_expert"
        maps += [_linear((*p, "moe", "shared_experts", "wi"), f"{s}.up_proj.weight", fs, d),
                 _linear((*p, "moe", "shared_experts", "wg"), f"{s}.gate_proj.weight", fs, d),
                 _linear((*p, "moe", "shared_experts", "wo"), f"{s}.down_proj.weight", d, fs),
                 _linear((*p, "moe", "shared_expert_gate"), f"{blk}.shared_expert_gate.weight", 1, d)]
    return maps


def _mla_maps(m: Any, p: tuple[str, ...], a: str) -> list[TensorMap]:
    """Latent attention (``layers/mla.py``) of layer ``p`` from the HF tensors under ``a``.
    Letters: ``D`` embed, ``H`` heads, ``Q``/``R`` query/kv latent ranks, ``N``/``P``
    no-rope/rope dims, ``K = N + P``, ``V`` value dim."""
    d, h = int(m.d_model), int(m.num_heads)
    q_rank, r = int(m.mla_q_lora_rank), int(m.mla_kv_lora_rank)
    n, rope, v = int(m.mla_qk_nope_head_dim), int(m.mla_qk_rope_head_dim), int(m.mla_v_head_dim)
    k = n + rope
    if q_rank > 0:   # q_a [Q, D] -> [D, Q]; q_b [H·K, Q] -> [Q, H, K]
        maps = [_linear((*p, "attn", "q_a"), f"{a}.q_a_proj.weight", q_rank, d),
                _identity((*p, "attn", "q_a_norm", "scale"), f"{a}.q_a_layernorm.weight", (q_rank,)),
                TensorMap((*p, "attn", "q_b"), (f"{a}.q_b_proj.weight",), ((h, k), (q_rank,)), (2, 0, 1))]
    else:            # q [H·K, D] -> [D, H, K]
        maps = [TensorMap((*p, "attn", "q"), (f"{a}.q_proj.weight",), ((h, k), (d,)), (2, 0, 1))]
    return maps + [
        _linear((*p, "attn", "kv_a"), f"{a}.kv_a_proj_with_mqa.weight", r + rope, d),      # [D, R + P]
        _identity((*p, "attn", "kv_a_norm", "scale"), f"{a}.kv_a_layernorm.weight", (r,)),
        TensorMap((*p, "attn", "kv_b"), (f"{a}.kv_b_proj.weight",), ((h, n + v), (r,)), (2, 0, 1)),  # [R, H, N+V]
        TensorMap((*p, "attn", "o"), (f"{a}.o_proj.weight",), ((d,), (h, v)), (1, 2, 0)),           # [H, V, D]
    ]


# ----------------------------------------------------------------------------- reading


_RAW_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class _Reader:
    """Lazy reader of a set of safetensors files (an index with its shards, or one file)."""

    def __init__(self, directory: str, index_name: str, single_name: str):
        from safetensors import safe_open

        self.directory = directory
        index_path = os.path.join(directory, index_name)
        single_path = os.path.join(directory, single_name)
        if os.path.exists(index_path):
            with open(index_path) as fh:
                weight_map = json.load(fh)["weight_map"]
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
            handle = self._stack.enter_context(safe_open(os.path.join(directory, file), framework="numpy"))
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
        return list(self.location)

    def _slice(self, name: str):
        if name not in self.location:
            raise HFError(f"tensor {name!r} is missing from the checkpoint in {self.directory}")
        return self._files[self.location[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def get(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
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


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass
class Source:
    """A directory to import: an HF checkpoint or a ``routezoo convert`` output."""

    directory: str
    kind: str                              # "hf" | "converted"
    hf_config: dict                        # HF config.json (converted: the original's)
    model_config: ml_collections.ConfigDict
    family: Family | None                  # None for converted dirs

    def maps(self, m: Any | None = None, param_shapes: Mapping[tuple[str, ...], tuple] | None = None
             ) -> list[TensorMap]:
        if self.kind == "hf":
            return tensor_maps(m if m is not None else self.model_config, self.family)
        return [_identity(path, "/".join(path), tuple(shape)) for path, shape in param_shapes.items()]

    def reader(self) -> _Reader:
        if self.kind == "hf":
            return _Reader(self.directory, HF_INDEX, HF_SINGLE)
        return _Reader(self.directory, RZ_INDEX, RZ_SINGLE)


def open_source(path: str, *, dtype: str = "float32", param_dtype: str = "float32") -> Source:
    """Reads the config of an HF checkpoint directory or a converted directory."""
    path = os.fspath(path)
    cfg_path = os.path.join(path, HF_CONFIG)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: not a Hugging Face checkpoint directory")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    if isinstance(cfg.get("model"), dict) and os.path.exists(os.path.join(path, RZ_HF_CONFIG)):
        with open(os.path.join(path, RZ_HF_CONFIG)) as fh:
            hf_cfg = json.load(fh)
        m = ml_collections.ConfigDict(cfg["model"])
        m.dtype, m.param_dtype = dtype, param_dtype
        return Source(path, "converted", hf_cfg, m, None)
    fam = family_of(cfg)
    m = model_config_from_hf(cfg, dtype=dtype, param_dtype=param_dtype)
    if fam.model_type == "deepseek_v3" and int(cfg.get("num_nextn_predict_layers") or 0):
        m.mtp_depth = _mtp_layers_stored(path, int(m.num_layers), int(cfg["num_nextn_predict_layers"]))
    return Source(path, "hf", cfg, m, fam)


def _mtp_layers_stored(path: str, num_layers: int, declared: int) -> int:
    """How many of the ``declared`` multi-token-prediction layers (``model.layers.{N+k}``)
    a DeepSeek-V3 checkpoint holds: the released weights hold them, checkpoints saved by
    transformers (which drops them) do not."""
    with _Reader(path, HF_INDEX, HF_SINGLE) as reader:
        names = set(reader.names())
    k = 0
    while k < declared and f"{_mtp_layer(num_layers, k + 1)}.eh_proj.weight" in names:
        k += 1
    return k


# ----------------------------------------------------------------------------- loading


def _flat(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def abstract_params(model: nn.Module) -> dict:
    """Boxed abstract parameters of ``model`` (shapes, dtypes, logical axis names)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))["params"]


def _strip(tree: Any) -> Any:
    """Removes ``nn.LogicallyPartitioned`` boxes without adding sharding constraints."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
                        tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def param_shardings(model: nn.Module, mesh: jax.sharding.Mesh | None, rules=None) -> dict:
    """Sharding of every parameter: from its logical names on ``mesh`` (``None``: device 0)."""
    boxed = abstract_params(model)
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: dev, _strip(boxed))
    from routezoo.layers import sharding as shd
    rules = shd.DEFAULT_RULES if rules is None else rules
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)


def _check_shapes(maps: list[TensorMap], reader: "_Reader") -> None:
    """Every checkpoint tensor a map reads has the shape the config implies, or HFError
    names the tensor, its file and both shapes."""
    for tm in maps:
        for name in tm.hf:
            got = reader.shape(name)
            if got != tm.hf_shape:
                raise HFError(f"tensor {name!r} ({reader.location[name]}) has shape {list(got)}, but the "
                              f"config implies {list(tm.hf_shape)}")


def load_params(source: Source, model_cfg: Any, shardings: Any, abstract: Any) -> dict:
    """Params tree of DecoderLM(``model_cfg``), each leaf placed with its sharding from
    ``shardings``; ``abstract`` gives shapes and dtypes (unboxed ShapeDtypeStructs)."""
    flat_abs = _flat(abstract)
    flat_shd = _flat(shardings)
    maps = source.maps(model_cfg, {p: a.shape for p, a in flat_abs.items()})
    by_path = {tm.path: tm for tm in maps}
    missing = sorted(set(flat_abs) - set(by_path))
    extra = sorted(set(by_path) - set(flat_abs))
    if missing or extra:  # a bug in the tables, not in the checkpoint
        raise AssertionError(f"tensor maps do not cover the model: missing {missing[:3]}, extra {extra[:3]}")
    out = {}
    with source.reader() as reader:
        expected = {name for tm in maps for name in tm.hf}
        if source.kind == "hf" and model_cfg.tie_embeddings:
            expected.add("lm_head.weight")  # some tied checkpoints store it anyway; unused
        if source.kind == "hf" and source.family is SWITCH:
            expected.update(SWITCH_TIED_COPIES)   # the stacks' copies of shared.weight, if stored
        if source.kind == "hf":
            expected.update(mtp_copies(model_cfg))   # MTP layers' copies of the embedding and head
        unexpected = sorted(n for n in reader.names() if n not in expected and not _IGNORED.search(n))
        if unexpected:
            raise HFError(f"{len(unexpected)} tensors in {source.directory} are not used by the model built "
                          f"from its config, e.g. {', '.join(repr(n) for n in unexpected[:3])}")
        _check_shapes(maps, reader)
        for tm in maps:
            if tm.shape != tuple(flat_abs[tm.path].shape):
                raise AssertionError(f"{'/'.join(tm.path)}: map shape {tm.shape} != model {flat_abs[tm.path].shape}")
            out[tm.path] = _place(tm, reader, flat_abs[tm.path], flat_shd[tm.path])
    return _nest(out)


def _place(tm: TensorMap, reader: _Reader, abstract: Any, sharding: Any) -> jax.Array:
    dtype = np.dtype(abstract.dtype)
    cache: dict[tuple, np.ndarray] = {}   # replicated shards ask for the same block many times

    def callback(index):
        key = tuple(_bounds(index, tm.shape))
        if key not in cache:
            cache[key] = np.ascontiguousarray(tm.read(reader, index).astype(dtype))
        return cache[key]

    return jax.make_array_from_callback(tuple(abstract.shape), sharding, callback)


def _build(model_cfg: Any) -> nn.Module:
    from routezoo import zoo
    return zoo.build(model_cfg)


def from_hf(path: str, mesh: jax.sharding.Mesh | None = None, *, rules=None, dtype: str = "float32",
            param_dtype: str = "float32") -> tuple[nn.Module, dict]:
    """``(model, params)`` from an HF checkpoint directory (or a converted directory).

    ``mesh``: place each parameter sharded by its logical names under ``rules`` (default
    ``layers.sharding.DEFAULT_RULES``); ``None``: everything on the first device.
    ``model.apply({'params': params}, tokens)`` returns ``(logits, aux)``; run it under
    ``jax.set_mesh(mesh)`` and ``nn.logical_axis_rules(rules)`` when sharded.
    """
    source = open_source(path, dtype=dtype, param_dtype=param_dtype)
    model = _build(source.model_config)
    shardings = param_shardings(model, mesh, rules)
    abstract = _strip(abstract_params(model))
    return model, load_params(source, source.model_config, shardings, abstract)


def load_params_for_config(config: Any, mesh: jax.sharding.Mesh | None, shardings: Any) -> dict:
    """Params for a training run from ``config.init.from_hf``, placed with ``shardings``.

    ``config.model`` must describe the checkpoint's architecture (see
    :func:`update_config_from_hf`); ``shardings`` is the params' sharding tree, or a
    TrainState of shardings (its ``.params`` is used). Dtypes follow
    ``config.model.param_dtype``.
    """
    path = config.init.from_hf
    if not path:
        raise ValueError("config.init.from_hf is empty")
    shardings = getattr(shardings, "params", shardings)
    source = open_source(path, param_dtype=str(config.model.param_dtype))
    _check_same_architecture(config.model, source.model_config, path)
    model = _build(config.model)
    abstract = _strip(abstract_params(model))
    if mesh is not None:
        with jax.set_mesh(mesh):
            return load_params(source, config.model, shardings, abstract)
    return load_params(source, config.model, shardings, abstract)


def _arch_items(m: Any) -> dict[str, Any]:
    d = _default_model_config()   # keys a config written before they existed lacks
    out = {k: m[k] if k in m else d[k] for k in MODEL_ARCH_KEYS}
    if "moe" in _ffn_kinds(m):   # a dense model ignores its moe section
        out.update({f"moe.{k}": m.moe[k] if k in m.moe else d.moe[k] for k in MOE_ARCH_KEYS})
    if _is_encoder_decoder(m):
        out.update(_encdec_arch_items(m, d))
    return out


def _check_same_architecture(run: Any, ckpt: Any, path: str) -> None:
    a, b = _arch_items(run), _arch_items(ckpt)
    diff = [f"model.{k}={a.get(k)!r} (checkpoint: {b[k]!r})" for k in sorted(b) if a.get(k) != b[k]]
    if diff:
        raise HFError(f"config.model does not match the checkpoint in {path}: {'; '.join(diff[:4])}; "
                      "call routezoo.zoo.hf.update_config_from_hf(config) first")


def update_config_from_hf(config: Any) -> list[str]:
    """Sets the architecture keys of ``config.model`` from ``config.init.from_hf``'s
    checkpoint (keeping dtypes, dispatch, capacity and loss settings of the run); returns
    the ``model.KEY=value`` changes. Call it before building the model."""
    path = config.init.from_hf
    if not path:
        return []
    ckpt = open_source(path).model_config
    changes = []
    if config.model.get("hf_architecture", None) is not None:
        config.model.hf_architecture = ckpt.hf_architecture
    for key, value in _arch_items(ckpt).items():
        node, leaf = (config.model.moe, key[4:]) if key.startswith("moe.") else (config.model, key)
        if node[leaf] != value:
            changes.append(f"model.{key}={value.to_dict() if hasattr(value, 'to_dict') else value!r}")
            node[leaf] = value
    return changes


# ----------------------------------------------------------------------------- writing


def _host_value(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _np_dtype(name: str | None):
    if name is None:
        return None
    return np.dtype(jnp.dtype(name))


def _write_shards(directory: str, tensors: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]],
                  index_name: str, single_name: str, max_shard_bytes: int, itemsize: Callable[[str], int]
                  ) -> list[str]:
    """Writes ``(name, shape, get)`` tensors into safetensors shards (one tensor in memory
    at a time per shard being written); returns the file names."""
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


def to_hf(model_cfg: Any, params: Mapping[str, Any], out_dir: str, *, architecture: str | None = None,
          base_config: Mapping[str, Any] | None = None, dtype: str | None = None,
          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Writes ``params`` of DecoderLM(``model_cfg``) as an HF checkpoint in ``out_dir``.

    ``architecture``: an HF class name (default: inferred from the layout); ``base_config``:
    HF config keys to keep (e.g. the imported checkpoint's token ids); ``dtype``: tensor
    dtype on disk (default: the parameters'). Each tensor is gathered to the host on its
    own (all processes take part; process 0 writes). Returns ``out_dir``.
    """
    arch = (architecture or str(model_cfg.get("hf_architecture", "") or "")
            or (base_config or {}).get("architectures", [None])[0] or infer_architecture(model_cfg))
    if arch not in FAMILIES:
        raise HFError(f"unsupported architecture {arch}; supported: {', '.join(supported_architectures())}")
    fam = FAMILIES[arch]
    flat = _flat(params)
    maps = tensor_maps(model_cfg, fam)
    disk = _np_dtype(dtype)
    first = next(iter(flat.values()))
    hf_cfg = hf_config_from_model(model_cfg, arch, base_config,
                                  dtype=str(jnp.dtype(dtype or first.dtype).name))
    os.makedirs(out_dir, exist_ok=True)

    items = []
    for tm in maps:
        def get_all(tm=tm):
            value = _host_value(flat[tm.path])
            return dict(tm.to_hf(value if disk is None else value.astype(disk)))
        # Experts of one parameter share one gather; each HF tensor is taken from it.
        cache: dict = {}

        def getter(name, tm=tm, get_all=get_all, cache=cache):
            if "v" not in cache:
                cache["v"] = get_all()
            out = cache["v"].pop(name)
            if not cache["v"]:
                cache.clear()
            return out
        for name in tm.hf:
            items.append((name, tm.hf_shape, (lambda name=name, getter=getter: getter(name))))

    by_path = {tm.path: tm for tm in maps}

    def single(tm):   # the HF array of a one-tensor map
        value = _host_value(flat[tm.path])
        (_, out), = tm.to_hf(value if disk is None else value.astype(disk))
        return out
    for name, path in mtp_copies(model_cfg).items():   # DeepSeek-V3 MTP layers repeat these
        items.append((name, by_path[path].hf_shape, (lambda tm=by_path[path]: single(tm))))

    def itemsize(name):
        return (disk or np.dtype(flat[name_to_path[name]].dtype)).itemsize
    name_to_path = {**{n: tm.path for tm in maps for n in tm.hf}, **mtp_copies(model_cfg)}
    _write_shards(out_dir, items, HF_INDEX, HF_SINGLE, max_shard_bytes, itemsize)
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, HF_CONFIG), "w") as fh:
            json.dump(hf_cfg, fh, indent=2, sort_keys=True)
    return out_dir


def convert_to_routezoo(hf_dir: str, out_dir: str, full_config: Any | None = None,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ml_collections.ConfigDict:
    """Converts an HF checkpoint to a routezoo directory on the host, one tensor at a time.

    Writes ``params*.safetensors`` (routezoo names), ``hf_config.json`` and ``config.json``:
    ``full_config`` (a full run config; its ``model`` section is replaced) or just
    ``{"model": ...}``. Returns the model config.
    """
    source = open_source(hf_dir)
    if source.kind != "hf":
        raise HFError(f"{hf_dir} is already a converted routezoo directory")
    m = source.model_config
    os.makedirs(out_dir, exist_ok=True)
    with source.reader() as reader:
        maps = source.maps()
        _check_shapes(maps, reader)
        items = [("/".join(tm.path), tm.shape, (lambda tm=tm: np.ascontiguousarray(tm.read(reader))))
                 for tm in maps]
        sizes = {"/".join(tm.path): np.dtype(reader.get(tm.hf[0], tuple(slice(0, 1) for _ in tm.hf_shape)).dtype
                                             ).itemsize for tm in maps}
        _write_shards(out_dir, items, RZ_INDEX, RZ_SINGLE, max_shard_bytes, lambda n: sizes[n])
    if full_config is not None:
        full = ml_collections.ConfigDict(full_config)
        full.model = m
        text = full.to_json_best_effort(indent=2, sort_keys=True)
    else:
        text = json.dumps({"model": m.to_dict()}, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, HF_CONFIG), "w") as fh:
        fh.write(text)
    with open(os.path.join(out_dir, RZ_HF_CONFIG), "w") as fh:
        json.dump(source.hf_config, fh, indent=2, sort_keys=True)
    return m


# ----------------------------------------------------------------------------- Switch Transformers
#
# SwitchTransformersForConditionalGeneration (Fedus et al. 2021; T5 v1.0 layout) onto
# zoo/encoder_decoder.py: shared embedding (tied logits scaled by d_model**-0.5, as HF),
# relative attention bias in block 0 of each stack, ReLU dense FFNs, and in the sparse
# layers (layer i of a stack with step s is sparse iff s == 1 or i % s == 1, s =
# layers // num_sparse_*_layers as HF computes it) routezoo's MoE block: top-1 over a
# float32 softmax, the raw probability as the weight, capacity dispatch with exactly
# `expert_capacity` slots per expert and sequence (moe.group_size=0), filled in token order.

SWITCH_TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
ENCDEC_ARCH_KEYS = ("name", "num_decoder_layers", "relative_attention_num_buckets",
                    "relative_attention_max_distance", "encoder_sparse_step", "decoder_sparse_step",
                    "expert_capacity")


def _is_encoder_decoder(m: Any) -> bool:
    return str(m.get("name", "decoder_lm")) == "encoder_decoder"


def _encdec_arch_items(m: Any, d: Any) -> dict[str, Any]:
    from routezoo.zoo.encoder_decoder import stack_kinds
    out = {k: m[k] if k in m else d[k] for k in ENCDEC_ARCH_KEYS}
    if any("moe" in kinds for kinds in stack_kinds(m).values()):
        out.update({f"moe.{k}": m.moe[k] if k in m.moe else d.moe[k] for k in MOE_ARCH_KEYS})
    return out


def _switch_hf_step(num_layers: int, num_sparse: int) -> int:
    """HF's sparse step of a stack (``SwitchTransformersConfig``): ``layers // sparse``,
    or ``layers`` when ``sparse`` is 0 (which still makes layer 1 sparse, as HF does)."""
    return num_layers // num_sparse if num_sparse > 0 else num_layers


def _switch_config_from_hf(hf: Mapping[str, Any], *, dtype: str, param_dtype: str) -> ml_collections.ConfigDict:
    def need(key):
        if key not in hf or hf[key] is None:
            raise HFError(f"config.json of {SWITCH.architecture} has no {key!r}")
        return hf[key]

    act = hf.get("dense_act_fn", "relu")
    if act != "relu":
        raise HFError(f"dense_act_fn {act!r} is not supported for {SWITCH.architecture} (only 'relu': T5 v1.0)")
    if hf.get("router_bias"):
        raise HFError("router_bias=true is not supported (routezoo routers have no bias); allowed: false")
    if str(hf.get("router_dtype", "float32")) != "float32":
        raise HFError(f"router_dtype {hf['router_dtype']!r} is not supported (routezoo routers run in float32)")
    if not hf.get("tie_word_embeddings", True):
        raise HFError("tie_word_embeddings=false is not supported for SwitchTransformersForConditionalGeneration "
                      "(transformers 5 then gives the encoder and the decoder embeddings of their own, apart from "
                      "shared.weight); allowed: true")
    n_enc = int(need("num_layers"))
    n_dec = int(hf.get("num_decoder_layers") or n_enc)
    m = _default_model_config()
    m.name = "encoder_decoder"
    m.vocab_size = int(need("vocab_size"))
    m.d_model = int(need("d_model"))
    m.num_heads = m.num_kv_heads = int(need("num_heads"))
    m.head_dim = int(need("d_kv"))
    m.mlp_dim = int(need("d_ff"))
    m.mlp_type = "relu"
    m.norm = "rmsnorm"
    m.norm_eps = float(hf.get("layer_norm_epsilon", 1e-6))
    m.tie_embeddings = True
    m.scale_tied_logits = True
    m.num_layers = n_enc
    m.num_decoder_layers = n_dec
    m.relative_attention_num_buckets = int(hf.get("relative_attention_num_buckets", 32))
    m.relative_attention_max_distance = int(hf.get("relative_attention_max_distance", 128))
    m.encoder_sparse_step = _switch_hf_step(n_enc, int(hf.get("num_sparse_encoder_layers", 3)))
    m.decoder_sparse_step = _switch_hf_step(n_dec, int(hf.get("num_sparse_decoder_layers", 3)))
    m.expert_capacity = int(need("expert_capacity"))
    if m.expert_capacity < 1:
        raise HFError(f"expert_capacity={m.expert_capacity} must be >= 1")
    m.ffn = "mlp"   # DecoderLM's key; the encoder-decoder's layers come from the sparse steps
    m.dtype = dtype
    m.param_dtype = param_dtype
    m.hf_architecture = SWITCH.architecture
    moe = m.moe
    moe.num_experts = int(need("num_experts"))
    moe.k = 1
    moe.router = "top_k"
    moe.renormalize = False
    moe.dispatch = "capacity"
    moe.capacity_fill = "token"
    moe.group_size = 0                 # capacity per sequence, as HF's cumsum over each row
    moe.min_capacity = 0
    moe.expert_dim = m.mlp_dim
    moe.expert_type = "relu"
    moe.num_shared_experts = moe.shared_expert_dim = 0
    moe.shared_expert_gate = moe.residual_mlp = False
    moe.every = 1
    moe.jitter = float(hf.get("router_jitter_noise", 0.0) or 0.0)
    moe.load_balance_coef = float(hf.get("router_aux_loss_coef", 0.0) or 0.0)
    moe.z_loss_coef = float(hf.get("router_z_loss_coef", 0.0) or 0.0)
    moe.bias_update_rate = 0.0
    moe.batch_prioritized = False
    return m


def _switch_num_sparse(num_layers: int, step: int, stack: str) -> int:
    """``num_sparse_*_layers`` for which HF builds the same sparse layers as ``step``."""
    from routezoo.zoo.encoder_decoder import sparse_kinds
    want = sparse_kinds(num_layers, step)
    for n in range(num_layers + 1):
        if sparse_kinds(num_layers, _switch_hf_step(num_layers, n)) == want:
            return n
    raise HFError(f"the {stack}'s MoE layers ({','.join(want)}) cannot be written as {SWITCH.architecture}: HF puts "
                  f"them at i % (layers // num_sparse) == 1 and always has one (model.{stack}_sparse_step={step})")


def _switch_hf_config(m: Any, arch: str, base: Mapping[str, Any] | None, dtype: str) -> dict:
    if arch != SWITCH.architecture or not _is_encoder_decoder(m):
        raise HFError(f"cannot export model.name={m.get('name', 'decoder_lm')!r} as {arch}: "
                      f"{SWITCH.architecture} is model.name='encoder_decoder' and only that")
    mo = m.moe
    problems = []
    if not m.tie_embeddings:
        problems.append("untied embeddings (tie_word_embeddings=false has three embeddings in transformers 5)")
    if m.mlp_type != "relu" or m.norm != "rmsnorm":
        problems.append(f"mlp_type {m.mlp_type!r}, norm {m.norm!r} (needs relu, rmsnorm)")
    if (mo.router != "top_k" or int(mo.k) != 1 or mo.expert_type != "relu" or int(mo.num_shared_experts)
            or mo.residual_mlp or float(mo.bias_update_rate) or int(mo.expert_dim) != int(m.mlp_dim)):
        problems.append("MoE must be top_k with k=1, relu experts of width mlp_dim, no shared/residual experts, "
                        "no routing bias")
    if (int(m.get("expert_capacity", 0)) < 1 or mo.dispatch != "capacity" or int(mo.group_size)
            or bool(mo.batch_prioritized)):
        problems.append("HF drops tokens beyond a fixed capacity per sequence: needs model.expert_capacity >= 1, "
                        "moe.dispatch='capacity', moe.group_size=0, moe.batch_prioritized=False")
    if problems:
        raise HFError(f"cannot export as {arch}: " + "; ".join(problems))
    from routezoo.zoo.encoder_decoder import num_decoder_layers
    n_enc, n_dec = int(m.num_layers), num_decoder_layers(m)
    n_sparse_enc = _switch_num_sparse(n_enc, int(m.encoder_sparse_step), "encoder")
    n_sparse_dec = _switch_num_sparse(n_dec, int(m.decoder_sparse_step), "decoder")
    out = {k: v for k, v in dict(base or {}).items() if k not in ("torch_dtype", "dtype", "transformers_version")}
    out.update({
        "architectures": [arch], "model_type": SWITCH.model_type, "is_encoder_decoder": True,
        "vocab_size": int(m.vocab_size), "d_model": int(m.d_model), "d_kv": int(m.head_dim), "d_ff": int(m.mlp_dim),
        "num_heads": int(m.num_heads), "num_layers": n_enc, "num_decoder_layers": n_dec,
        "num_sparse_encoder_layers": n_sparse_enc, "num_sparse_decoder_layers": n_sparse_dec,
        "encoder_sparse_step": _switch_hf_step(n_enc, n_sparse_enc),
        "decoder_sparse_step": _switch_hf_step(n_dec, n_sparse_dec),
        "num_experts": int(mo.num_experts), "expert_capacity": int(m.expert_capacity),
        "relative_attention_num_buckets": int(m.relative_attention_num_buckets),
        "relative_attention_max_distance": int(m.relative_attention_max_distance),
        "layer_norm_epsilon": float(m.norm_eps), "dense_act_fn": "relu", "router_bias": False,
        "router_dtype": "float32", "router_jitter_noise": float(mo.jitter),
        "router_aux_loss_coef": float(mo.load_balance_coef), "router_z_loss_coef": float(mo.z_loss_coef),
        "tie_word_embeddings": bool(m.tie_embeddings), "dtype": dtype,
    })
    for key, default in (("pad_token_id", 0), ("eos_token_id", 1), ("decoder_start_token_id", 0)):
        out.setdefault(key, default)
    return out


def _switch_maps(m: Any) -> list[TensorMap]:
    """Every parameter of EncoderDecoderLM(``m``) from the HF Switch Transformers tensors."""
    from routezoo.zoo.encoder_decoder import stack_kinds
    d, h, k, v, f = int(m.d_model), int(m.num_heads), int(m.head_dim), int(m.vocab_size), int(m.mlp_dim)
    e, fe = int(m.moe.num_experts), int(m.moe.expert_dim)

    def attn(path, prefix):   # q/k/v: [H·K, D] -> [D, H, K]; o: [D, H·K] -> [H, K, D]
        return [TensorMap(path + (n,), (f"{prefix}.{n}.weight",), ((h, k), (d,)), (2, 0, 1)) for n in "qkv"] + [
            TensorMap(path + ("o",), (f"{prefix}.o.weight",), ((d,), (h, k)), (1, 2, 0))]

    maps = [_identity(("embed", "embedding"), "shared.weight", (v, d))]
    if not m.tie_embeddings:
        maps.append(_linear(("unembed",), "lm_head.weight", v, d))
    for stack, kinds in stack_kinds(m).items():
        maps += [_identity((stack, "final_norm", "scale"), f"{stack}.final_layer_norm.weight", (d,)),
                 _identity((stack, "relpos", "table"),
                           f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                           (int(m.relative_attention_num_buckets), h))]
        for i, kind in enumerate(kinds):
            p, blk = (stack, f"layer{i}"), f"{stack}.block.{i}.layer"
            maps += attn(p + ("attn",), f"{blk}.0.SelfAttention")
            maps.append(_identity(p + ("attn_norm", "scale"), f"{blk}.0.layer_norm.weight", (d,)))
            ff = 1
            if stack == "decoder":
                maps += attn(p + ("cross",), f"{blk}.1.EncDecAttention")
                maps.append(_identity(p + ("cross_norm", "scale"), f"{blk}.1.layer_norm.weight", (d,)))
                ff = 2
            maps.append(_identity(p + ("ffn_norm", "scale"), f"{blk}.{ff}.layer_norm.weight", (d,)))
            mlp = f"{blk}.{ff}.mlp"
            if kind == "mlp":
                maps += [_linear(p + ("mlp", "wi"), f"{mlp}.wi.weight", f, d),
                         _linear(p + ("mlp", "wo"), f"{mlp}.wo.weight", d, f)]
            else:
                ex = lambda w: [f"{mlp}.experts.expert_{j}.{w}.weight" for j in range(e)]
                maps += [_linear(p + ("moe", "router", "kernel"), f"{mlp}.router.classifier.weight", e, d),
                         _stacked_linear(p + ("moe", "experts", "wi"), ex("wi"), fe, d),
                         _stacked_linear(p + ("moe", "experts", "wo"), ex("wo"), d, fe)]
    return maps


__all__ = ["FAMILIES", "HFError", "TensorMap", "from_hf", "to_hf", "load_params_for_config",
           "update_config_from_hf", "model_config_from_hf", "hf_config_from_model", "convert_to_routezoo",
           "supported_architectures", "open_source", "tensor_maps"]
