"""MoS fine-tuning (Mixture of Shards, Wang et al., ICLR 2025) of the
default LM: every attention projection and expert matrix, active rank r = 8 at the
parameter budget of LoRA rank r_eq = 3, one private rank vector per layer, 2 shards per
rank vector, alpha 16 (the authors' LLaMA2 recipe adapts all 7 projections with alpha 16);
the base stays frozen.

Command (a base run first, then the adapter on top of it):
    routezoo train --config default --workdir runs/base
    routezoo train --config mos_finetune --workdir runs/mos --config.init.from=runs/base
Output: runs/mos/adapter/ (params/ = the shard pools + adapter.json: base fingerprint,
counts, and config.adapter with mos_seed, from which the frozen index buffers are
regenerated); ``training.train.load_trained('runs/mos')`` gives the merged weights.
Expected: trainable parameters = LoRA at rank 3 on the same matrices (each of the 8
experts' matrices is one owner): 3 x 4 layers x ((128+128) + 2 x (128+64) + (128+128)
+ 8 x 3 x (128+256)) = 121,344, printed at start.
No time or result is recorded for this config (a LoRA-vs-MoS comparison
is in BENCHMARKS.md, adapters). Ablations: --config.adapter.mos_private_rank=0,
--config.adapter.mos_pair_dissociation=False, --config.adapter.mos_subset_selection=False,
--config.adapter.mos_shards_per_vector=1.
"""

from routezoo.configs import default


def get_config():
    c = default.get_config()
    a = c.adapter
    a.method, a.targets, a.rank, a.alpha = "mos", "attn/(q|k|v|o)|experts/(wi|wi_gate|wo)", 8, 16.0
    a.mos_equiv_rank, a.mos_private_rank, a.mos_shards_per_vector = 3, 1, 2
    o = c.optimizer
    o.learning_rate, o.warmup_steps, o.weight_decay = 2e-4, 20, 0.0
    c.train.steps = 300
    return c
