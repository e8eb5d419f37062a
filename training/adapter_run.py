"""Adapter runs: a frozen base, a small trained tree of adapter parameters beside it.

In an adapter run (``config.adapter.method`` set) ``TrainState.params`` are the adapter's;
the frozen base (``init.from_workdir``, ``init.from_hf`` or random init) is not in the
state, the optimizer or the train checkpoint, and is passed to every step beside the
state. The adapter is also written on its own to ``WORKDIR/adapter/`` (:data:`ADAPTER_DIR`):
``params/`` (Orbax), ``adapter.json`` (method, hyper-parameters, counts, the base's
fingerprint, step) and, for a method with frozen buffers (MoS), ``buffers.npz``.

The training loop sees one interface for both kinds of run, :func:`make_run`: a
:class:`PlainRun` or an :class:`AdapterRun`, each giving the state's shardings, the
extra step arguments, a fresh state and what to write beside a checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from flax import struct

from routezoo.layers import adapters as adapter_lib
from routezoo.training.optim import make_optimizer
from routezoo.training.state import (TrainState, assemble_state, create_state, init_variables, state_shardings,
                                     strip_boxes)

ADAPTER_DIR = "adapter"          # WORKDIR/adapter/: params/ (Orbax) + adapter.json
ADAPTER_JSON = "adapter.json"
ADAPTER_BUFFERS = "buffers.npz"   # a method's frozen non-parameter arrays (MoS index buffers)


@struct.dataclass
class AdapterSetup:
    """What an adapter run needs besides its TrainState (whose ``params`` are the adapter's).

    Attributes:
      adapter: the method.
      base_abstract: abstract frozen base parameters, leaves carrying their shardings.
      base_shardings: the base's NamedSharding tree.
      base_boxed: boxed abstract base parameters (logical names, for counts and sharding).
      adapter_boxed: boxed abstract adapter parameters.
    """
    adapter: Any = struct.field(pytree_node=False)
    base_abstract: Any = struct.field(pytree_node=False)
    base_shardings: Any = struct.field(pytree_node=False)
    base_boxed: Any = struct.field(pytree_node=False)
    adapter_boxed: Any = struct.field(pytree_node=False)


# --------------------------------------------------------------------------- config

def adapter_config(config):
    """``config.adapter`` with ``num_tasks`` 0 resolved to the number of ``data.tasks``."""
    a = config.adapter
    tasks = [t for t in str(config.data.get("tasks", "")).split(",") if t.strip()]
    if "num_tasks" in a and int(a.num_tasks) == 0 and tasks:
        a = ml_collections.ConfigDict(a.to_dict())
        a.num_tasks = len(tasks)
    return a


def resolve_layout(config, log: Callable[[str], None] = print) -> None:
    """An adapter run executes its base unscanned (``model.scan_layers=False``, set here in
    place): adapters address the base's layers one by one (``layer3/attn/q``), its
    parameters, the hooks of activation-space methods and the saved adapter all keep that
    layout. The base may come from a scanned run (``init.from_workdir``); its parameters
    are moved to the per-layer layout when they are loaded."""
    if str(config.adapter.method) and bool(config.model.get("scan_layers", False)):
        config.model.scan_layers = False
        log("adapter run: the base runs unscanned (model.scan_layers=false); adapters address layers one by one")


def optimizer_for(config, adapter=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``config.optimizer``'s transformation, split by the adapter's parameter groups.

    An adapter may name groups of its parameters with learning-rate multipliers
    (``adapter.param_groups(params)`` -> a tree of group names, ``adapter.LR_GROUPS`` ->
    ``{name: multiplier}``): multiplier 0 freezes a group (``optax.set_to_zero``: the
    values stay bit-identical and get no optimizer state), any other scales its updates
    (Poly's router at 100x the adapters').

    Args:
      config: the run's config.
      adapter: the adapter method, or ``None`` for a plain run.

    Returns:
      ``(transformation, learning-rate schedule)``.
    """
    tx, schedule = make_optimizer(config.optimizer, config.train.steps)
    if adapter is None or not adapter.LR_GROUPS:
        return tx, schedule
    txs = {}
    for name, mult in adapter.LR_GROUPS.items():
        if mult == 0:
            txs[name] = optax.set_to_zero()
        else:
            inner = make_optimizer(config.optimizer, config.train.steps)[0]
            txs[name] = inner if mult == 1 else optax.chain(inner, optax.scale(mult))
    return optax.multi_transform(txs, adapter.param_groups), schedule


# --------------------------------------------------------------------------- sources

def adapter_sources(config) -> dict[str, Any]:
    """Trained adapters an adapter run starts from, read from disk (host arrays).

    ``{'previous': (params, meta)}`` from ``init.adapter_from`` (a workdir whose
    ``adapter/`` initialises this one, e.g. Poly's few-shot modes) or ``init.from_peft``
    (a Hugging Face peft LoRA, :mod:`routezoo.zoo.hf.peft`) and ``{'library':
    [(params, meta), ...]}`` from ``adapter.library`` (comma-separated workdirs of trained
    adapters that ScaLearn, PHATGOOSE, GLIDER or a many-adapter batch combine). Their base
    fingerprints are checked against the base by :func:`check_sources`.

    Args:
      config: the run's config.

    Returns:
      The sources found (an empty dict when there are none).
    """
    out: dict[str, Any] = {}
    if config.init.adapter_from:
        out["previous"] = read_adapter_dir(_adapter_dir_of(config.init.adapter_from))
    if config.init.get("from_peft", ""):   # a peft LoRA: checked against init.from_hf by names and shapes
        from routezoo.zoo.hf import peft
        params = peft.read_params(peft.read(config.init.from_peft, config.init.from_hf))
        out["previous"] = (params, {"directory": os.path.abspath(config.init.from_peft), "base_fingerprint": None})
    library = [p.strip() for p in str(config.adapter.library).split(",") if p.strip()]
    if library:
        out["library"] = [read_adapter_dir(_adapter_dir_of(p)) for p in library]
    return out


def _adapter_dir_of(workdir: str) -> str:
    sub = os.path.join(workdir, ADAPTER_DIR)
    return sub if os.path.isdir(sub) else workdir


def _source_params(sources) -> dict[str, Any]:
    if not sources:
        return {}
    out = {}
    if "previous" in sources:
        out["previous"] = sources["previous"][0]
    if "library" in sources:
        out["library"] = [p for p, _ in sources["library"]]
    return out


def _source_configs(sources) -> dict[str, Any]:
    """``library_configs``: each library adapter's ``config.adapter`` (a dict: method,
    rank, alpha, ...), beside its parameters."""
    if not sources or "library" not in sources:
        return {}
    return {"library_configs": [dict(m["adapter"]) for _, m in sources["library"]]}


def check_sources(sources, fingerprint: str) -> None:
    """Every source adapter must belong to this base (one-line ValueError)."""
    for meta in ([sources["previous"][1]] if "previous" in (sources or {}) else []) + \
            [m for _, m in (sources or {}).get("library", [])]:
        if meta["base_fingerprint"] not in (None, fingerprint):   # None: a peft adapter (no fingerprint)
            raise ValueError(f"adapter in {meta['directory']} belongs to base {meta['base_fingerprint']}, "
                             f"not to this base {fingerprint}; refusing to load it")


# --------------------------------------------------------------------------- state

def adapter_state_shardings(model, tx, config, mesh, rules, adapter, sources=None):
    """Like :func:`~routezoo.training.state.state_shardings` for an adapter run.

    Args:
      model: the Flax module (the base).
      tx: the optimizer over the adapter's parameters.
      config: the run's config.
      mesh: the device mesh.
      rules: logical-axis rules.
      adapter: the adapter method.
      sources: :func:`adapter_sources` (trained adapters the method starts from).

    Returns:
      ``(abstract TrainState with shardings, its sharding tree, AdapterSetup)``.
    """
    abstract_vars = jax.eval_shape(init_variables(model, config), jax.random.PRNGKey(0))
    var_shard = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_vars), mesh, rules)
    unboxed = strip_boxes(abstract_vars)
    try:
        adapter_boxed = jax.eval_shape(   # the base an argument: a method may read its (traced) values
            lambda r, src, base: adapter.init(r, base, **src, **_source_configs(sources)),
            jax.random.PRNGKey(0), _source_params(sources), abstract_vars["params"])
    except ValueError as e:   # a method's check against the model's weights (a rank too large, ...)
        from routezoo.training.config_check import ConfigError
        raise ConfigError(" ".join(str(e).split())) from None
    adapter_shard = nn.logical_to_mesh_sharding(nn.get_partition_spec(adapter_boxed), mesh, rules)
    abstract, shardings = assemble_state(tx, mesh, strip_boxes(adapter_boxed), adapter_shard, unboxed, var_shard)
    base_abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 unboxed["params"], var_shard["params"])
    return abstract, shardings, AdapterSetup(adapter, base_abstract, var_shard["params"],
                                             abstract_vars["params"], adapter_boxed)


def load_base(model, config, setup: AdapterSetup, mesh, rules) -> Any:
    """The frozen base of an adapter run, placed with ``setup.base_shardings``.

    Args:
      model: the Flax module.
      config: the run's config: ``init.from_workdir`` (a run's workdir), ``init.from_hf``,
        else random init from ``config.seed``.
      setup: the run's :class:`AdapterSetup`.
      mesh: the device mesh.
      rules: logical-axis rules.

    Returns:
      The base parameters.
    """
    if config.init.from_workdir:
        from routezoo.training.workdir import workdir_params   # it restores through this module
        return workdir_params(config.init.from_workdir, setup.base_abstract, setup.base_shardings, mesh, rules,
                              config.model)
    if config.init.from_hf:
        from routezoo.zoo import hf
        return hf.load_params_for_config(config, None, setup.base_shardings)
    init_vars = init_variables(model, config)

    def init(seed):
        _, init_rng = jax.random.split(jax.random.PRNGKey(seed))
        return nn.unbox(init_vars(init_rng)["params"])
    return jax.jit(init, static_argnums=0, out_shardings=setup.base_shardings)(config.seed)


def create_adapter_state(model, tx, config, shardings, setup: AdapterSetup, sources=None, base=None) -> TrainState:
    """A fresh adapter TrainState: adapter params, optimizer state over them only.

    Args:
      model: the Flax module.
      tx: the optimizer.
      config: the run's config.
      shardings: the sharding tree of :func:`adapter_state_shardings`.
      setup: the run's :class:`AdapterSetup`.
      sources: :func:`adapter_sources`.
      base: the loaded base parameters (:func:`load_base`); needed by a method whose
        initialisation reads the base's values (``adapter.init_reads_base``: DoRA, PiSSA).

    Returns:
      The TrainState at step 0.
    """
    init_vars = init_variables(model, config)
    reads_base = setup.adapter.init_reads_base
    if reads_base and base is None:
        raise ValueError(f"adapter.method={setup.adapter.name!r} initialises from the base weights' values: "
                         "pass base= (the loaded base) to create_adapter_state")

    def init(seed, src, base_values):
        rng, init_rng = jax.random.split(jax.random.PRNGKey(seed))
        variables = nn.unbox(init_vars(init_rng))
        variables.pop("params")
        boxed = setup.base_boxed if base_values is None else _rebox(setup.base_boxed, base_values)
        params = nn.unbox(setup.adapter.init(jax.random.fold_in(init_rng, 0xAD), boxed, **src,
                                             **_source_configs(sources)))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          model_state=dict(variables), rng=rng)
    return jax.jit(init, static_argnums=0, out_shardings=shardings)(
        config.seed, _source_params(sources), base if reads_base else None)


def _rebox(boxed, values):
    """``values`` (unboxed, by the same paths) in ``boxed``'s logical-name boxes."""
    from flax import traverse_util
    flat_values = adapter_lib.flat_params(values)
    out = {path: leaf.replace_boxed(flat_values[path]) if isinstance(leaf, nn.meta.AxisMetadata)
           else flat_values[path] for path, leaf in adapter_lib.flat_params(boxed).items()}
    return traverse_util.unflatten_dict(out, sep="/")


# --------------------------------------------------------------------------- adapter directories

def adapter_metadata(config, setup: AdapterSetup, base) -> dict[str, Any]:
    """Method, hyper-parameters, counts and base fingerprint, as stored with the adapter."""
    adapter = setup.adapter
    own = adapter_lib.num_params(setup.adapter_boxed)
    trainable = own
    if adapter.LR_GROUPS:   # frozen groups (multiplier 0) do not train
        groups = adapter.param_groups(strip_boxes(setup.adapter_boxed))
        trainable = int(sum(np.prod(x.shape) for x, g in zip(jax.tree.leaves(strip_boxes(setup.adapter_boxed)),
                                                              jax.tree.leaves(groups))
                            if adapter.LR_GROUPS[g] != 0))
    base_count = adapter_lib.num_params(setup.base_boxed)
    return {"method": config.adapter.method, "adapter": adapter_config(config).to_dict(),
            "num_targets": len(adapter.select(setup.base_boxed)),
            "params_trainable": trainable, "params_adapter": own, "params_base": base_count,
            "params_total": own + base_count,
            "base_fingerprint": adapter_lib.fingerprint(base)}


def check_adapter_dir(directory: str, fingerprint: str) -> None:
    """Refuses an adapter directory written for another base (one-line ValueError)."""
    path = os.path.join(directory, ADAPTER_JSON)
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)["base_fingerprint"]
    if saved != fingerprint:
        raise ValueError(f"adapter in {directory} belongs to base {saved}, not to this base {fingerprint}; "
                         "refusing to load it (use that base, or another workdir)")


def save_adapter(directory: str, adapter_params, meta: dict[str, Any], step: int,
                 buffers: dict[str, np.ndarray] | None = None) -> None:
    """Writes the adapter's own small Orbax checkpoint.

    Args:
      directory: ``WORKDIR/adapter``; gets ``params/``, ``adapter.json`` (``meta`` and
        ``step``) and, for a method with frozen buffers (MoS's index buffers), ``buffers.npz``.
      adapter_params: the adapter's parameters.
      meta: :func:`adapter_metadata`.
      step: the training step saved.
      buffers: the method's buffers, or ``None``.
    """
    import orbax.checkpoint as ocp
    directory = os.path.abspath(directory)
    with ocp.StandardCheckpointer() as ck:
        ck.save(os.path.join(directory, "params"), adapter_params, force=True)
        ck.wait_until_finished()
    if jax.process_index() == 0 and buffers:
        tmp = os.path.join(directory, "buffers.tmp.npz")
        np.savez(tmp, **{k.replace("/", "|"): v for k, v in buffers.items()})
        os.replace(tmp, os.path.join(directory, ADAPTER_BUFFERS))
    if jax.process_index() == 0:
        tmp = os.path.join(directory, ADAPTER_JSON + ".tmp")
        with open(tmp, "w") as f:
            json.dump({**meta, "step": int(step)}, f, indent=2, sort_keys=True)
        os.replace(tmp, os.path.join(directory, ADAPTER_JSON))


def load_adapter(directory: str, base) -> tuple[Any, Any, dict[str, Any]]:
    """The trained adapter in ``directory``, for ``base``.

    Args:
      directory: an adapter directory (``WORKDIR/adapter``).
      base: the base parameters it must belong to.

    Returns:
      ``(adapter method, adapter params, metadata)``.

    Raises:
      ValueError: the adapter was trained on another base (fingerprint).
    """
    params, meta = read_adapter_dir(directory)
    adapter_lib.adaptable(base)   # a scanned base is refused, naming the layout, before the fingerprint
    check_adapter_dir(directory, adapter_lib.fingerprint(base))
    adapter = with_saved_buffers(adapter_lib.from_config(ml_collections.ConfigDict(meta["adapter"])), directory)
    return adapter, params, meta


def read_buffers(directory: str) -> dict[str, np.ndarray] | None:
    """The buffers saved in an adapter directory, or ``None`` when it has none."""
    path = os.path.join(os.path.abspath(directory), ADAPTER_BUFFERS)
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        return {k.replace("|", "/"): f[k] for k in f.files}


def with_saved_buffers(adapter, directory: str):
    """``adapter`` using the buffers saved in ``directory`` (if any): an adapter keeps the
    index buffers it was trained with."""
    buffers = read_buffers(directory)
    return adapter if buffers is None else adapter.with_buffers(buffers)


def read_adapter_dir(directory: str) -> tuple[Any, dict[str, Any]]:
    """(params as host arrays, metadata with ``directory``) of an adapter directory,
    without checking its base; ``FileNotFoundError`` in one line if it is not one."""
    import orbax.checkpoint as ocp
    directory = os.path.abspath(directory)
    path = os.path.join(directory, ADAPTER_JSON)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: not an adapter directory")
    with open(path) as f:
        meta = json.load(f)
    with ocp.StandardCheckpointer() as ck:
        params = ck.restore(os.path.join(directory, "params"))
    params = jax.tree.map(np.asarray, params)
    return params, {**meta, "directory": directory}


# --------------------------------------------------------------------------- the loop's interface

class PlainRun:
    """A run that trains the model's own parameters.

    Attributes:
      adapter: ``None``.
      abstract, shardings: the TrainState's abstract tree and sharding tree.
      boxed_params: boxed abstract model parameters (for counts).
      extra: extra step arguments after ``(state, batch)``: none.
      extra_shardings: their shardings.
    """

    adapter = None

    def __init__(self, model, tx, config, mesh, rules):
        self.model, self.tx, self.config = model, tx, config
        self.abstract, self.shardings, self.boxed_params = state_shardings(model, tx, config, mesh, rules)
        self.extra, self.extra_shardings = (), ()

    def load(self, workdir: str, info: dict[str, Any], log: Callable[[str], None]) -> None:
        """Reads what the run needs besides its state: nothing for a plain run."""

    def create_state(self) -> TrainState:
        """A fresh TrainState (:func:`~routezoo.training.state.create_state`)."""
        return create_state(self.model, self.tx, self.config, self.shardings)

    def save(self, workdir: str, step: int, state: TrainState) -> None:
        """Writes what goes beside a train checkpoint: nothing for a plain run."""


class AdapterRun(PlainRun):
    """A run that trains an adapter on a frozen base (module docstring)."""

    def __init__(self, model, tx, config, mesh, rules, adapter):
        self.model, self.tx, self.config, self.mesh, self.rules = model, tx, config, mesh, rules
        self.sources = adapter_sources(config)
        self.abstract, self.shardings, self.setup = adapter_state_shardings(
            model, tx, config, mesh, rules, adapter, self.sources)
        self.adapter = adapter
        self.boxed_params = self.setup.base_boxed
        self.extra, self.extra_shardings = (), (self.setup.base_shardings,)
        self.meta, self.buffers = None, None

    def load(self, workdir: str, info: dict[str, Any], log: Callable[[str], None]) -> None:
        """Loads the frozen base (the one extra step argument) and checks that the sources
        and ``workdir``'s adapter directory belong to it; a resumed run keeps the buffers
        it saved first. Adds the trainable counts to ``info`` and logs them.

        Args:
          workdir: the run's directory.
          info: the model description logged at step 0 (updated in place).
          log: prints on the main process.
        """
        base = load_base(self.model, self.config, self.setup, self.mesh, self.rules)
        meta = self.meta = adapter_metadata(self.config, self.setup, base)
        check_sources(self.sources, meta["base_fingerprint"])
        check_adapter_dir(os.path.join(workdir, ADAPTER_DIR), meta["base_fingerprint"])
        self.adapter = with_saved_buffers(self.adapter, os.path.join(workdir, ADAPTER_DIR))
        self.buffers = self.adapter.buffers(self.setup.base_boxed)
        info.update(params_trainable=meta["params_trainable"], params_total_with_adapter=meta["params_total"])
        log(f"adapter {self.adapter.name} on {meta['num_targets']} weights "
            f"({self.config.adapter.targets!r}): {meta['params_trainable']:,} trainable of "
            f"{meta['params_total']:,} parameters "
            f"({100 * meta['params_trainable'] / meta['params_total']:.3f}%); "
            f"base {meta['base_fingerprint']} frozen")
        self.extra = (base,)

    def create_state(self) -> TrainState:
        """A fresh adapter TrainState (:func:`create_adapter_state`)."""
        return create_adapter_state(self.model, self.tx, self.config, self.shardings, self.setup, self.sources,
                                    base=self.extra[0] if self.extra else None)

    def save(self, workdir: str, step: int, state: TrainState) -> None:
        """Writes the adapter directory (:func:`save_adapter`) beside the train checkpoint."""
        save_adapter(os.path.join(workdir, ADAPTER_DIR), state.params, self.meta, step, self.buffers)


def make_run(model, tx, config, mesh, rules, adapter=None) -> PlainRun:
    """The loop's view of a run: :class:`AdapterRun` with an adapter, else :class:`PlainRun`.

    Args:
      model: the Flax module.
      tx: the optimizer (:func:`optimizer_for`).
      config: the run's config.
      mesh: the device mesh.
      rules: logical-axis rules.
      adapter: the adapter method, or ``None``.

    Returns:
      The run, its shardings computed; call ``load`` before the first step.
    """
    return PlainRun(model, tx, config, mesh, rules) if adapter is None else \
        AdapterRun(model, tx, config, mesh, rules, adapter)
