"""A small bidirectional encoder with Soft MoE layers (Puigcerver et al. 2023), trained
with BERT-style masked-token prediction on the default offline dataset.

``model.name='encoder_mlm'`` (zoo/encoder.py): 4 layers, d_model 128, bidirectional
attention; Soft MoE (``moe.router='soft'``, layers/moe/soft.py) in every other layer
(layers 1 and 3): 8 SwiGLU experts of width 256, slots per expert derived from the
sequence (128 tokens / 8 experts = 16 slots each, 128 slots in all), normalised logits
with a learned scale. Byte tokens with the mask token at id 258 (``vocab_size`` 259);
15% of positions predicted (80% mask / 10% random / 10% kept); sequences of 128, batch 16.

Command:  routezoo train --config soft_moe --workdir runs/soft_moe
Expected: 11 min 23 s on a shared 2-core CPU kept busy by other jobs (load average 4-5),
2.23M parameters (0.85M active per token); eval loss (masked positions only, fixed masks)
6.51 nats at step 0 -> 1.96 (step 250) -> 1.69 (500) -> 1.47 (750) -> 1.42 at step 1000,
2.05 bits per masked byte. Not comparable with the decoder configs' next-token figures.
"""

from routezoo.configs import default


def get_config():
    c = default.get_config()
    m = c.model
    m.name = "encoder_mlm"
    m.vocab_size = 259           # byte tokenizer's 258 ids + the mask token (id 258)
    m.mask_rate = 0.15
    m.ffn = "moe"
    moe = m.moe
    moe.every = 2
    moe.router = "soft"
    moe.num_experts, moe.expert_dim = 8, 256
    moe.soft_slots_per_expert = 0    # 0: round(128 / 8) = 16
    moe.soft_normalize = True
    return c
