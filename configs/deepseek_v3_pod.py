"""A DeepSeek-V3-like MoE LM at full width and half depth (348.9B parameters, 21.3B active
per token), for a TPU v5p pod of 512 chips: a fit check, not a recipe that has been trained.

DeepSeek-V3 (DeepSeek-AI, 2024) has 61 layers (671B parameters); this config keeps its
width and its kinds of layer and cuts the depth to 32 layers: multi-head latent attention
(128 heads, query rank 1536, key/value rank 512, 128 + 64 rotary query/key dims, values
of 128), d_model 7168, the first 3 layers dense (SwiGLU of 18432), then 29 MoE layers of
256 routed SwiGLU experts of width 2048 plus 1 shared expert, top-8 with the DeepSeek-V3
router (sigmoid affinities, 8 groups of which 4 are kept, selection bias, weights
renormalised and scaled by 2.5), dropless (megablox on TPU), untied 129280-token
vocabulary, one multi-token-prediction module. Training it for real needs DeepSeek's
tokenizer (``--config.data.tokenizer=hf --config.data.tokenizer_path=DIR``); the byte
tokenizer left here changes no shape of the compiled step.
Meant for v5p:8x8x8 (512 chips, 128 hosts; Google names the slice v5p-1024): mesh
fsdp=8 x expert=8 x tensor=8 (each axis one side of the 8x8x8 torus, as jax.make_mesh
requires), sequences of 4096, global batch 128 (one row per host; two per group of the 8
chips that split the heads), each block rematerialised in the backward pass
(``model.remat=full``).

Command:  routezoo compile --config deepseek_v3_pod --topology v5p:8x8x8
Result:   fits, 72.73 of 95 GiB per chip (arguments 12.26, temporaries 60.25 GiB); compiled in
          110-116 s on a 2-core x86-64 CPU shared with other jobs, jax 0.10.2, libtpu
          0.0.42.1, 5.3 GB of host memory (BENCHMARKS.md, fit checks for TPU pods). Most of
          the temporaries are the expert-parallel exchange: its receive buffers hold room
          for every token of the 8 expert shards.
"""

from routezoo.configs import base

SIZE = "pod"   # too large to initialise or train on one machine: the shipped-config tests only validate it
TOPOLOGY = "v5p:8x8x8"
DENSE_LAYERS = 3


def get_config():
    c = base.get_config()
    m = c.model
    m.vocab_size = 129280
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads = 32, 7168, 128, 128
    m.attention = "mla"
    m.mla_q_lora_rank, m.mla_kv_lora_rank = 1536, 512
    m.mla_qk_nope_head_dim, m.mla_qk_rope_head_dim, m.mla_v_head_dim = 128, 64, 128
    m.head_dim = m.mla_qk_rope_head_dim   # as DeepSeek's Hugging Face config sets it; unused by latent attention
    m.mlp_dim = 18432
    m.tie_embeddings = False
    m.norm_eps = 1e-6
    m.max_len = 4096
    m.remat = "full"   # each block recomputed in the backward pass
    m.ffn = ",".join(["mlp"] * DENSE_LAYERS + ["moe"] * (m.num_layers - DENSE_LAYERS))
    m.mtp_depth = 1
    moe = m.moe
    moe.num_experts, moe.k, moe.expert_dim = 256, 8, 2048
    moe.num_shared_experts, moe.shared_expert_dim = 1, 2048
    moe.router, moe.dispatch = "deepseek_v3", "dropless"
    moe.deepseek_v3_n_group, moe.deepseek_v3_topk_group, moe.deepseek_v3_scaling_factor = 8, 4, 2.5
    moe.renormalize = True
    moe.load_balance_coef = 1e-4
    c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = 1, 8, 8, 8
    c.data.seq_len = 4096
    c.train.batch_size = 128
    c.train.steps = 100000
    c.train.eval_every = 1000
    c.train.log_every = 50
    c.checkpoint.every = 1000
    c.optimizer.learning_rate = 2.2e-4
    c.optimizer.warmup_steps = 2000
    return c
