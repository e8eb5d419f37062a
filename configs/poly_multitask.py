"""Multi-task adapter training with task routing (Poly, Ponti et al. 2022; MHR, Caccia et
al. 2023) on a
trained base, tasks taken from the default corpus: each task is one top-level package of
the Python standard library, and every example's task id picks its router row.

Train tasks (7): lib2to3, idlelib, distutils, email, multiprocessing, importlib, asyncio.
Held-out tasks for few-shot adaptation (configs/mhr_fewshot.py): tomllib, zoneinfo,
turtledemo (each has files in the validation split; xml, json and http have none).

Commands (base first; the base is the default MoE LM, so the adapter targets attention):
    routezoo train --config default --workdir runs/base
    routezoo train --config poly_multitask --workdir runs/mhr --config.init.from=runs/base
    routezoo train --config poly_multitask --workdir runs/poly --config.init.from=runs/base \\
        --config.adapter.method=poly
    # the multi-task LoRA baseline (one LoRA for all tasks; task ids ignored):
    routezoo train --config poly_multitask --workdir runs/mtlora --config.init.from=runs/base \\
        --config.adapter.method=lora --config.adapter.rank=8
Output: WORKDIR/adapter/ (skills and router, base fingerprint, counts); metrics.jsonl has
eval_loss@task=NAME for every train task with validation files (train.eval_per_task).
Trainable parameters (printed at start), MHR with 4 skills of rank 2, 4 heads, on the 4
attention projections of 4 layers (d_model 128, 4 heads x 32, 2 kv heads x 32):
per layer 4·2·((128+128) + (128+64) + (128+64) + (128+128)) = 7,168 for the skills plus
4 x 7 tasks x 4 heads x 4 skills = 448 for the routers: 30,464 in all (Poly: 4 x (7,168
+ 112) = 29,120). Time and result: not measured on CPU; the GPU comparison is
benchmarks/adapter_quality.py (BENCHMARKS.md).
"""

from routezoo.configs import default

TRAIN_TASKS = "lib2to3,idlelib,distutils,email,multiprocessing,importlib,asyncio"
HELDOUT_TASKS = "tomllib,zoneinfo,turtledemo"


def get_config():
    c = default.get_config()
    c.data.tasks = TRAIN_TASKS
    c.train.eval_per_task = True
    c.train.steps, c.train.eval_every, c.checkpoint.every = 500, 100, 100
    a = c.adapter
    a.method, a.targets = "mhr", "attn/(q|k|v|o)"
    a.rank, a.poly_skills, a.mhr_heads = 2, 4, 4
    a.num_tasks = 0                # = len(data.tasks)
    o = c.optimizer
    o.learning_rate, o.warmup_steps, o.weight_decay = 1e-3, 20, 0.0
    return c
