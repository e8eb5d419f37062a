"""routezoo layers as Flax NNX modules, through ``flax.nnx.bridge``.

The Linen layers stay the only implementation: every module here is a
``flax.nnx.bridge.ToNNX`` around the Linen module routezoo builds, created initialised
(``bridge.lazy_init``) and called through ``linen_module.apply`` on its variables.

* :class:`MoE`: the MoE block of ``config.model.moe`` (any router; Soft MoE and Duo-LLM
  bring their own block), ``(y, aux) = moe(x, deterministic=...)``;
* :class:`Router`: one router on its own, ``routing = router(x [T, D], deterministic=...)``;
* :class:`Adapted`: a base module with a routezoo adapter (LoRA, MoS, Hydra, Poly/MHR, ...),
  its parameters :class:`AdapterParam` (train them with ``wrt=AdapterParam``);
* :func:`wrap` / :class:`LinenModule`: any Linen module;
* :data:`RouterState`, :data:`RouterFixed`: the NNX variable types of the routers'
  ``'router_state'`` and ``'router_fixed'`` collections.

Example::

    from flax import nnx
    import routezoo.nnx as rnnx

    moe = rnnx.MoE(d_model=64, num_experts=8, k=2, expert_dim=128, rngs=nnx.Rngs(0))
    y, aux = moe(x)                                   # evaluation
    y, aux = moe(x, deterministic=False)              # training: jitter, router state

See ``docs/nnx.md``.
"""

from __future__ import annotations

from routezoo.nnx.module import (  # noqa: F401
    FROZEN_COLLECTIONS, RNG_STREAMS, LinenModule, RouterFixed, RouterState, wrap)
from routezoo.nnx.blocks import (  # noqa: F401
    MoE, Router, moe_config)
from routezoo.nnx.adapters import (  # noqa: F401
    AdapterParam, Adapted, adapter_method)

__all__ = ["FROZEN_COLLECTIONS", "RNG_STREAMS", "AdapterParam", "Adapted", "LinenModule", "MoE", "Router",
           "RouterFixed", "RouterState", "adapter_method", "moe_config", "wrap"]
