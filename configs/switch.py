"""Small Switch-Transformer-style LM (Fedus et al., 2021): top-1 routing with the raw
router probability as weight, capacity dispatch (cf 1.25 train / 2.0 eval), load-balance
loss 0.01, MoE in every other layer, router init scale 0.1, jitter 0.01.

Command:  routezoo train --config switch --workdir runs/switch
No time or result is recorded for this config.
"""

from routezoo.configs import default


def get_config():
    c = default.get_config()
    m = c.model
    m.num_layers = 4
    m.ffn = "moe"
    moe = m.moe
    moe.num_experts, moe.k, moe.router, moe.dispatch = 8, 1, "top_k", "capacity"
    moe.capacity_factor, moe.eval_capacity_factor = 1.25, 2.0
    moe.every = 2
    moe.expert_dim = 256
    moe.jitter = 0.01
    moe.z_loss_coef = 0.0
    return c
