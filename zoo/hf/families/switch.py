"""Encoder-decoder: ``SwitchTransformersForConditionalGeneration`` onto
:class:`routezoo.zoo.encoder_decoder.EncoderDecoderLM` (``model.name='encoder_decoder'``).

Switch Transformers (Fedus et al. 2021; T5 v1.0 layout): shared embedding (tied logits
scaled by d_model**-0.5, as HF), relative attention bias in block 0 of each stack, ReLU
dense FFNs, and in the sparse layers (layer i of a stack with step s is sparse iff s == 1 or
i % s == 1, s = layers // num_sparse_*_layers as HF computes it) routezoo's MoE block: top-1
over a float32 softmax, the raw probability as the weight, capacity dispatch with exactly
``expert_capacity`` slots per expert and sequence (moe.group_size=0), filled in token
order. Tied embeddings only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from routezoo.zoo.hf.registry import MOE_ARCH_KEYS, Family, HFError, default_model_config, register
from routezoo.zoo.hf.tensor_map import TensorMap, identity, linear, stacked_linear

SWITCH_TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
ENCDEC_ARCH_KEYS = ("name", "num_decoder_layers", "relative_attention_num_buckets",
                    "relative_attention_max_distance", "encoder_sparse_step", "decoder_sparse_step",
                    "expert_capacity")


def _hf_step(num_layers: int, num_sparse: int) -> int:
    """HF's sparse step of a stack (``SwitchTransformersConfig``): ``layers // sparse``,
    or ``layers`` when ``sparse`` is 0 (which still makes layer 1 sparse, as HF does)."""
    return num_layers // num_sparse if num_sparse > 0 else num_layers


@dataclasses.dataclass(frozen=True)
class SwitchFamily(Family):
    """Switch Transformers onto EncoderDecoderLM; the only family of ``model.name='encoder_decoder'``."""

    def claims(self, m: Any) -> bool:
        return str(m.get("name", "decoder_lm")) == "encoder_decoder"

    def arch_items(self, m: Any, defaults: Any) -> dict[str, Any]:
        from routezoo.zoo.encoder_decoder import stack_kinds
        out = {k: m[k] if k in m else defaults[k] for k in ENCDEC_ARCH_KEYS}
        if any("moe" in kinds for kinds in stack_kinds(m).values()):
            out.update({f"moe.{k}": m.moe[k] if k in m.moe else defaults.moe[k] for k in MOE_ARCH_KEYS})
        return out

    def stored_but_unused(self, m: Any) -> set[str]:
        return super().stored_but_unused(m) | set(SWITCH_TIED_COPIES)   # the stacks' copies of shared.weight

    # ------------------------------------------------------------------ config.json -> config.model

    def config_from_hf(self, hf: Mapping[str, Any], *, dtype: str = "float32",
                       param_dtype: str = "float32") -> ml_collections.ConfigDict:
        need = self.need(hf)
        act = hf.get("dense_act_fn", "relu")
        if act != "relu":
            raise HFError(f"dense_act_fn {act!r} is not supported for {self.architecture} (only 'relu': T5 v1.0)")
        if hf.get("router_bias"):
            raise HFError("router_bias=true is not supported (routezoo routers have no bias); allowed: false")
        if str(hf.get("router_dtype", "float32")) != "float32":
            raise HFError(f"router_dtype {hf['router_dtype']!r} is not supported (routezoo routers run in float32)")
        if not hf.get("tie_word_embeddings", True):
            raise HFError("tie_word_embeddings=false is not supported for SwitchTransformersForConditionalGeneration "
                          "(transformers 5 then gives the encoder and the decoder embeddings of their own, apart "
                          "from shared.weight); allowed: true")
        n_enc = int(need("num_layers"))
        n_dec = int(hf.get("num_decoder_layers") or n_enc)
        m = default_model_config()
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
        m.encoder_sparse_step = _hf_step(n_enc, int(hf.get("num_sparse_encoder_layers", 3)))
        m.decoder_sparse_step = _hf_step(n_dec, int(hf.get("num_sparse_decoder_layers", 3)))
        m.expert_capacity = int(need("expert_capacity"))
        if m.expert_capacity < 1:
            raise HFError(f"expert_capacity={m.expert_capacity} must be >= 1")
        m.ffn = "mlp"   # DecoderLM's key; the encoder-decoder's layers come from the sparse steps
        m.dtype = dtype
        m.param_dtype = param_dtype
        m.hf_architecture = self.architecture
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

    # ------------------------------------------------------------------ config.model -> config.json

    def _num_sparse(self, num_layers: int, step: int, stack: str) -> int:
        """``num_sparse_*_layers`` for which HF builds the same sparse layers as ``step``."""
        from routezoo.zoo.encoder_decoder import sparse_kinds
        want = sparse_kinds(num_layers, step)
        for n in range(num_layers + 1):
            if sparse_kinds(num_layers, _hf_step(num_layers, n)) == want:
                return n
        raise HFError(f"the {stack}'s MoE layers ({','.join(want)}) cannot be written as {self.architecture}: HF "
                      f"puts them at i % (layers // num_sparse) == 1 and always has one "
                      f"(model.{stack}_sparse_step={step})")

    def config_to_hf(self, m: Any, architecture: str, base: Mapping[str, Any] | None, dtype: str) -> dict:
        if architecture != self.architecture or not self.claims(m):
            raise HFError(f"cannot export model.name={m.get('name', 'decoder_lm')!r} as {architecture}: "
                          f"{self.architecture} is model.name='encoder_decoder' and only that")
        arch = architecture
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
        n_sparse_enc = self._num_sparse(n_enc, int(m.encoder_sparse_step), "encoder")
        n_sparse_dec = self._num_sparse(n_dec, int(m.decoder_sparse_step), "decoder")
        out = {k: v for k, v in dict(base or {}).items() if k not in ("torch_dtype", "dtype", "transformers_version")}
        out.update({
            "architectures": [arch], "model_type": self.model_type, "is_encoder_decoder": True,
            "vocab_size": int(m.vocab_size), "d_model": int(m.d_model), "d_kv": int(m.head_dim),
            "d_ff": int(m.mlp_dim), "num_heads": int(m.num_heads), "num_layers": n_enc, "num_decoder_layers": n_dec,
            "num_sparse_encoder_layers": n_sparse_enc, "num_sparse_decoder_layers": n_sparse_dec,
            "encoder_sparse_step": _hf_step(n_enc, n_sparse_enc),
            "decoder_sparse_step": _hf_step(n_dec, n_sparse_dec),
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

    # ------------------------------------------------------------------ tensors

    def tensor_maps(self, m: Any) -> list[TensorMap]:
        """Every parameter of EncoderDecoderLM(``m``) from the HF Switch Transformers tensors."""
        from routezoo.zoo.encoder_decoder import stack_kinds
        d, h, k, v, f = int(m.d_model), int(m.num_heads), int(m.head_dim), int(m.vocab_size), int(m.mlp_dim)
        e, fe = int(m.moe.num_experts), int(m.moe.expert_dim)

        def attn(path, prefix):   # q/k/v: [H·A, D] -> [D, H, A]; o: [D, H·A] -> [H, A, D]
            return [TensorMap(path + (n,), (f"{prefix}.{n}.weight",), ((h, k), (d,)), (2, 0, 1)) for n in "qkv"] + [
                TensorMap(path + ("o",), (f"{prefix}.o.weight",), ((d,), (h, k)), (1, 2, 0))]

        maps = [identity(("embed", "embedding"), "shared.weight", (v, d))]
        if not m.tie_embeddings:
            maps.append(linear(("unembed",), "lm_head.weight", v, d))
        for stack, kinds in stack_kinds(m).items():
            maps += [identity((stack, "final_norm", "scale"), f"{stack}.final_layer_norm.weight", (d,)),
                     identity((stack, "relpos", "table"),
                              f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                              (int(m.relative_attention_num_buckets), h))]
            for i, kind in enumerate(kinds):
                p, blk = (stack, f"layer{i}"), f"{stack}.block.{i}.layer"
                maps += attn(p + ("attn",), f"{blk}.0.SelfAttention")
                maps.append(identity(p + ("attn_norm", "scale"), f"{blk}.0.layer_norm.weight", (d,)))
                ff = 1
                if stack == "decoder":
                    maps += attn(p + ("cross",), f"{blk}.1.EncDecAttention")
                    maps.append(identity(p + ("cross_norm", "scale"), f"{blk}.1.layer_norm.weight", (d,)))
                    ff = 2
                maps.append(identity(p + ("ffn_norm", "scale"), f"{blk}.{ff}.layer_norm.weight", (d,)))
                mlp = f"{blk}.{ff}.mlp"
                if kind == "mlp":
                    maps += [linear(p + ("mlp", "wi"), f"{mlp}.wi.weight", f, d),
                             linear(p + ("mlp", "wo"), f"{mlp}.wo.weight", d, f)]
                else:
                    ex = lambda w: [f"{mlp}.experts.expert_{j}.{w}.weight" for j in range(e)]
                    maps += [linear(p + ("moe", "router", "kernel"), f"{mlp}.router.classifier.weight", e, d),
                             stacked_linear(p + ("moe", "experts", "wi"), ex("wi"), fe, d),
                             stacked_linear(p + ("moe", "experts", "wo"), ex("wo"), d, fe)]
        return maps


SWITCH = SwitchFamily("SwitchTransformersForConditionalGeneration", "switch_transformers")

register(SWITCH)
