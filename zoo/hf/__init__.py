"""Hugging Face checkpoints: import into zoo models, sharded onto a mesh; export back.

    model, params = from_hf("path/to/hf_dir", mesh=None)
    logits, aux = model.apply({"params": params}, tokens)      # logits as the HF model's
    to_hf(model.cfg, params, "out_dir")                         # loadable by transformers

Families (``architectures[0]`` of ``config.json``, one module per group under
``families/``): dense ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM`` (``families/llama.py``); mixture-of-experts ``MixtralForCausalLM``,
``Qwen2MoeForCausalLM``, ``Qwen3MoeForCausalLM``, ``OlmoeForCausalLM``
(``families/mixtral.py``); ``DeepseekV3ForCausalLM`` and ``DeepseekV2ForCausalLM`` with
multi-head latent attention and DeepSeek routing (``families/deepseek.py``); all onto
:class:`routezoo.zoo.lm.DecoderLM` with plain ``x @ E^T`` tied logits
(``scale_tied_logits=False``). Encoder-decoder ``SwitchTransformersForConditionalGeneration``
onto :class:`routezoo.zoo.encoder_decoder.EncoderDecoderLM` (``families/switch.py``).
DeepSeek-V2/V3 import YaRN rope scaling (``rope_type`` 'yarn', into ``model.rope_scaling``);
other rope types are refused.

The modules: ``registry`` (the :class:`Family` objects, by architecture and model_type),
``config_map`` (``config.json`` <-> ``config.model``), ``tensor_map`` (the pure, reversible
mapping of each parameter onto HF tensors: reshape to split dims, transpose),
``safetensors_io`` (every file read or written), ``loading`` (import onto a mesh) and
``export`` (HF checkpoints and converted directories).

A *converted* directory (``routezoo convert``) holds ``config.json`` (a full routezoo
config), ``hf_config.json`` (the original HF config) and ``params*.safetensors`` in
routezoo naming (``layer0/attn/q``); :func:`from_hf` and :func:`load_params_for_config`
read it as well.

Only ``numpy``, ``safetensors``, ``jax`` and ``flax`` are needed; ``torch`` and
``transformers`` are not imported here.
"""

from routezoo.zoo.hf import families  # noqa: F401  (fills the registry)
from routezoo.zoo.hf.config_map import (arch_items, check_same_architecture, hf_config_from_model,
                                        infer_architecture, model_config_from_hf, tensor_maps)
from routezoo.zoo.hf.export import convert_to_routezoo, to_hf
from routezoo.zoo.hf.families import ENCDEC_ARCH_KEYS, SWITCH, SWITCH_TIED_COPIES, mtp_copies
from routezoo.zoo.hf.loading import (Source, abstract_params, check_shapes, from_hf, load_params,
                                     load_params_for_config, open_source, param_shardings, update_config_from_hf)
from routezoo.zoo.hf.registry import (FAMILIES, MODEL_ARCH_KEYS, MOE_ARCH_KEYS, Family, HFError, family_of,
                                      supported_architectures)
from routezoo.zoo.hf.safetensors_io import (DEFAULT_MAX_SHARD_BYTES, HF_CONFIG, HF_INDEX, HF_SINGLE, RZ_HF_CONFIG,
                                            RZ_INDEX, RZ_SINGLE, Reader)
from routezoo.zoo.hf.tensor_map import TensorMap

__all__ = ["FAMILIES", "HFError", "TensorMap", "from_hf", "to_hf", "load_params_for_config",
           "update_config_from_hf", "model_config_from_hf", "hf_config_from_model", "convert_to_routezoo",
           "supported_architectures", "open_source", "tensor_maps", "infer_architecture", "param_shardings",
           "DEFAULT_MAX_SHARD_BYTES", "Family", "family_of", "Source", "Reader", "load_params", "abstract_params",
           "check_shapes", "arch_items", "check_same_architecture", "MODEL_ARCH_KEYS", "MOE_ARCH_KEYS",
           "ENCDEC_ARCH_KEYS", "SWITCH", "SWITCH_TIED_COPIES", "mtp_copies", "HF_CONFIG", "HF_INDEX", "HF_SINGLE",
           "RZ_HF_CONFIG", "RZ_INDEX", "RZ_SINGLE"]
