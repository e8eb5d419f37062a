"""Dense decoders: ``LlamaForCausalLM``, ``MistralForCausalLM`` (no sliding window),
``Qwen2ForCausalLM`` (q/k/v bias), ``Qwen3ForCausalLM`` (per-head QK norm).

All four map onto DecoderLM with SwiGLU MLPs; they differ only in the data below.
"""

from __future__ import annotations

from routezoo.zoo.hf.families.decoder import DecoderFamily
from routezoo.zoo.hf.registry import register

_DENSE = (("mla", False), ("moe", False))

LLAMA = DecoderFamily("LlamaForCausalLM", "llama", export_constants=(("attention_bias", False),),
                      infer_when=_DENSE + (("qk_norm", "none"), ("qkv_bias", False)))
# Never inferred: a Mistral without sliding window is a Llama.
MISTRAL = DecoderFamily("MistralForCausalLM", "mistral",
                        export_constants=(("attention_bias", False), ("sliding_window", None)))
QWEN2 = DecoderFamily("Qwen2ForCausalLM", "qwen2", qkv_bias=True, sliding_window_flag=True,
                      export_constants=(("use_sliding_window", False),),
                      infer_when=_DENSE + (("qk_norm", "none"), ("qkv_bias", True)))
QWEN3 = DecoderFamily("Qwen3ForCausalLM", "qwen3", qk_norm="head", sliding_window_flag=True,
                      export_constants=(("attention_bias", False), ("use_sliding_window", False)),
                      infer_when=_DENSE + (("qk_norm", "head"), ("qkv_bias", False)))

register(LLAMA, MISTRAL, QWEN2, QWEN3)
