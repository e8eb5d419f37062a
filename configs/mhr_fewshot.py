"""Few-shot adaptation to held-out tasks (tomllib, zoneinfo, turtledemo: three stdlib
packages the multi-task adapter never trained on) from a multi-task MHR/Poly run
(configs/poly_multitask.py), in one of the MHR paper's modes (Caccia et al. 2023):

* ``mhr_z`` (default): only a fresh router (one row per held-out task) trains; the skills
  stay frozen (not in the optimizer state): 4 x 3 tasks x 4 heads x 4 skills = 192
  trainable parameters;
* ``mhr_mu``: no router; the skill average (w = 1/M per head) is fine-tuned and merges
  into the base weights for inference;
* ``mhr`` (or ``poly`` from a Poly run): skills and a fresh router fine-tuned.

Commands:
    routezoo train --config mhr_fewshot --workdir runs/mhr_z --config.init.from=runs/base \\
        --config.init.adapter_from=runs/mhr
    routezoo train --config mhr_fewshot --workdir runs/mhr_mu --config.init.from=runs/base \\
        --config.init.adapter_from=runs/mhr --config.adapter.method=mhr_mu
``init.adapter_from`` must be a run on the same base (its fingerprint is checked) with the
same rank, poly_skills and mhr_heads. "Few-shot": 100 steps of 16 x 128 tokens. Time and
result: not measured on CPU; see benchmarks/adapter_quality.py.
"""

from routezoo.configs import poly_multitask


def get_config():
    c = poly_multitask.get_config()
    c.data.tasks = poly_multitask.HELDOUT_TASKS
    c.adapter.method = "mhr_z"
    c.train.steps, c.train.eval_every, c.checkpoint.every = 100, 50, 50
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 3e-3, 5
    return c
