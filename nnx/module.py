"""Any Linen module as an initialised Flax NNX module, through ``flax.nnx.bridge``.

:class:`LinenModule` is a :class:`flax.nnx.bridge.ToNNX` that is created initialised (by
``bridge.lazy_init`` on sample inputs) and whose call handles what routezoo's Linen layers
need beyond ``'params'``:

* **RNG streams.** Linen modules draw from named streams: ``'dropout'`` (router jitter,
  dropout), ``'router'`` (THOR's random experts, Duo-LLM's sampled routes), ``'jitter'``
  (reserved by the training loop). Every call that is not ``deterministic=True`` passes
  one fresh key per stream, drawn from the module's :class:`flax.nnx.Rngs` (forked from
  the ``rngs`` given at construction); a stream the ``Rngs`` does not name falls back to
  its ``default`` stream, as ``nnx.Rngs`` always does. ``deterministic=True`` passes no
  keys, as the Linen evaluation step does (THOR then uses its fixed seed). A call's
  ``rngs=`` argument replaces the module's own streams for that call.
* **State collections.** Every collection other than ``'params'`` becomes its own
  ``nnx.Variable`` type: ``'router_state'`` (:class:`RouterState`: the aux-loss-free
  balancing bias, SMoE-Dropout's step counter), ``'router_fixed'`` (:class:`RouterFixed`:
  SMoE-Dropout's frozen random router), ``'batch_stats'`` (``nnx.BatchStat``),
  ``'cache'`` (``nnx.Cache``), ``'intermediates'`` (``nnx.Intermediate``); any other name
  gets a type made by the bridge. A call that is not ``deterministic=True`` applies the
  Linen module with those collections mutable (except the frozen :data:`FROZEN_COLLECTIONS`)
  and writes the new values back into the same variables, in place. An optimizer built
  with ``wrt=nnx.Param`` never sees them.
* **Intermediates.** Sown values are outputs, never inputs: ``mutable=['intermediates']``
  captures this call's sown values (replacing earlier ones) as ``nnx.Intermediate``
  variables; read them with ``nnx.state(m, nnx.Intermediate)`` or ``nnx.pop``.
* **Logical sharding.** Linen parameters boxed by ``nn.with_logical_partitioning``
  (every routezoo parameter) keep their names as NNX metadata: ``variable.out_sharding``
  holds the logical names (e.g. ``('expert', 'embed', 'expert_mlp')``),
  ``variable.sharding_rules`` the box's rules (``None``) and ``linen_meta_type`` the Linen
  box; ``nnx.get_partition_spec`` gives the logical spec. With ``eager_sharding`` (default:
  on exactly when a mesh is set, ``jax.set_mesh``) the variables are created sharded,
  their names mapped by the ``nn.logical_axis_rules`` in effect.

Linen stays the only implementation: calls run ``linen_module.apply`` on the variables'
values, so the outputs are the Linen module's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from flax import nnx
from flax.core import meta
from flax.nnx import bridge
from flax.nnx import traversals
from flax.nnx.bridge import variables as bridge_vars

Array = jax.Array

#: RNG streams a routezoo Linen module may draw from besides ``'params'`` (the training
#: loop provides the same three): jitter and dropout draw from ``'dropout'``, THOR and
#: Duo-LLM from ``'router'``.
RNG_STREAMS: tuple[str, ...] = ("dropout", "jitter", "router")

#: Collections that are never written back: SMoE-Dropout's frozen random router.
FROZEN_COLLECTIONS: tuple[str, ...] = ("router_fixed",)

_PRIVATE = ("to_nnx__", "_pytree__")


def _registered(name: str, cls: type[nnx.Variable]) -> type[nnx.Variable]:
    """The NNX variable type of the Linen collection ``name``: ``cls``, registered now,
    or the type already registered under that name."""
    try:
        return nnx.variable_type_from_name(name)
    except ValueError:
        nnx.register_variable_name(name, cls)
        return cls


class RouterState(nnx.Variable):
    """Linen collection ``'router_state'``: router state updated outside the gradient
    (the aux-loss-free balancing bias, SMoE-Dropout's step counter)."""


class RouterFixed(nnx.Variable):
    """Linen collection ``'router_fixed'``: never trained and never changed after init
    (SMoE-Dropout's random router ``kernel`` and ``bias``)."""


RouterState = _registered("router_state", RouterState)
RouterFixed = _registered("router_fixed", RouterFixed)


def _eager(eager_sharding: bool | None) -> bool:
    return meta.get_global_mesh() is not None if eager_sharding is None else bool(eager_sharding)


def _draw(rngs: nnx.Rngs, names: Iterable[str]) -> dict[str, Array]:
    """One key per stream name that ``rngs`` can serve (its own stream or ``default``)."""
    out = {}
    for name in names:
        try:
            out[name] = rngs[name]()
        except KeyError:
            continue
    return out


def _stream_names(rngs: nnx.Rngs, extra: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys([*extra, *(n for n, _ in rngs.items())]))
    return [n for n in names if n not in ("default", "params")]


def _captures(mutable: Any) -> bool:
    """Whether Linen's ``mutable`` argument makes ``'intermediates'`` mutable."""
    if isinstance(mutable, bool):
        return mutable
    if isinstance(mutable, str):
        return mutable == "intermediates"
    try:
        return "intermediates" in mutable
    except TypeError:
        return False


class LinenModule(bridge.ToNNX):
    """A Linen module as an initialised NNX module (``flax.nnx.bridge.ToNNX``).

    Its variables are attributes named by the Linen paths: ``m.experts['wi']`` is the
    Linen ``params['experts']['wi']`` (an ``nnx.Param``), ``m.router['bias']`` the
    ``router_state`` ``['router']['bias']`` (a :class:`RouterState`). Calling it calls
    the Linen module with the same arguments.

    Args:
      module: the Linen module (unbound).
      sample_args: positional arguments of one call, for initialisation (only shapes and
        dtypes matter for most modules).
      sample_kwargs: keyword arguments of that call.
      rngs: ``nnx.Rngs``; ``params`` (or ``default``) initialises the parameters, the
        other streams (or ``default``) feed :data:`RNG_STREAMS` on every call.
      rng_streams: the stream names passed to the Linen module besides ``'params'``;
        every stream ``rngs`` names is passed as well.
      frozen_collections: collections never made mutable.
      eager_sharding: create the variables sharded by their logical names (``None``:
        when a mesh is set).
      jit_init: run ``bridge.lazy_init`` under ``nnx.jit`` (one compiled init instead of
        an op-by-op forward pass); ``False`` for modules whose init cannot be traced.
    """

    def __init__(self, module: nn.Module, sample_args: Sequence[Any] = (),
                 sample_kwargs: Mapping[str, Any] | None = None, *, rngs: nnx.Rngs,
                 rng_streams: Sequence[str] = RNG_STREAMS,
                 frozen_collections: Sequence[str] = FROZEN_COLLECTIONS,
                 eager_sharding: bool | None = None, jit_init: bool = True):
        if not isinstance(module, nn.Module):
            raise TypeError(f"LinenModule wraps a flax.linen Module, got {type(module).__name__}")
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")
        if "params" not in rngs and "default" not in rngs:
            raise ValueError("rngs needs a 'params' or 'default' stream to initialise the parameters: "
                             "nnx.Rngs(0) or nnx.Rngs(params=0, ...)")
        super().__init__(module, rngs=rngs)
        self.to_nnx__rng_streams = tuple(rng_streams)
        self.to_nnx__frozen = tuple(frozen_collections)
        args, kwargs = tuple(sample_args), dict(sample_kwargs or {})
        with nnx.use_eager_sharding(_eager(eager_sharding)):
            if not jit_init:
                bridge.lazy_init(self._run, args, kwargs, stochastic=False)
            else:
                # Arrays are traced, everything else (flags, modules) is a static argument,
                # so modules of one structure share one compiled init.
                leaves, treedef = jax.tree.flatten((args, kwargs))
                traced = tuple(isinstance(v, (jax.Array, np.ndarray)) for v in leaves)
                static = (treedef, traced, tuple(None if t else v for v, t in zip(leaves, traced)))
                arrays = [v for v, t in zip(leaves, traced) if t]
                try:
                    hash(static)
                except TypeError:   # an unhashable argument: compile for this module alone
                    nnx.jit(lambda m, arrays: _init(m, arrays, static))(self, arrays)
                else:
                    _jit_init(self, arrays, static)

    @property
    def linen_module(self) -> nn.Module:
        """The Linen module this module applies."""
        return self.to_nnx__module

    # ------------------------------------------------------------------ variables

    def _nnx_attrs(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith(_PRIVATE)}

    def linen_variables(self, *, boxed: bool = False) -> dict[str, Any]:
        """The Linen variables ``{collection: tree}`` of this module, by the bridge's own
        conversion (``boxed``: parameters stay ``nn.LogicallyPartitioned``)."""
        variables = bridge_vars.nnx_attrs_to_linen_vars(self._nnx_attrs())
        return variables if boxed else nn.unbox(variables)

    def load_linen_variables(self, variables: Mapping[str, Any]) -> None:
        """Sets this module's variables from Linen ``{collection: tree}`` (boxed or not),
        in place; every leaf must exist here with the same shape (collections absent from
        ``variables`` keep their values)."""
        flat = traversals.flatten_mapping(self._nnx_attrs())
        for col, tree in nn.unbox(dict(variables)).items():
            vtype = nnx.variable_type_from_name(col, allow_register=True)
            for path, value in traversals.flatten_mapping(dict(tree)).items():
                var = flat.get(path)
                where = f"{col}/{'/'.join(map(str, path))}"
                if var is None or type(var) is not vtype:
                    raise ValueError(f"load_linen_variables: {where} is not a variable of this module")
                old = var.get_value()
                if jax.tree.map(jax.numpy.shape, old) != jax.tree.map(jax.numpy.shape, value):
                    raise ValueError(f"load_linen_variables: {where} is shaped {jax.numpy.shape(value)}, "
                                     f"this module's is {jax.numpy.shape(old)}")
                var.set_value(value)

    def _write_back(self, updates: Mapping[str, Any], clear_intermediates: bool) -> None:
        """Writes a Linen apply's ``updates`` into this module's variables: in place where
        the variable exists, as a new variable where it does not."""
        attrs = self._nnx_attrs()
        flat = traversals.flatten_mapping(attrs)
        changed: set[str] = set()
        if clear_intermediates:
            for path in [p for p, v in flat.items() if isinstance(v, nnx.Intermediate)]:
                del flat[path]
                changed.add(path[0])
        for col, tree in dict(updates).items():
            vtype = nnx.variable_type_from_name(col, allow_register=True)
            for path, value in traversals.flatten_mapping(dict(tree)).items():
                var = flat.get(path)
                if var is not None and type(var) is vtype:
                    var.set_value(nn.unbox(value))
                else:
                    flat[path] = bridge_vars.to_nnx_var(col, value)
                    changed.add(path[0])
        for top in changed:
            sub = {p[1:]: v for p, v in flat.items() if p[0] == top}
            if not sub:
                delattr(self, top)
            elif () in sub:
                setattr(self, top, sub[()])
            else:
                setattr(self, top, nnx.data(traversals.unflatten_mapping(sub)))

    # ------------------------------------------------------------------ calls

    def _run(self, args: tuple, kwargs: dict[str, Any], *, stochastic: bool | None = None,
             rngs: nnx.Rngs | None = None, mutable: Any = None, method: str | Callable | None = None,
             params: Any = None) -> Any:
        """Applies the Linen module (initialises it under ``bridge.lazy_init``).

        ``stochastic`` (``None``: unless ``kwargs['deterministic'] is True``) decides whether
        RNG keys are passed and state collections are mutable by default; ``params``
        replaces the ``'params'`` collection's values for this call (adapters).
        """
        if stochastic is None:
            stochastic = kwargs.get("deterministic", False) is not True
        if self._pytree__state.initializing:
            source = rngs if rngs is not None else self.to_nnx__rngs
            keys = _draw(source, ["params", *_stream_names(source, self.to_nnx__rng_streams)])
            if "params" not in keys:
                raise ValueError("initialising needs a 'params' or 'default' stream")
            return bridge.ToNNX.__call__(self, *args, rngs=nnx.Rngs(**keys), method=method, **kwargs)

        variables = dict(self.linen_variables())
        if params is not None:
            variables["params"] = params
        if mutable is None:
            mutable = [c for c in variables if c not in ("params", "intermediates", *self.to_nnx__frozen)]
            mutable = mutable if stochastic and mutable else False
        capture = _captures(mutable)
        variables.pop("intermediates", None)   # sown values are outputs, never inputs
        keys: dict[str, Array] = {}
        if rngs is not None:
            keys = _draw(rngs, _stream_names(rngs, self.to_nnx__rng_streams))
        elif stochastic:
            keys = _draw(self.to_nnx__rngs, _stream_names(self.to_nnx__rngs, self.to_nnx__rng_streams))
        out = self.to_nnx__module.apply(variables, *args, rngs=keys, method=method, mutable=mutable, **kwargs)
        if mutable is not False:
            out, updates = out
            # Linen never changes parameters outside init; with ``params`` given they are
            # not even this module's (an adapter's merged weights).
            updates = {c: t for c, t in dict(updates).items() if c != "params" and c not in self.to_nnx__frozen}
            self._write_back(updates, clear_intermediates=capture)
        return out

    def __call__(self, *args: Any, rngs: nnx.Rngs | None = None, mutable: Any = None,
                 method: str | Callable | None = None, **kwargs: Any) -> Any:
        """``linen_module.apply(variables, *args, **kwargs)`` on this module's variables.

        Args:
          *args, **kwargs: the Linen module's call arguments. ``deterministic=True`` means
            evaluation: no RNG keys and no state updates (unless given here).
          rngs: streams for this call instead of the module's own.
          mutable: collections to make mutable, Linen's argument (``None``: every state
            collection except the frozen ones when not deterministic, else none).
          method: a Linen method (or its name) to call instead of ``__call__``.

        Returns:
          What the Linen module returns.
        """
        return self._run(args, kwargs, rngs=rngs, mutable=mutable, method=method)


def _init(m: LinenModule, arrays: list, static: tuple) -> None:
    """``bridge.lazy_init`` of ``m`` on the sample call rebuilt from ``arrays`` and ``static``."""
    treedef, traced, others = static
    it = iter(arrays)
    args, kwargs = jax.tree.unflatten(treedef, [next(it) if t else v for v, t in zip(others, traced)])
    bridge.lazy_init(m._run, args, kwargs, stochastic=False)


_jit_init = nnx.jit(_init, static_argnums=2)


def wrap(module: nn.Module, sample_inputs: Any = (), rngs: nnx.Rngs | None = None, /, *,
         eager_sharding: bool | None = None, rng_streams: Sequence[str] = RNG_STREAMS,
         jit_init: bool = True, **sample_kwargs: Any) -> LinenModule:
    """Any Linen module as an initialised NNX module (:class:`LinenModule`).

    Args:
      module: the Linen module.
      sample_inputs: the positional input of one call (one array), or a tuple of
        positional inputs.
      rngs: ``nnx.Rngs`` for initialisation and for the module's RNG streams.
      eager_sharding: create the variables sharded (``None``: when a mesh is set).
      rng_streams: stream names passed to the module besides ``'params'``.
      jit_init: initialise under ``nnx.jit`` (``False``: op by op).
      **sample_kwargs: keyword arguments of the sample call (e.g. ``deterministic=True``).

    Returns:
      The :class:`LinenModule`, called as the Linen module is.
    """
    if rngs is None:
        raise TypeError("wrap(module, sample_inputs, rngs): rngs (an nnx.Rngs) is required")
    args = sample_inputs if isinstance(sample_inputs, tuple) else (sample_inputs,)
    return LinenModule(module, args, sample_kwargs, rngs=rngs, rng_streams=rng_streams,
                       eager_sharding=eager_sharding, jit_init=jit_init)


__all__ = ["FROZEN_COLLECTIONS", "RNG_STREAMS", "LinenModule", "RouterFixed", "RouterState", "wrap"]
