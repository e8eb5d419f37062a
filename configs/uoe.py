"""Small Union-of-Experts LM (Yang, Lian & Li 2025, UoE; ``layers/moe/uoe.py``): every layer
has selective attention (4 heads as experts, each token keeps its top 2, each head takes
at most L/2 = 64 tokens per sequence, filled in time order, as the authors' code sizes
its buffers) and a union of MLP experts (the dense SwiGLU MLP of width 512 cut into 4
slices of 128; each token takes its top 2, weights renormalised). The slices use dropless
dispatch: the authors' code gives each slice half of the tokens, but capacity dispatch
with top-2 queues all first choices before second choices, which is not causal in a
decoder (see ``layers/moe/uoe.py``). Load-balance loss 0.01 on both gates (heads and
slices), z-loss 1e-3. The rest is the default run (4 layers, d_model 128, bytes,
sequences of 128, batch 16, 1000 steps).

Command:  routezoo train --config uoe --workdir runs/uoe
Measured (one run, 2-core CPU shared with other jobs, so the time is an upper bound):
7 minutes; validation bits per byte 9.45 at step 0, 3.35 at step 250, 2.99 at step 750,
3.00 at step 1000 (the default run: 2.45 at step 1000). The heads dropped 20-31% of the
token copies at step 1000 (``moe/layer{i}/attn/dropped_fraction``): each head holds at
most L/2 tokens while the gate does not spread tokens evenly; a larger
``moe.uoe_capacity_factor`` drops fewer.
"""

from routezoo.configs import default


def get_config():
    c = default.get_config()
    m = c.model
    m.ffn = "moe"
    moe = m.moe
    moe.router = "uoe"
    moe.num_experts, moe.k, moe.expert_dim = 4, 2, 128     # 4 x 128 = the default MLP width 512
    moe.dispatch = "dropless"
    moe.renormalize = True
    moe.uoe_attn_k = 2                                      # H/2 of 4 heads
    moe.uoe_capacity_factor = 1.0                           # C = L * k_h / H = L/2 tokens per head
    moe.load_balance_coef, moe.z_loss_coef = 0.01, 1e-3
    return c
