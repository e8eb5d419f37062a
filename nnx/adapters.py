"""routezoo adapters (LoRA, MoS, Hydra, Poly/MHR, ...) over a base module, as NNX modules.

routezoo's adapters are not Linen modules: a method (:class:`routezoo.layers.adapters.Adapter`)
maps a base parameter tree to its own tree of adapter parameters, and either folds it into
the weights (``merge``: parameter-space methods) or adds its term to every targeted
projection while the base runs (``hooks.bind``: activation-space methods, e.g. Poly/MHR).
:class:`Adapted` holds the base as a :class:`~routezoo.nnx.module.LinenModule` and the
adapter parameters as :class:`AdapterParam` variables, and does exactly that on every call,
so the outputs are the Linen base's on the adapted weights.

:class:`AdapterParam` subclasses ``nnx.Param``: ``nnx.Optimizer(model, tx, wrt=AdapterParam)``
(and ``nnx.DiffState(0, AdapterParam)`` for ``nnx.grad``) trains the adapter only, the
base staying frozen as in routezoo's adapter runs; ``wrt=nnx.Param`` trains both.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import linen as nn
from flax import nnx
from flax.nnx import traversals
from flax.nnx.bridge import variables as bridge_vars

from routezoo.layers import adapters as adapters_lib
from routezoo.layers.adapters import hooks
from routezoo.nnx.module import LinenModule, _draw, _eager, _registered

Array = jax.Array

_COLLECTION = "adapter_params"


class AdapterParam(nnx.Param):
    """A trainable parameter of a routezoo adapter (a subclass of ``nnx.Param``)."""


AdapterParam = _registered(_COLLECTION, AdapterParam)


def adapter_method(adapter: Any = None, /, **overrides: Any) -> adapters_lib.Adapter:
    """An adapter method: ``adapter`` itself when it is one (no overrides), else built by
    :func:`routezoo.layers.adapters.from_config` from the schema's ``config.adapter``
    defaults, then ``adapter``'s keys (a ``config.adapter`` node, the whole config or a
    mapping), then ``overrides`` (``method='lora', targets='wi|wo', rank=4``)."""
    if isinstance(adapter, adapters_lib.Adapter):
        if overrides:
            raise ValueError("adapter_method: pass overrides with a config, not with an Adapter instance")
        return adapter
    from routezoo.configs import base   # the schema (only its defaults are read)

    cfg = base.get_config().adapter
    given: dict[str, Any] = {}
    if adapter is not None:
        node = adapter["adapter"] if "adapter" in adapter and "method" not in adapter else adapter
        given = node.to_dict() if hasattr(node, "to_dict") else dict(node)
    given.update(overrides)
    unknown = sorted(set(given) - set(cfg.keys()))
    if unknown:
        raise ValueError(f"unknown adapter config key(s) {unknown}; known: {sorted(cfg.keys())}")
    cfg.update(given)
    method = adapters_lib.from_config(cfg)
    if method is None:
        raise ValueError("adapter_method: adapter.method is empty; name one of "
                         f"{sorted(adapters_lib.METHODS)}")
    return method


def _takes(module: nn.Module, method: str | Callable | None, name: str) -> bool:
    """Whether ``module``'s method (``None``: ``__call__``) has a parameter ``name`` (or ``**kwargs``)."""
    fn = getattr(type(module), method or "__call__") if not callable(method) else method
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class Adapted(nnx.Module):
    """A base module with a routezoo adapter, as an initialised NNX module.

    Attributes:
      base: the base :class:`~routezoo.nnx.module.LinenModule` (its ``nnx.Param`` s).
      adapter: the adapter's parameters, a nested dict mirroring the Linen adapter tree
        (``model.adapter['wi']['lora_a']``), :class:`AdapterParam` variables carrying the
        adapter's logical axis names.
      method: the :class:`~routezoo.layers.adapters.Adapter` (static).

    Args:
      base: a Linen module (initialised here on ``sample_inputs``) or an initialised
        :class:`~routezoo.nnx.module.LinenModule` (e.g. :class:`routezoo.nnx.MoE`).
      adapter: an :class:`~routezoo.layers.adapters.Adapter` (``LoRA(targets='wi', rank=4)``)
        or a config, with ``**overrides``; see :func:`adapter_method`. Targets are
        matched against the base's own parameter paths (``wi``, ``experts/wi``, ...).
      sample_inputs: the base's sample input (one array or a tuple), for a Linen base.
      rngs: ``nnx.Rngs``; ``params`` (or ``default``) initialises the base and the
        adapter; the ``adapter`` stream (else ``dropout``, else ``default``) feeds the
        adapter's own randomness in training (LoRA dropout, Poly's relaxed Bernoulli).
      sample_kwargs: the base's sample keyword arguments (``deterministic=True``, ...).
      init_kwargs: extra arguments of the method's ``init`` (``previous=``,
        ``library=``, ``library_configs=``).
      eager_sharding: create the variables sharded (``None``: when a mesh is set).
      jit_init: initialise a Linen base under ``nnx.jit`` (``False``: op by op).
    """

    def __init__(self, base: nn.Module | LinenModule, adapter: Any = None, /, sample_inputs: Any = (), *,
                 rngs: nnx.Rngs, sample_kwargs: Mapping[str, Any] | None = None,
                 init_kwargs: Mapping[str, Any] | None = None, eager_sharding: bool | None = None,
                 jit_init: bool = True, **overrides: Any):
        method = adapter_method(adapter, **overrides)
        if isinstance(base, LinenModule):
            self.base = base
        elif isinstance(base, nn.Module):
            args = sample_inputs if isinstance(sample_inputs, tuple) else (sample_inputs,)
            self.base = LinenModule(base, args, sample_kwargs, rngs=rngs, eager_sharding=eager_sharding,
                                    jit_init=jit_init)
        else:
            raise TypeError(f"Adapted: base must be a Linen module or a LinenModule, got {type(base).__name__}")
        boxed = self.base.linen_variables(boxed=True)["params"]
        tree = method.init(rngs["params"](), boxed, **dict(init_kwargs or {}))
        with nnx.use_eager_sharding(_eager(eager_sharding)):
            attrs = bridge_vars.linen_vars_to_nnx_attrs({_COLLECTION: tree})
        self.adapter = nnx.data(attrs)
        self.method = method

    # ------------------------------------------------------------------ variables

    def adapter_variables(self, *, boxed: bool = False) -> dict[str, Any]:
        """The Linen adapter tree (what ``method.init`` made, with the trained values)."""
        tree = bridge_vars.nnx_attrs_to_linen_vars(dict(self.adapter)).get(_COLLECTION, {})
        return tree if boxed else nn.unbox(tree)

    def load_adapter_variables(self, tree: Mapping[str, Any]) -> None:
        """Sets the adapter parameters from a Linen adapter tree (boxed or not), in place."""
        flat = traversals.flatten_mapping(dict(self.adapter))
        for path, value in traversals.flatten_mapping(nn.unbox(dict(tree))).items():
            var = flat.get(path)
            if var is None:
                raise ValueError(f"load_adapter_variables: {'/'.join(map(str, path))} is not an adapter parameter")
            if jax.numpy.shape(value) != jax.numpy.shape(var.get_value()):
                raise ValueError(f"load_adapter_variables: {'/'.join(map(str, path))} is shaped "
                                 f"{jax.numpy.shape(value)}, this adapter's is {jax.numpy.shape(var.get_value())}")
            var.set_value(value)

    def merged_params(self) -> dict[str, Any]:
        """The base's Linen parameters with the adapter folded in (``method.merge``), for
        mergeable methods: the weights to serve or export without adapter code."""
        if not self.method.mergeable:
            raise ValueError(f"adapter.method={self.method.name!r} does not merge into one set of weights "
                             "(Poly/MHR: method.merge_task(base, adapter, task))")
        return self.method.merge(self.base.linen_variables()["params"], self.adapter_variables())

    # ------------------------------------------------------------------ calls

    def __call__(self, *args: Any, deterministic: bool = True, task_ids: Array | None = None,
                 rngs: nnx.Rngs | None = None, mutable: Any = None, method: str | Callable | None = None,
                 **kwargs: Any) -> Any:
        """The base's call with the adapter applied.

        Args:
          *args, **kwargs: the base module's call arguments.
          deterministic: evaluation (no RNG keys for the adapter or the base); passed on to
            the base when its call takes ``deterministic``. ``False``: training.
          task_ids: int32 ``[B]``, the task of each example, for methods that need one.
          rngs: streams for this call instead of the base's own.
          mutable: Linen's ``mutable`` for the base's state collections.
          method: a Linen method of the base (or its name) instead of ``__call__``.
        """
        if _takes(self.base.linen_module, method, "deterministic"):
            kwargs["deterministic"] = deterministic
        stochastic = not deterministic
        base = self.base.linen_variables()["params"]
        adapter = self.adapter_variables()
        full = base if hooks.is_activation_adapter(self.method) else self.method.merge(base, adapter)
        hook_rng = None
        if stochastic:
            source = rngs if rngs is not None else self.base.to_nnx__rngs
            keys = _draw(source, ("adapter",)) or {"adapter": k for k in _draw(source, ("dropout",)).values()}
            hook_rng = keys.get("adapter")
        with hooks.bind(self.method, base, adapter, task_ids=task_ids, rng=hook_rng, deterministic=not stochastic):
            return self.base._run(args, kwargs, stochastic=stochastic, rngs=rngs, mutable=mutable, method=method,
                                  params=full)


__all__ = ["AdapterParam", "Adapted", "adapter_method"]
