"""DeepSeek decoders: ``DeepseekV3ForCausalLM`` and ``DeepseekV2ForCausalLM``.

Both map onto DecoderLM with multi-head latent attention (:mod:`routezoo.layers.mla`;
with or without a query latent), shared experts and the first ``first_k_dense_replace``
layers dense. DeepSeek-V3: sigmoid group-limited routing with a correction bias and scaled
weights (``moe.router='deepseek_v3'``, :mod:`routezoo.layers.routers.deepseek`) and
multi-token-prediction layers (``model.mtp_depth``). DeepSeek-V2: softmax routing,
``topk_method`` 'greedy' or 'group_limited_greedy', scaled weights (``moe.router=
'deepseek_v2'``), always interleaved rope; ``norm_topk_prob`` and ``moe_layer_freq`` other
than 1 are refused, as transformers ignores them. Both import YaRN rope scaling.

Letters of latent attention: ``D`` embed, ``H`` heads, ``Q``/``Y`` query/kv latent ranks,
``d``/``P`` no-rope/rope dims, ``A = d + P``, ``v`` value dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

from routezoo.zoo.hf.families.decoder import layout
from routezoo.zoo.hf.families.mixtral import MoeFamily
from routezoo.zoo.hf.registry import HFError, ffn_kinds, register
from routezoo.zoo.hf.tensor_map import TensorMap, identity, linear

# transformers' DeepSeek-V2 config has no rope_interleave key: it always rotates interleaved pairs.
_INTERLEAVED_ONLY_MODEL_TYPE = "deepseek_v2"


@dataclasses.dataclass(frozen=True)
class DeepseekFamily(MoeFamily):
    """What DeepSeek-V2 and -V3 share: latent attention, shared experts, dense layers first."""

    mla: bool = True
    expert_dim_key: str = "moe_intermediate_size"
    num_experts_keys: tuple[str, ...] = ("n_routed_experts",)

    # ------------------------------------------------------------------ config.json -> config.model

    def layer_kinds(self, hf: Mapping[str, Any], n: int, num_experts: int) -> list[str]:
        first = int(hf.get("first_k_dense_replace") or 0)
        return ["mlp" if i < first else "moe" for i in range(n)]

    def _attention_from_hf(self, hf: Mapping[str, Any], m: Any, need: Callable[[str], Any]) -> None:
        if int(m.num_kv_heads) != int(m.num_heads):
            raise HFError(f"num_key_value_heads={m.num_kv_heads} != num_attention_heads={m.num_heads} is not "
                          "supported for DeepSeek-V2/V3 (latent attention expands keys to every head)")
        m.attention = "mla"
        m.mla_q_lora_rank = int(hf.get("q_lora_rank") or 0)
        m.mla_kv_lora_rank = int(need("kv_lora_rank"))
        m.mla_qk_nope_head_dim = int(need("qk_nope_head_dim"))
        m.mla_qk_rope_head_dim = int(need("qk_rope_head_dim"))
        m.mla_v_head_dim = int(need("v_head_dim"))
        m.mla_rope_interleave = (True if hf.get("model_type") == _INTERLEAVED_ONLY_MODEL_TYPE
                                 else bool(hf.get("rope_interleave", True)))
        m.head_dim = m.mla_qk_rope_head_dim   # as transformers sets it (unused by latent attention)

    def _check_top1(self, moe: Any) -> None:
        """Top-1 with renormalised weights is the router's to judge (see :meth:`_routing_from_hf`)."""

    def _routing_from_hf(self, hf: Mapping[str, Any], moe: Any, need: Callable[[str], Any]) -> None:
        moe.router = "deepseek_v3"
        moe.renormalize = bool(hf.get("norm_topk_prob", False))
        moe.deepseek_v3_n_group = int(hf.get("n_group") or 1)
        moe.deepseek_v3_topk_group = int(hf.get("topk_group") or moe.deepseek_v3_n_group)
        moe.deepseek_v3_scaling_factor = float(hf.get("routed_scaling_factor", 1.0) or 1.0)
        moe.num_shared_experts = int(hf.get("n_shared_experts") or 0)
        moe.shared_expert_dim = moe.expert_dim if moe.num_shared_experts else 0
        self._topk_method_from_hf(hf, moe, need)
        try:
            from routezoo.layers.routers import ROUTERS
            ROUTERS[moe.router].check_config(moe, causal=True)
        except ValueError as e:
            raise HFError(f"{self.architecture}: {e}") from e

    def _topk_method_from_hf(self, hf: Mapping[str, Any], moe: Any, need: Callable[[str], Any]) -> None:
        """Routing keys particular to one DeepSeek version (in place)."""

    # ------------------------------------------------------------------ config.model -> config.json

    def _moe_problems(self, m: Any) -> list[str]:
        mo, kinds = m.moe, ffn_kinds(m)
        problems = []
        if bool(mo.get("shared_expert_gate")) or (int(mo.num_shared_experts) and
                                                  int(mo.shared_expert_dim or mo.expert_dim) != int(mo.expert_dim)):
            problems.append("DeepSeek-V3 shared experts are ungated, each of width expert_dim")
        problems += self._routing_problems(m)
        n_dense = next((i for i, k in enumerate(kinds) if k == "moe"), 0)
        if any(k != "mlp" for k in kinds[:n_dense]) or any(k != "moe" for k in kinds[n_dense:]):
            problems.append("DeepSeek-V3 layers are dense first, then all MoE (first_k_dense_replace)")
        return problems

    def _routing_problems(self, m: Any) -> list[str]:
        """Problems of the routing settings particular to one DeepSeek version."""
        return []

    def _ffn_to_hf(self, m: Any, kinds: tuple[str, ...], out: dict) -> None:
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

    # ------------------------------------------------------------------ tensors

    def _attention_maps(self, m: Any, p: tuple[str, ...], a: str) -> list[TensorMap]:
        """Latent attention (``layers/mla.py``) of layer ``p`` from the HF tensors under ``a``."""
        d, h = int(m.d_model), int(m.num_heads)
        q_rank, r = int(m.mla_q_lora_rank), int(m.mla_kv_lora_rank)
        n, rope, v = int(m.mla_qk_nope_head_dim), int(m.mla_qk_rope_head_dim), int(m.mla_v_head_dim)
        k = n + rope
        if q_rank > 0:   # q_a [Q, D] -> [D, Q]; q_b [H·A, Q] -> [Q, H, A]
            maps = [linear((*p, "attn", "q_a"), f"{a}.q_a_proj.weight", q_rank, d),
                    identity((*p, "attn", "q_a_norm", "scale"), f"{a}.q_a_layernorm.weight", (q_rank,)),
                    TensorMap((*p, "attn", "q_b"), (f"{a}.q_b_proj.weight",), ((h, k), (q_rank,)), (2, 0, 1))]
        else:            # q [H·A, D] -> [D, H, A]
            maps = [TensorMap((*p, "attn", "q"), (f"{a}.q_proj.weight",), ((h, k), (d,)), (2, 0, 1))]
        maps += [
            linear((*p, "attn", "kv_a"), f"{a}.kv_a_proj_with_mqa.weight", r + rope, d),      # [D, Y + P]
            identity((*p, "attn", "kv_a_norm", "scale"), f"{a}.kv_a_layernorm.weight", (r,)),
            TensorMap((*p, "attn", "kv_b"), (f"{a}.kv_b_proj.weight",), ((h, n + v), (r,)), (2, 0, 1)),  # [Y, H, d+v]
            TensorMap((*p, "attn", "o"), (f"{a}.o_proj.weight",), ((d,), (h, v)), (1, 2, 0)),           # [H, v, D]
        ]
        return maps + self._qk_maps(m, p, a)

    def _moe_extra_maps(self, m: Any, p: tuple[str, ...], blk: str) -> list[TensorMap]:
        d, mo = int(m.d_model), m.moe
        fs = int(mo.num_shared_experts) * int(mo.shared_expert_dim or mo.expert_dim)
        s = f"{blk}.shared_experts"
        maps = self._router_bias_maps(m, p, blk)
        if fs:
            maps += [linear((*p, "moe", "shared_experts", "wi"), f"{s}.up_proj.weight", fs, d),
                     linear((*p, "moe", "shared_experts", "wg"), f"{s}.gate_proj.weight", fs, d),
                     linear((*p, "moe", "shared_experts", "wo"), f"{s}.down_proj.weight", d, fs)]
        return maps

    def _router_bias_maps(self, m: Any, p: tuple[str, ...], blk: str) -> list[TensorMap]:
        """The router's correction bias, where the version has one."""
        return []


def mtp_layer(num_layers: int, k: int) -> str:
    """HF name of multi-token-prediction module ``k`` (1-based): the layers after the trunk's.

    Args:
      num_layers: the trunk's layer count.
      k: the module's number.

    Returns:
      The HF layer prefix (``model.layers.{num_layers + k - 1}``).
    """
    return f"model.layers.{num_layers + k - 1}"


def mtp_copies(m: Any) -> dict[str, tuple[str, ...]]:
    """The tensors DeepSeek-V3 checkpoints repeat in each multi-token-prediction layer.

    They are the (shared) embedding and output head. Import ignores them (the trunk's are
    used, as the report says the modules share them); export writes them, as the engines
    that serve MTP read them there.

    Args:
      m: the model config.

    Returns:
      ``{HF name: routezoo path}``.
    """
    out = {}
    head = ("embed", "embedding") if m.tie_embeddings else ("unembed",)
    for k in range(1, int(m.get("mtp_depth", 0) or 0) + 1):
        L = mtp_layer(int(m.num_layers), k)
        out[f"{L}.embed_tokens.weight"] = ("embed", "embedding")
        out[f"{L}.shared_head.head.weight"] = head
    return out


@dataclasses.dataclass(frozen=True)
class DeepseekV3Family(DeepseekFamily):
    """DeepSeek-V3: sigmoid routing with a correction bias; multi-token prediction."""

    router: str = "deepseek_v3"
    mtp: bool = True

    def infers(self, m: Any) -> bool:
        lay = layout(m)
        return lay["mla"] and not (lay["moe"] and lay["router"] == DEEPSEEK_V2.router)

    def config_from_checkpoint(self, hf: Mapping[str, Any], m: Any, tensor_names: Callable[[], Iterable[str]]
                               ) -> None:
        """``model.mtp_depth``: how many of the declared MTP layers the checkpoint holds.

        The released weights hold them, checkpoints saved by transformers (which drops them)
        do not.
        """
        declared = int(hf.get("num_nextn_predict_layers") or 0)
        if not declared:
            return
        names, num_layers, k = set(tensor_names()), int(m.num_layers), 0
        while k < declared and f"{mtp_layer(num_layers, k + 1)}.eh_proj.weight" in names:
            k += 1
        m.mtp_depth = k

    def _router_bias_maps(self, m: Any, p: tuple[str, ...], blk: str) -> list[TensorMap]:
        e = int(m.moe.num_experts)
        return [identity((*p, "moe", "router", "score_bias"), f"{blk}.gate.e_score_correction_bias", (e,))]

    def tensor_maps(self, m: Any) -> list[TensorMap]:
        maps = super().tensor_maps(m)
        d = int(m.d_model)
        for k in range(1, int(m.get("mtp_depth", 0) or 0) + 1):
            p, L = (f"mtp{k}",), mtp_layer(int(m.num_layers), k)
            maps += [identity((*p, "enorm", "scale"), f"{L}.enorm.weight", (d,)),
                     identity((*p, "hnorm", "scale"), f"{L}.hnorm.weight", (d,)),
                     linear((*p, "eh_proj"), f"{L}.eh_proj.weight", d, 2 * d),
                     identity((*p, "norm", "scale"), f"{L}.shared_head.norm.weight", (d,))]
            maps += self.layer_maps(m, ffn_kinds(m)[-1], (*p, "block"), L)
        return maps

    def copies(self, m: Any) -> dict[str, tuple[str, ...]]:
        return mtp_copies(m)


@dataclasses.dataclass(frozen=True)
class DeepseekV2Family(DeepseekFamily):
    """DeepSeek-V2: softmax routing, greedy or group-limited; interleaved rope only."""

    router: str = "deepseek_v2"

    def infers(self, m: Any) -> bool:
        lay = layout(m)
        return lay["mla"] and lay["moe"] and lay["router"] == self.router

    def _topk_method_from_hf(self, hf: Mapping[str, Any], moe: Any, need: Callable[[str], Any]) -> None:
        """``topk_method`` 'greedy' (``n_group = 1``) or 'group_limited_greedy' (``n_group``/
        ``topk_group``), softmax scores times ``routed_scaling_factor``, as transformers'
        DeepseekV2TopkRouter."""
        moe.router = self.router
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
            raise HFError(f"DeepseekV2ForCausalLM: moe_layer_freq={hf['moe_layer_freq']} is not supported "
                          "(transformers puts a MoE block in every layer after first_k_dense_replace); allowed: 1")
        if moe.num_shared_experts < 1:
            raise HFError(f"DeepseekV2ForCausalLM: n_shared_experts={hf.get('n_shared_experts')} is not supported "
                          "(transformers always builds the shared experts); allowed: >= 1")
        moe.renormalize = False

    def _layout_problems(self, m: Any) -> list[str]:
        if not bool(m.get("mla_rope_interleave", True)):
            return ["mla_rope_interleave False (DeepSeek-V2 rotates interleaved pairs)"]
        return []

    def _routing_problems(self, m: Any) -> list[str]:
        mo = m.moe
        if bool(mo.renormalize) or int(mo.num_shared_experts) < 1:
            return ["DeepSeek-V2 needs moe.renormalize=False and at least one shared expert"]
        return []

    def _ffn_to_hf(self, m: Any, kinds: tuple[str, ...], out: dict) -> None:
        super()._ffn_to_hf(m, kinds, out)
        mo = m.moe
        grouped = int(mo.deepseek_v3_n_group) > 1
        out.update(topk_method="group_limited_greedy" if grouped else "greedy", norm_topk_prob=False,
                   n_group=int(mo.deepseek_v3_n_group) if grouped else None,
                   topk_group=int(mo.deepseek_v3_topk_group) if grouped else None)
        for key in ("rope_interleave", "num_nextn_predict_layers"):   # DeepSeek-V3 only
            del out[key]


DEEPSEEK_V3 = DeepseekV3Family("DeepseekV3ForCausalLM", "deepseek_v3")
DEEPSEEK_V2 = DeepseekV2Family("DeepseekV2ForCausalLM", "deepseek_v2")

register(DEEPSEEK_V3, DEEPSEEK_V2)
