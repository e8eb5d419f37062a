"""LoRA fine-tuning (Hu et al., 2021) of the default LM: rank 8, alpha 16, on the
attention q and v projections (the LoRA paper's GLUE recipe); the base stays frozen.

Command (a base run first, then the adapter on top of it):
    routezoo train --config default --workdir runs/base
    routezoo train --config lora_finetune --workdir runs/lora --config.init.from=runs/base
Output: runs/lora/adapter/ (params/ + adapter.json: base fingerprint, trainable and total
parameter counts); ``training.train.load_trained('runs/lora')`` gives the merged weights.
Expected: trainable parameters 4 layers x 8 x ((128 + 128) + (128 + 64)) = 14,336
(r (d_in + d_out) per matrix), printed at start. No time or result is recorded for this config.
Add ``--config.adapter.rslora=True`` for rsLoRA scaling alpha / sqrt(r).
"""

from routezoo.configs import default


def get_config():
    c = default.get_config()
    a = c.adapter
    a.method, a.targets, a.rank, a.alpha = "lora", "attn/(q|v)", 8, 16.0
    o = c.optimizer
    o.learning_rate, o.warmup_steps, o.weight_decay = 5e-4, 20, 0.0
    c.train.steps = 300
    return c
