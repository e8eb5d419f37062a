"""A Qwen3-30B-A3B-like MoE LM at its real size (30.5B parameters, 3.3B active per token),
for a TPU v5p pod: a fit check, not a recipe that has been trained.

48 layers, d_model 2048, 32 query / 4 key-value heads of 128 with RMSNorm of q and k per
head (qk norm), MoE in every layer with 128 SwiGLU experts of width 768, top-8
renormalised, dropless (megablox on TPU), untied 151936-token vocabulary, rotary theta 1e6
(Qwen team, 2025). Training it for real needs Qwen3's tokenizer
(``--config.data.tokenizer=hf --config.data.tokenizer_path=DIR``); the byte tokenizer
left here changes no shape of the compiled step.
Meant for v5p:4x4x4 (64 chips, 16 hosts; Google names the slice v5p-128): FSDP over all
64 chips (mesh fsdp=-1; every chip runs all 128 experts on its own tokens, no token
exchange), sequences of 4096, global batch 128 (two sequences per chip), each block
rematerialised in the backward pass (``model.remat=full``).

Command:  routezoo compile --config qwen3_30b_a3b --topology v5p:4x4x4
Result:   fits, 25.19 of 95 GiB per chip (arguments 5.33, temporaries 19.78 GiB); compiled in
          65 s on a 2-core x86-64 CPU with jax 0.10.2 and libtpu 0.0.42.1 (BENCHMARKS.md,
          fit checks for TPU pods).
"""

from routezoo.configs import base

SIZE = "pod"   # too large to initialise or train on one machine: the shipped-config tests only validate it
TOPOLOGY = "v5p:4x4x4"


def get_config():
    c = base.get_config()
    m = c.model
    m.vocab_size = 151936
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = 48, 2048, 32, 4, 128
    m.mlp_dim = 6144
    m.qk_norm = "head"
    m.tie_embeddings = False
    m.norm_eps = 1e-6
    m.rope_theta = 1e6
    m.max_len = 4096
    m.remat = "full"   # each block recomputed in the backward pass
    m.ffn = "moe"
    moe = m.moe
    moe.num_experts, moe.k, moe.expert_dim, moe.renormalize = 128, 8, 768, True
    moe.router, moe.dispatch = "top_k", "dropless"
    c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = 1, -1, 1, 1   # FSDP over every chip
    c.data.seq_len = 4096
    c.train.batch_size = 128
    c.train.steps = 100000
    c.train.eval_every = 1000
    c.train.log_every = 50
    c.checkpoint.every = 1000
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 2000
    return c
