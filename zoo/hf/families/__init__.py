"""The Hugging Face families, one module per group; importing this package registers them all.

``llama`` (dense decoders), ``mixtral`` (mixture-of-experts decoders), ``deepseek``
(latent attention, DeepSeek routing, multi-token prediction), ``switch`` (Switch
Transformers encoder-decoder); ``decoder`` holds what the decoder families share.
"""

from routezoo.zoo.hf.families import llama, mixtral, deepseek, switch  # noqa: F401  (registration order)
from routezoo.zoo.hf.families.deepseek import mtp_copies
from routezoo.zoo.hf.families.decoder import DecoderFamily
from routezoo.zoo.hf.families.mixtral import MoeFamily
from routezoo.zoo.hf.families.switch import ENCDEC_ARCH_KEYS, SWITCH, SWITCH_TIED_COPIES

__all__ = ["DecoderFamily", "MoeFamily", "ENCDEC_ARCH_KEYS", "SWITCH", "SWITCH_TIED_COPIES", "mtp_copies"]
