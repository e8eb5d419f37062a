"""Small Mixtral-style LM (Jiang et al., 2024): MoE in every layer, 8 SwiGLU experts,
top-2 with renormalised weights, dropless dispatch, grouped-query attention.

Command:  routezoo train --config mixtral --workdir runs/mixtral
No time or result is recorded for this config.
"""

from routezoo.configs import default


def get_config():
    c = default.get_config()
    m = c.model
    m.num_layers, m.num_heads, m.num_kv_heads = 4, 4, 1
    m.ffn = "moe"
    moe = m.moe
    moe.num_experts, moe.k, moe.router, moe.dispatch, moe.renormalize = 8, 2, "top_k", "dropless", True
    moe.expert_dim = 256
    moe.every = 1
    return c
