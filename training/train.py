"""The training entry points in one namespace: ``from routezoo.training import train``.

``train.train_and_evaluate(config, workdir)`` trains (:mod:`routezoo.training.loop`); the
train state and its shardings are in :mod:`routezoo.training.state`, the train and eval
steps in :mod:`routezoo.training.step`, adapter runs (frozen base, adapter directories)
in :mod:`routezoo.training.adapter_run`, and reading a run back (``load_trained``,
``restore_params``) in :mod:`routezoo.training.workdir`. Every name is re-exported here.
"""

from __future__ import annotations

# Also reachable through this module: train.jax, train.nn, train.zoo, train.make_optimizer.
import jax  # noqa: F401
from flax import linen as nn  # noqa: F401

from routezoo import zoo  # noqa: F401
from routezoo.training.adapter_run import (ADAPTER_BUFFERS, ADAPTER_DIR, ADAPTER_JSON, AdapterRun,  # noqa: F401
                                           AdapterSetup, PlainRun, adapter_config, adapter_metadata,
                                           adapter_sources, adapter_state_shardings, check_adapter_dir,
                                           check_sources, create_adapter_state, load_adapter, load_base,
                                           make_run, optimizer_for, read_adapter_dir, read_buffers,
                                           save_adapter, with_saved_buffers)
from routezoo.training.loop import (StopFlag, describe_model, eval_variants, evaluate, evaluate_all,  # noqa: F401
                                    to_global, train_and_evaluate)
from routezoo.training.optim import make_optimizer  # noqa: F401
from routezoo.training.state import (RNG_STREAMS, TrainState, assemble_state, create_state,  # noqa: F401
                                     init_variables, maybe_initialize_distributed, mesh_and_rules,
                                     state_shardings, strip_boxes)
from routezoo.training.step import (EVAL_MASK_SEED, cross_entropy, forward_params, make_eval_step,  # noqa: F401
                                    make_train_step, objective_batch)
from routezoo.training.workdir import (load_trained, read_workdir_config, restore_params,  # noqa: F401
                                       restore_state, workdir_params)
from routezoo.zoo.lm import mtp_loss  # noqa: F401
