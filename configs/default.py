"""The default run: a tiny MoE LM on the default offline dataset (Python's own stdlib sources).

4 layers, d_model 128, MoE in every layer (8 SwiGLU experts of width 256, top-2,
dropless), byte tokens, sequences of 128, batch 16.

Command:  routezoo train --workdir runs/default
Expected: see the README (time and validation bits per byte measured on a 2-core CPU).
"""

from routezoo.configs import base


def get_config():
    c = base.get_config()
    m = c.model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = 4, 128, 4, 2, 32
    m.mlp_dim = 512
    m.ffn = "moe"
    moe = m.moe
    moe.num_experts, moe.k, moe.expert_dim = 8, 2, 256
    moe.router, moe.dispatch = "top_k", "dropless"
    c.data.seq_len = 128
    c.train.steps = 1000
    c.train.batch_size = 16
    c.train.eval_every = 250
    c.train.log_every = 25
    c.checkpoint.every = 250
    return c
