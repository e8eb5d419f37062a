"""Adapters: parameter-efficient fine-tuning of any routezoo model without editing it.

Importing this package imports every method, so :data:`METHODS` (``adapter.method`` ->
class) is complete whatever is imported first.

* ``base``: the :class:`Adapter` protocol, target selection, the registry, fingerprints;
* ``hooks``: the activation-space hook that every projection of routezoo's layers calls;
* ``lora``, ``dora``, ``pissa``, ``mos`` (Mixture of Shards), ``hydra``: parameter-space methods;
* ``poly`` (Poly, MHR and their few-shot variants), ``library`` (ScaLearn, PHATGOOSE,
  GLIDER over a library of trained LoRAs), ``multi_lora`` (many LoRAs in one batch),
  ``rps`` (randomised parameter sharing).
"""

from __future__ import annotations

from routezoo.layers.adapters.hooks import (  # noqa: F401
    project, HookContext, is_activation_adapter, bind)
from routezoo.layers.adapters.base import (  # noqa: F401
    Adapter, METHODS, register, flat_params, adapted_paths, Target, split_axes, adaptable, select_targets, from_previous, from_config, num_params, fingerprint)
from routezoo.layers.adapters.lora import (  # noqa: F401
    low_rank_dropout_delta, lora_delta, lora_dense, LoRA)
from routezoo.layers.adapters.dora import (  # noqa: F401
    DoRA)
from routezoo.layers.adapters.pissa import (  # noqa: F401
    PiSSA)
from routezoo.layers.adapters.mos import (  # noqa: F401
    projection_type, MoS)
from routezoo.layers.adapters.hydra import (  # noqa: F401
    Hydra)
from routezoo.layers.adapters.poly import (  # noqa: F401
    ROUTER_INIT, EPS, Poly, MHR, MHRZ, MHRMu)
from routezoo.layers.adapters.library import (  # noqa: F401
    LIBRARY_METHODS, LN_EPS, layer_norm, top_k_weights, library_outputs, combine, read_library, ScaLearn)
from routezoo.layers.adapters.phatgoose import (  # noqa: F401
    phatgoose_scores, glider_logits, PhatgooseGate, Phatgoose, Glider, task_embedding, task_similarity)
from routezoo.layers.adapters.multi_lora import (  # noqa: F401
    IMPLS, SUPPORTED_METHODS, MultiLoRA, delta_gather, delta_sorted, multi_lora_delta, per_adapter_loop)
from routezoo.layers.adapters.rps import (  # noqa: F401
    P, MAPPINGS, mulmod_const, mulmod, uhash, sign_hash, Slab, RPS)
