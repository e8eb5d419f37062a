"""Small DeepSeekMoE-style LM (Dai et al., 2024; DeepSeek-V3, 2024): fine-grained experts
(32 experts of width 64, top-6), two shared experts every token uses, the first layer
dense, auxiliary-loss-free balancing (per-expert bias updated outside the gradient) with
a small load-balance loss kept as a safeguard.

Command:  routezoo train --config deepseek_moe --workdir runs/deepseek_moe
No time or result is recorded for this config.
"""

from routezoo.configs import default


def get_config():
    c = default.get_config()
    m = c.model
    m.num_layers = 4
    m.ffn = "mlp,moe,moe,moe"
    moe = m.moe
    moe.num_experts, moe.k, moe.router, moe.dispatch = 32, 6, "top_k", "dropless"
    moe.expert_dim = 64
    moe.num_shared_experts, moe.shared_expert_dim = 2, 64
    moe.renormalize = True
    moe.bias_update_rate = 1e-3
    moe.load_balance_coef = 1e-3
    return c
