"""routezoo's MoE block and routers as NNX modules.

Both are :class:`~routezoo.nnx.module.LinenModule` s around the Linen modules that
:func:`routezoo.layers.moe.moe_from_config` and
:func:`routezoo.layers.routers.router_from_config` build, from a ``config.model.moe``
node, a mapping, keyword overrides, or all three: the keys and their defaults are the
schema's (``routezoo.configs.base``), so ``MoE(router='thor', num_experts=4, ...)`` and
``MoE(config.model.moe, ...)`` build what a routezoo model with that config builds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from flax.core import meta

from routezoo.layers import moe as moe_lib
from routezoo.layers import routers as routers_lib
from routezoo.layers import sharding
from routezoo.nnx.module import FROZEN_COLLECTIONS, RNG_STREAMS, LinenModule

Array = jax.Array
Dtype = Any


def _items(config: Any) -> dict[str, Any]:
    """The MoE keys of ``config``: a whole config (``.model.moe``), ``config.model``
    (``.moe``), a ``model.moe`` node or a plain mapping of its keys."""
    node = config
    if "model" in node and "num_experts" not in node:
        node = node["model"]
    if "moe" in node and "num_experts" not in node:
        node = node["moe"]
    if isinstance(node, ml_collections.ConfigDict):
        return node.to_dict()
    if isinstance(node, Mapping):
        return dict(node)
    raise TypeError(f"an MoE config is a ConfigDict or a mapping, got {type(config).__name__}")


def _sample_batch() -> int:
    """Batch of a default sample input: 1, or under a mesh the product of routezoo's batch
    axes (activations are constrained to split the batch over them)."""
    mesh = meta.get_global_mesh()
    if mesh is None:
        return 1
    return math.prod(int(dict(mesh.shape).get(a, 1)) for a in sharding.BATCH_AXES)


def moe_config(config: Any = None, /, **overrides: Any) -> ml_collections.ConfigDict:
    """A complete ``config.model.moe``: the schema's defaults, then ``config``'s keys, then
    ``overrides``.

    Args:
      config: ``None``, a config node (the whole config, ``config.model`` or
        ``config.model.moe``) or a mapping of MoE keys.
      **overrides: MoE keys (``num_experts=8, k=2, router='top_k', ...``).

    Returns:
      A new ``ConfigDict``; a one-line ``ValueError`` names unknown keys.
    """
    from routezoo.configs import base   # the schema (only its defaults are read)

    cfg = base.get_config().model.moe
    given = {**(_items(config) if config is not None else {}), **overrides}
    unknown = sorted(set(given) - set(cfg.keys()))
    if unknown:
        raise ValueError(f"unknown MoE config key(s) {unknown}; known: {sorted(cfg.keys())}")
    cfg.update(given)
    return cfg


class MoE(LinenModule):
    """The routezoo MoE feed-forward block as an initialised NNX module.

    ``MoE(config, d_model=D, rngs=nnx.Rngs(0), **overrides)`` builds the Linen block of
    :func:`routezoo.layers.moe.moe_from_config` (the sparse :class:`routezoo.layers.moe.MoE`
    with the configured router, or the router's own block: Soft MoE, Duo-LLM) and
    initialises it on ``sample_input``. Variables: ``m.experts['wi']`` ``[E, D, F]``,
    ``m.router['kernel']`` ``[D, E]``, ... as in the Linen tree.

    Args:
      config: see :func:`moe_config`.
      d_model: the model width ``D``.
      rngs: ``nnx.Rngs``: ``params`` (or ``default``) initialises; ``dropout`` (jitter)
        and ``router`` (THOR, Duo-LLM) streams, or ``default``, feed training calls.
      sample_input: ``[B, L, D]`` for initialisation; default zeros ``[B, S, D]`` with
        ``S = group_size`` or 8 and ``B`` = 1, or under a mesh the size of its batch axes
        (parameter shapes do not depend on ``B`` or ``L``).
      sample_token_ids: int32 ``[B, L]`` for routers that read token ids (hash; default
        zeros).
      sample_router_inputs: the router's extra inputs for initialisation (pre-gate:
        ``{'pregate_logits': [T, E]}``).
      dtype / param_dtype: compute and parameter dtypes.
      eager_sharding: create the variables sharded (``None``: when a mesh is set).
      jit_init: initialise under ``nnx.jit`` (``False``: op by op).
      **overrides: MoE config keys.
    """

    def __init__(self, config: Any = None, /, *, d_model: int, rngs: nnx.Rngs,
                 sample_input: Array | None = None, sample_token_ids: Array | None = None,
                 sample_router_inputs: Mapping[str, Any] | None = None, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, eager_sharding: bool | None = None, jit_init: bool = True,
                 **overrides: Any):
        cfg = moe_config(config, **overrides)
        moe_lib.validate_moe_config(cfg, causal=False, mesh_shape={})
        module = moe_lib.moe_from_config(cfg, d_model=int(d_model), dtype=dtype, param_dtype=param_dtype)
        if sample_input is None:
            sample_input = jnp.zeros((_sample_batch(), int(cfg.group_size) or 8, int(d_model)), dtype)
        kwargs: dict[str, Any] = {"deterministic": True}
        if routers_lib.router_class(str(cfg.router)).needs_token_ids:
            kwargs["token_ids"] = (jnp.zeros(sample_input.shape[:2], jnp.int32) if sample_token_ids is None
                                   else sample_token_ids)
        if sample_router_inputs is not None:
            kwargs["router_inputs"] = dict(sample_router_inputs)
        super().__init__(module, (sample_input,), kwargs, rngs=rngs, rng_streams=RNG_STREAMS,
                         frozen_collections=FROZEN_COLLECTIONS, eager_sharding=eager_sharding, jit_init=jit_init)

    def __call__(self, x: Array, *, deterministic: bool = True, token_ids: Array | None = None,
                 router_inputs: Mapping[str, Any] | None = None, rngs: nnx.Rngs | None = None,
                 mutable: Any = None) -> tuple[Array, dict[str, Any]]:
        """The Linen block's ``(y [B, L, D], aux)``, ``aux = {'losses': {...}, 'stats': {...}}``
        (plus ``'router_state'`` for routers that hand a state on).

        Args:
          x: ``[B, L, D]``.
          deterministic: evaluation (no RNG keys, no router-state updates); ``False``:
            training, keys from the module's streams (or ``rngs``) and the router state
            (balancing bias, SMoE-Dropout's step) advanced in place.
          token_ids: int32 ``[B, L]`` for the hash router.
          router_inputs: the router's extra inputs (see the Linen block).
          rngs: streams for this call instead of the module's own.
          mutable: Linen's ``mutable`` (``None``: the state collections in training).
        """
        kwargs: dict[str, Any] = {"deterministic": deterministic}
        if token_ids is not None:
            kwargs["token_ids"] = token_ids
        if router_inputs is not None:
            kwargs["router_inputs"] = dict(router_inputs)
        return self._run((x,), kwargs, rngs=rngs, mutable=mutable)


class Router(LinenModule):
    """A routezoo router (``moe.router``) on its own, as an initialised NNX module.

    Args:
      config: see :func:`moe_config`; ``router`` picks the class (:data:`routezoo.layers.routers.ROUTERS`).
      d_model: the token width ``D``.
      rngs: ``nnx.Rngs`` (as for :class:`MoE`).
      sample_input: ``[T, D]`` for initialisation (default zeros ``[8, D]``).
      sample_kwargs: the router's extra call arguments for initialisation (``token_ids``
        for hash: default zeros; ``pregate_logits`` for pre-gate).
      eager_sharding: create the variables sharded (``None``: when a mesh is set).
      jit_init: initialise under ``nnx.jit`` (``False``: op by op).
      **overrides: MoE config keys.
    """

    def __init__(self, config: Any = None, /, *, d_model: int, rngs: nnx.Rngs,
                 sample_input: Array | None = None, sample_kwargs: Mapping[str, Any] | None = None,
                 eager_sharding: bool | None = None, jit_init: bool = True, **overrides: Any):
        cfg = moe_config(config, **overrides)
        cls = routers_lib.router_class(str(cfg.router))
        cls.check_config(cfg, causal=False)
        if sample_input is None:
            sample_input = jnp.zeros((max(8, _sample_batch()), int(d_model)), jnp.float32)
        kwargs: dict[str, Any] = {"deterministic": True, **dict(sample_kwargs or {})}
        if cls.needs_token_ids and "token_ids" not in kwargs:
            kwargs["token_ids"] = jnp.zeros(sample_input.shape[:1], jnp.int32)
        super().__init__(routers_lib.router_from_config(cfg), (sample_input,), kwargs, rngs=rngs,
                         rng_streams=RNG_STREAMS, frozen_collections=FROZEN_COLLECTIONS,
                         eager_sharding=eager_sharding, jit_init=jit_init)

    def __call__(self, x: Array, *, deterministic: bool = True, group_size: int | None = None,
                 rngs: nnx.Rngs | None = None, mutable: Any = None,
                 **router_kwargs: Any) -> routers_lib.Routing:
        """The router's :class:`~routezoo.layers.routers.Routing` for ``x [T, D]`` (routing
        groups of ``group_size`` consecutive tokens; ``None``: one group); extra keyword
        arguments go to the router (``token_ids``, ``pregate_logits``, ...)."""
        kwargs = {"deterministic": deterministic, "group_size": group_size, **router_kwargs}
        return self._run((x,), kwargs, rngs=rngs, mutable=mutable)


__all__ = ["MoE", "Router", "moe_config"]
