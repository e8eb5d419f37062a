"""Routers: token states to a :class:`Routing` (which experts, with what weight).

One module per family; importing this package imports them all, so :data:`ROUTERS`
(config name -> class, filled by :func:`register`) is complete whatever is imported first.

* ``base``: :class:`Router`, :class:`Routing`, :func:`register`, the shared losses;
* ``top_k`` (Switch, GShard/Mixtral), ``expert_choice`` (Zhou et al. 2022);
* ``deepseek`` (DeepSeek-V2/V3 group-limited routing);
* ``stochastic`` (hash layers, THOR, SMoE-Dropout), ``dynamic`` (top-p, AdaMoE null experts);
* ``stateful`` (the recurrent router of RMoE, Read-ME's pre-gating).

Routers that come with their own expert computation (Soft MoE, Union of Experts,
Duo-LLM) live in :mod:`routezoo.layers.moe` and register there.
"""

from __future__ import annotations

from routezoo.layers.routers.base import (  # noqa: F401
    Routing, check_k, expert_capacity, load_balance_loss, router_z_loss, routing_stats, top_k, ROUTER_PRECISIONS, router_precision, ModelRouting, Router, ROUTERS, register, router_class, router_from_config, router_config_keys)
from routezoo.layers.routers.top_k import (  # noqa: F401
    TopKRouter)
from routezoo.layers.routers.expert_choice import (  # noqa: F401
    ExpertChoiceRouter)
from routezoo.layers.routers.deepseek import (  # noqa: F401
    DeepSeekV3Router, DeepSeekV2Router)
from routezoo.layers.routers.stochastic import (  # noqa: F401
    THOR_TRAIN_LEVELS, THOR_INFERENCE_LEVELS, SMOE_SCHEDULES, hash_table, hash_experts, HashRouter, ThorRouter, smoe_k, SMoEDropoutRouter)
from routezoo.layers.routers.dynamic import (  # noqa: F401
    top_p_mask, TopPRouter, NullExpertsRouter)
from routezoo.layers.routers.stateful import (  # noqa: F401
    RECURRENT_CELLS, RecurrentRouterCell, RecurrentRouter, RecurrentState, pregate_select, PreGate, PreGateRouter, PreGateRouting)

# The function top_k (base.py) shares its name with the module top_k.py; importing that
# module set this package's attribute to the module: bind the function again.
from routezoo.layers.routers.base import top_k  # noqa: E402,F401,F811
