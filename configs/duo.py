"""Duo-LLM (Alizadeh et al. 2024, arXiv:2410.10846) on a small LM: every feed-forward slot
holds a big SwiGLU FFN (width 512), a small one (width 128) and skip; stage 1, random
routing (big 0.5, small 0.25, skip 0.25 per token and layer in training; the paper's
probabilities are unverified). 4 layers, d_model 128, byte tokens, sequences of 128,
batch 16, 1000 steps. Evaluation runs all big (``eval_loss``) and also all small and
all skip (``eval_loss@small``, ``eval_loss@skip``).

Stage 1 (random routing)::

    routezoo train --config duo --workdir runs/duo_random

Stage 2 (oracle: each token's best route within a budget, here one big module's worth,
every other token all big; exhaustive over the 20 routes of 4 layers that fit)::

    from routezoo.training import data
    from routezoo.training.train import load_trained
    from routezoo.zoo.duo import oracle_routes, summarize_oracle
    config, model, state = load_trained("runs/duo_random")
    tokens = next(iter(data.eval_batches(config)))["inputs"][:4, :64]
    result = oracle_routes(model, {"params": state.params}, tokens, budget=1.0)
    print(summarize_oracle(result))   # loss vs all-big, big modules by layer and position

Stage 3 (a trained router per layer, starting from the stage-1 parameters; the whole
model trains, with the compute loss ``moe.duo_cost_coef``)::

    routezoo train --config duo --workdir runs/duo_router --config.init.from=runs/duo_random \\
        --config.model.moe.duo_mode=router --config.train.steps=300

Measured on a shared 2-core CPU (other jobs running; float32):

* stage 1: 12.5 min; eval loss all big 1.791 (2.58 bits/byte), all small 1.806 (2.61),
  all skip 2.285 (3.30);
* stage 2 (the snippet above, 4 x 63 tokens): 14 s; oracle mean loss 2.167 at mean cost
  0.69 big modules per token, against 2.587 all big (cost 4): lower than all big on 83% of
  the tokens; share of big modules by position quarter 0.10, 0.10, 0.11, 0.07;
* stage 3 (300 steps): 2 min; eval loss 1.851 (2.67 bits/byte) on the router's routes,
  which by the end skip the FFN almost always in 3 of 4 layers (last training batch: 0.017
  big modules per token and layer).
"""

from routezoo.configs import base


def get_config():
    c = base.get_config()
    m = c.model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = 4, 128, 4, 2, 32
    m.mlp_dim = 512
    m.ffn = "moe"                   # every layer's FFN slot is a Duo slot
    moe = m.moe
    moe.router = "duo"
    moe.expert_dim = 512            # the big module
    moe.duo_small_dim = 128         # the small module
    moe.duo_mode = "random"
    moe.duo_probs = "0.5,0.25,0.25"
    moe.duo_eval_sweep = "small,skip"
    c.data.seq_len = 128
    c.train.steps = 1000
    c.train.batch_size = 16
    c.train.eval_every = 250
    c.train.log_every = 25
    c.checkpoint.every = 250
    return c
