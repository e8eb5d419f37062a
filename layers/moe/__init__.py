"""Mixture-of-experts blocks: router -> dispatcher -> stacked experts -> combine.

* ``block``: :class:`MoE`, :func:`moe_from_config`, :func:`validate_moe_config`;
* ``capacity``: fixed per-expert buffers; ``dropless``: sort + grouped matmul;
* ``exchange``: the expert-parallel all-to-all of dropless dispatch (padded or ragged);
* ``gmm``: expert maths and the grouped-matmul backends (``kernels/``);
* ``soft`` (Soft MoE), ``uoe`` (Union of Experts), ``duo`` (Duo-LLM): blocks that are a
  router plus their own computation.
"""

from __future__ import annotations

from routezoo.layers.moe.gmm import (  # noqa: F401
    EXPERT_PARAM_NAMES, EXPERT_TYPES, ffn_batched, gmm_ragged_dot, gmm_dense, gmm_blocked, gmm_pallas, gmm_megablox, gmm_mosaic, GMM_BACKENDS, GMM_BACKEND_NAMES, resolve_gmm_backend, ffn_grouped, take_rows, invert_permutation)
from routezoo.layers.moe.exchange import (  # noqa: F401
    mesh_axes_of, constrain_expert_parallel, EP_EXCHANGES, resolve_ep_exchange, ragged_exchange, ragged_exchange_emulated,
    ragged_exchange_rows)
from routezoo.layers.moe.capacity import (  # noqa: F401
    CAPACITY_IMPLS, CAPACITY_FILLS, capacity_slots, capacity_moe, expert_choice_moe)
from routezoo.layers.moe.dropless import (  # noqa: F401
    dropless_moe)
from routezoo.layers.moe.block import (  # noqa: F401
    DISPATCH_MODES, Experts, MoE, moe_from_config, sparse_moe_from_config, validate_moe_config,
    expand_expert_params, format_expert_maps, has_per_layer_maps, layer_expert_maps, logical_moe_config,
    logical_num_experts, moe_config_for_layer, parse_expert_maps, validate_expert_map)
from routezoo.layers.moe.soft import (  # noqa: F401
    slots_per_expert, SoftRouting, SoftRouter, SoftMoE, soft_moe_from_config)
from routezoo.layers.moe.uoe import (  # noqa: F401
    SLICE_TYPES, heads_per_token, attention_capacity, compact_in_time_order, SelectiveAttention, check_model_config, selective_attention_from_config, UoERouter, slices_from_dense, dense_from_slices)
from routezoo.layers.moe.duo import (  # noqa: F401
    OPTIONS, DUO_MODES, EVAL_ROUTES, small_width, option_costs, parse_probs, parse_eval_sweep, DuoRouter, DuoFFN, duo_from_config)

# The routing API the MoE block builds on, importable from here too.
from routezoo.layers.routers import (  # noqa: E402,F401
    ROUTER_PRECISIONS, ROUTERS, Router, Routing, TopKRouter, expert_capacity, router_from_config)
