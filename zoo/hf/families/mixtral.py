"""Mixture-of-experts decoders: ``MixtralForCausalLM``, ``Qwen2MoeForCausalLM`` (shared
expert with a sigmoid gate, dense layers by ``decoder_sparse_step`` / ``mlp_only_layers``),
``Qwen3MoeForCausalLM``, ``OlmoeForCausalLM`` (QK norm over all heads).

Each maps onto DecoderLM with dropless top-k routing: softmax over all experts, top-k,
renormalised when the family does (Mixtral always, Qwen/OLMoE by ``norm_topk_prob``).
Letters: ``D`` embed, ``E`` experts, ``F`` expert width.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from routezoo.zoo.hf.families.decoder import DecoderFamily
from routezoo.zoo.hf.registry import HFError, register
from routezoo.zoo.hf.tensor_map import TensorMap, linear, stacked_linear


@dataclasses.dataclass(frozen=True)
class MoeFamily(DecoderFamily):
    """A decoder family with mixture-of-experts layers.

    Attributes:
      sparse_step: the family has ``decoder_sparse_step`` / ``mlp_only_layers``.
      expert_dim_key: HF config key of the expert width.
      num_experts_keys: HF config keys of the expert count, first present wins.
      moe_block: HF module of a layer's MoE block (``'mlp'`` / ``'block_sparse_moe'``).
      expert_weights: HF names of each expert's up, gate and down projections.
      shared_expert: one shared expert with a sigmoid gate.
    """

    moe: bool = True
    sparse_step: bool = False
    expert_dim_key: str = "intermediate_size"
    num_experts_keys: tuple[str, ...] = ("num_experts",)
    moe_block: str = "mlp"
    expert_weights: tuple[str, str, str] = ("up_proj", "gate_proj", "down_proj")
    shared_expert: bool = False

    def layer_kinds(self, hf: Mapping[str, Any], n: int, num_experts: int) -> list[str]:
        """The feed-forward kind of each of the ``n`` layers of an HF config.

        Args:
          hf: the HF config dict.
          n: the number of layers.
          num_experts: the expert count.

        Returns:
          ``'mlp'`` / ``'moe'`` per layer.
        """
        if not self.sparse_step:
            return ["moe"] * n
        step = int(hf.get("decoder_sparse_step", 1) or 1)
        only = set(hf.get("mlp_only_layers") or [])
        return ["moe" if (i not in only and num_experts > 0 and (i + 1) % step == 0) else "mlp"
                for i in range(n)]

    def _ffn_from_hf(self, hf: Mapping[str, Any], m: Any, need: Callable[[str], Any]) -> None:
        moe = m.moe
        num_experts = next((int(hf[k]) for k in self.num_experts_keys if hf.get(k)), 0)
        if num_experts < 1:
            raise HFError(f"config.json of {self.architecture} has no expert count "
                          f"({' or '.join(self.num_experts_keys)})")
        kinds = self.layer_kinds(hf, int(m.num_layers), num_experts)
        m.ffn = "mlp" if "moe" not in kinds else ("moe" if all(k == "moe" for k in kinds) else ",".join(kinds))
        moe.num_experts = num_experts
        moe.k = int(need("num_experts_per_tok"))
        moe.router = "top_k"
        moe.dispatch = "dropless"          # HF models drop no token
        moe.expert_dim = int(hf.get(self.expert_dim_key) or m.mlp_dim)
        moe.expert_type = "swiglu"
        moe.num_shared_experts = 1 if self.shared_expert else 0
        moe.shared_expert_dim = int(need("shared_expert_intermediate_size")) if self.shared_expert else 0
        moe.shared_expert_gate = self.shared_expert
        moe.residual_mlp = False
        moe.every = 1
        moe.renormalize = self.renormalize if self.renormalize is not None else bool(hf.get("norm_topk_prob", False))
        self._check_top1(moe)
        moe.jitter = 0.0
        moe.load_balance_coef = float(hf.get("router_aux_loss_coef", 0.0) or 0.0)
        moe.z_loss_coef = float(hf.get("router_z_loss_coef", 0.0) or 0.0)
        moe.bias_update_rate = 0.0
        moe.batch_prioritized = False
        self._routing_from_hf(hf, moe, need)

    def _check_top1(self, moe: Any) -> None:
        """Refuses top-1 routing with renormalised weights."""
        if moe.k == 1 and moe.renormalize:
            raise HFError("num_experts_per_tok=1 with renormalised top-k weights (always 1.0) is not supported: "
                          "routezoo's top-1 routing keeps the raw probability (Switch)")

    def _routing_from_hf(self, hf: Mapping[str, Any], moe: Any, need: Callable[[str], Any]) -> None:
        """Routing keys of ``config.model.moe`` beyond top-k (in place)."""

    def _moe_problems(self, m: Any) -> list[str]:
        mo = m.moe
        if self.shared_expert and (int(mo.num_shared_experts) != 1 or not bool(mo.get("shared_expert_gate"))):
            return ["Qwen2-MoE needs exactly one gated shared expert"]
        return []

    def _ffn_to_hf(self, m: Any, kinds: tuple[str, ...], out: dict) -> None:
        mo = m.moe
        out["num_experts_per_tok"] = int(mo.k)
        for key in self.num_experts_keys:
            out[key] = int(mo.num_experts)
        out["router_aux_loss_coef"] = float(mo.load_balance_coef)
        out["output_router_logits"] = False
        if self.renormalize is None:
            out["norm_topk_prob"] = bool(mo.renormalize)
        if self.sparse_step:
            out["decoder_sparse_step"] = 1
            out["mlp_only_layers"] = [i for i, k in enumerate(kinds) if k == "mlp"]
            out["moe_intermediate_size"] = int(mo.expert_dim)
        elif not all(k == "moe" for k in kinds):
            raise HFError(f"{self.architecture} has a MoE block in every layer; this model has ffn {','.join(kinds)}")
        else:
            out["intermediate_size"] = int(mo.expert_dim)
        if self.shared_expert:
            out["shared_expert_intermediate_size"] = int(mo.num_shared_experts) * int(
                mo.shared_expert_dim or mo.expert_dim)

    def _ffn_maps(self, m: Any, kind: str, p: tuple[str, ...], L: str) -> list[TensorMap]:
        d = int(m.d_model)
        mo = m.moe
        e, f = int(mo.num_experts), int(mo.expert_dim)
        blk = f"{L}.{self.moe_block}"
        up, gate, down = self.expert_weights
        ex = lambda w: [f"{blk}.experts.{j}.{w}.weight" for j in range(e)]
        maps = [
            linear((*p, "moe", "router", "kernel"), f"{blk}.gate.weight", e, d),
            stacked_linear((*p, "moe", "experts", "wi"), ex(up), f, d),
            stacked_linear((*p, "moe", "experts", "wi_gate"), ex(gate), f, d),
            stacked_linear((*p, "moe", "experts", "wo"), ex(down), d, f),
        ]
        return maps + self._moe_extra_maps(m, p, blk)

    def _moe_extra_maps(self, m: Any, p: tuple[str, ...], blk: str) -> list[TensorMap]:
        """The MoE block's parameters beyond router and experts: the gated shared expert."""
        if not self.shared_expert:
            return []
        d, mo = int(m.d_model), m.moe
        fs = int(mo.num_shared_experts) * int(mo.shared_expert_dim or mo.expert_dim)
        s = f"{blk}.shared_expert"
        return [linear((*p, "moe", "shared_experts", "wi"), f"{s}.up_proj.weight", fs, d),
                linear((*p, "moe", "shared_experts", "wg"), f"{s}.gate_proj.weight", fs, d),
                linear((*p, "moe", "shared_experts", "wo"), f"{s}.down_proj.weight", d, fs),
                linear((*p, "moe", "shared_expert_gate"), f"{blk}.shared_expert_gate.weight", 1, d)]


_MOE = (("mla", False), ("moe", True))

MIXTRAL = MoeFamily("MixtralForCausalLM", "mixtral", renormalize=True, moe_block="block_sparse_moe",
                    expert_weights=("w3", "w1", "w2"), num_experts_keys=("num_local_experts", "num_experts"),
                    export_constants=(("sliding_window", None),),
                    infer_when=_MOE + (("shared", False), ("qkv_bias", False), ("qk_norm", "none"),
                                       ("all_moe", True), ("renormalize", True)))
QWEN2_MOE = MoeFamily("Qwen2MoeForCausalLM", "qwen2_moe", qkv_bias=True, shared_expert=True, sparse_step=True,
                      expert_dim_key="moe_intermediate_size", sliding_window_flag=True,
                      export_constants=(("use_sliding_window", False),),
                      infer_when=_MOE + (("shared", True), ("qkv_bias", True), ("qk_norm", "none")))
QWEN3_MOE = MoeFamily("Qwen3MoeForCausalLM", "qwen3_moe", qk_norm="head", sparse_step=True,
                      expert_dim_key="moe_intermediate_size", num_experts_keys=("num_experts", "num_local_experts"),
                      sliding_window_flag=True,
                      export_constants=(("attention_bias", False), ("use_sliding_window", False)),
                      infer_when=_MOE + (("shared", False), ("qkv_bias", False), ("qk_norm", "head")))
OLMOE = MoeFamily("OlmoeForCausalLM", "olmoe", qk_norm="full",
                  export_constants=(("attention_bias", False), ("clip_qkv", None)),
                  infer_when=_MOE + (("shared", False), ("qkv_bias", False), ("qk_norm", "full"), ("all_moe", True)))

register(MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE)
