"""A Mixtral-style MoE LM of 1.19B parameters (0.51B active per token), for GPUs.

12 layers, d_model 2048, 16 query / 8 key-value heads of 128, MoE in every layer with 8
SwiGLU experts of width 1536, top-2 renormalised, dropless (Pallas grouped matmul on
GPU), untied 32k vocabulary (SentencePiece), sequences of 2048, batch 16, bf16 compute.
This is the model of benchmarks/train_step.py and benchmarks/vs_transformers.py.

Command:  routezoo train --config moe_1b --workdir runs/moe_1b
Expected: on one H100, 142.7k tokens/s at this config's batch of 16 x 2048, 47.1% MFU,
1.23x transformers' compiled Mixtral of the same shape (BENCHMARKS.md, against the PyTorch a
user would write). Not meant for CPUs.
"""

from routezoo.configs import base


def get_config():
    c = base.get_config()
    m = c.model
    m.vocab_size = 32000
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = 12, 2048, 16, 8, 128
    m.mlp_dim = 5632
    m.tie_embeddings = False
    m.max_len = 2048
    m.ffn = "moe"
    # Unscanned: without remat, a scanned stack keeps every layer's residuals in stacked
    # buffers (68.8 GiB peak, 105k tokens/s at batch 16 on an H100, against 46.8 GiB and
    # 141k unscanned; BENCHMARKS.md, depth). Scan with model.remat set for deeper variants.
    m.scan_layers = False
    moe = m.moe
    moe.num_experts, moe.k, moe.expert_dim, moe.renormalize = 8, 2, 1536, True
    moe.router, moe.dispatch = "top_k", "dropless"
    c.data.tokenizer, c.data.spm_vocab_size = "sentencepiece", 32000
    c.data.seq_len = 2048
    c.train.batch_size = 16
    c.train.steps = 20000
    c.train.eval_every = 1000
    c.train.log_every = 50
    c.checkpoint.every = 1000
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 1000
    return c
