"""A Mixtral-8x7B-like MoE LM at its real size (46.7B parameters, 12.9B active per token),
for a TPU v5p pod: a fit check, not a recipe that has been trained.

32 layers, d_model 4096, 32 query / 8 key-value heads of 128, MoE in every layer with 8
SwiGLU experts of width 14336, top-2 renormalised, dropless (megablox on TPU), untied
32000-token vocabulary (SentencePiece), rotary theta 1e6 (Jiang et al., 2024).
Meant for v5p:4x4x8 (128 chips; Google names the slice v5p-256): FSDP over all 128 chips
(mesh fsdp=-1), sequences of 4096, global batch 128 (one sequence per chip), each block
rematerialised in the backward pass (``model.remat=full``).
Expert parallelism needs more memory here: with 2 layers, fsdp=16 x expert=8 compiled to
23.0 GiB per chip against 9.4 GiB for FSDP alone (the dropless exchange sizes its receive
buffers for every token landing on one shard).

Command:  routezoo compile --config mixtral_8x7b --topology v5p:4x4x8
Result:   fits, 18.90 of 95 GiB per chip (arguments 4.08, temporaries 14.74 GiB); compiled in
          52-125 s on a 2-core x86-64 CPU shared with other jobs, jax 0.10.2, libtpu 0.0.42.1
          (BENCHMARKS.md, fit checks for TPU pods). It fits with its layers scanned
          (``model.scan_layers``, the schema's default): unrolled, the same step compiled in
          311 s to 95.96 GiB per chip and does not fit.
"""

from routezoo.configs import base

SIZE = "pod"   # too large to initialise or train on one machine: the shipped-config tests only validate it
TOPOLOGY = "v5p:4x4x8"


def get_config():
    c = base.get_config()
    m = c.model
    m.vocab_size = 32000
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = 32, 4096, 32, 8, 128
    m.mlp_dim = 14336
    m.tie_embeddings = False
    m.norm_eps = 1e-5
    m.rope_theta = 1e6
    m.max_len = 4096
    m.remat = "full"   # each block recomputed in the backward pass
    m.ffn = "moe"
    moe = m.moe
    moe.num_experts, moe.k, moe.expert_dim, moe.renormalize = 8, 2, 14336, True
    moe.router, moe.dispatch = "top_k", "dropless"
    c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = 1, -1, 1, 1   # FSDP over every chip
    c.data.tokenizer, c.data.spm_vocab_size = "sentencepiece", 32000
    c.data.seq_len = 4096
    c.train.batch_size = 128
    c.train.steps = 100000
    c.train.eval_every = 1000
    c.train.log_every = 50
    c.checkpoint.every = 1000
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 2000
    return c
