"""The default run: a tiny LM on the default offline dataset (Python's own stdlib sources).

Command:  routezoo train --workdir runs/default
Expected: see the README (time and validation bits per byte measured on a 2-core CPU).
"""

from routezoo.configs import base


def get_config():
    c = base.get_config()
    c.train.steps = 600
    c.train.batch_size = 16
    c.train.eval_every = 200
    c.checkpoint.every = 200
    c.data.seq_len = 128
    return c
