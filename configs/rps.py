"""Randomized parameter sharing (STABLE-RPS, Desai and Shrivastava 2024;
layers/adapters/rps.py): the default LM
trained FROM SCRATCH with every attention matrix (q, k, v, o) and every expert MLP matrix
(wi, wi_gate, wo of the 8 stacked experts) recovered from one shared array M at
compression 0.1; the embedding, norms and routers train dense.

Command (no base run needed: the base the loop builds is only the template whose init
std sets each weight's lambda and whose init values start the dense leftovers):
    routezoo train --config rps --workdir runs/rps
Expected parameter count, printed at start as trainable: n = 4 layers x (attention
128x4x32 + 128x2x32 + 128x2x32 + 4x32x128 = 49,152; experts 3 x 8 x 128 x 256 = 786,432)
= 3,342,336 target weights, m = ceil(0.1 n) = 334,234 shared weights, plus the dense
leftovers 38,272 (embedding 258x128 = 33,024, routers 4x128x8 = 4,096, norms 9x128 =
1,152): 372,506 trainable of the dense model's 3,380,608 (11.0%).
Measured (2-core CPU shared with other jobs, 250 of the 1,000 steps: ``--stop_after=250
--config.train.eval_every=125``, about 4 min): validation bits per byte 8.59 at step 0,
3.96 at step 125, 3.51 at step 250, against 3.10 at step 250 for the dense default run
(README) with 9x the trainable parameters. The full 1,000 steps were not run. Against a
dense model of its own size and a magnitude-pruned model at the same compression, at three
seeds: ``benchmarks/adapter_quality.py`` (BENCHMARKS.md, "Adapter quality").
``--config.adapter.rps_mapping=roast`` for ROAST tiles (8x8),
``--config.adapter.rps_compression=1.0`` for the dense-size (injective) control,
``--config.adapter.rps_grad_scaler=False`` without the STABLE-RPS scaler (with AdamW it
matters little: Adam normalises each coordinate).
"""

from routezoo.configs import default


def get_config():
    c = default.get_config()
    a = c.adapter
    a.method, a.targets = "rps", "attn/.*|experts/.*"
    a.rps_compression, a.rps_mapping, a.rps_init_std, a.rps_grad_scaler = 0.1, "stable", 0.01, True
    return c
