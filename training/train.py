"""The one training loop: a pure, jitted ``train_step`` for every model, router and adapter.

``train_step(state, batch) -> (state, metrics)`` is jitted once with in/out shardings
and a donated state. What differs between models lives in the model and in the loss
terms it returns (``aux['losses']``, added to the cross-entropy and logged by name), never
in a forked loop; the model class's ``objective`` picks what the loss sees
(:func:`objective_batch`: next tokens for decoders, masked tokens for the encoder). Non-parameter collections a model keeps (e.g. a router's balancing
bias) are carried in ``state.model_state`` and applied as mutable.

Mixed precision: parameters and optimizer state in ``model.param_dtype`` (float32),
compute in ``model.dtype``. Gradient accumulation: ``train.grad_accum`` micro-batches
through ``lax.scan``, averaging their gradients.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from routezoo import zoo
from routezoo.layers.adapters import hooks as adapter_hooks
from routezoo.layers import adapters as adapter_lib
from routezoo.layers import sharding as shd
from routezoo.training import checkpoint as ckpt_lib
from routezoo.training import metrics as metrics_lib
from routezoo.training.optim import make_optimizer

RNG_STREAMS = ("dropout", "jitter", "router")


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any      # non-parameter collections, e.g. {'router_state': ...}
    rng: jax.Array        # raw uint32 key


# --------------------------------------------------------------------------- setup

def maybe_initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` when launched as one of several processes.

    Detected from the coordinator variables JAX reads (``JAX_COORDINATOR_ADDRESS`` with
    ``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``), or SLURM / TPU pod environments, where
    ``initialize()`` discovers the cluster itself.
    """
    if jax.distributed.is_initialized():
        return
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env.get("JAX_PROCESS_ID", "0")))
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()


def mesh_and_rules(config) -> tuple[jax.sharding.Mesh, shd.Rules]:
    rules = shd.rules_from_config(json.loads(config.mesh.rules) if config.mesh.rules else None)
    mesh = shd.make_mesh({a: config.mesh[a] for a in shd.MESH_AXES})
    return mesh, rules


def _variables(model: nn.Module, config) -> Callable[[jax.Array], Any]:
    tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
    return lambda rng: model.init({"params": rng, **{s: rng for s in RNG_STREAMS}}, tokens)


def strip_boxes(tree: Any) -> Any:
    """Removes ``nn.LogicallyPartitioned`` boxes without adding sharding constraints."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
                        tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, config, mesh, rules):
    """(abstract TrainState with shardings, its NamedSharding tree, boxed abstract params)."""
    abstract_vars = jax.eval_shape(_variables(model, config), jax.random.PRNGKey(0))
    logical = nn.get_partition_spec(abstract_vars)
    var_shard = nn.logical_to_mesh_sharding(logical, mesh, rules)
    unboxed = strip_boxes(abstract_vars)
    abstract, shardings = _assemble_state(tx, mesh, unboxed["params"], var_shard["params"], unboxed, var_shard)
    return abstract, shardings, abstract_vars["params"]


def _assemble_state(tx, mesh, params, param_shard, unboxed_vars, var_shard):
    """Abstract TrainState (leaves carry shardings) and its sharding tree for ``params``."""
    opt_abstract = jax.eval_shape(tx.init, params)

    replicated = NamedSharding(mesh, P())

    def fit(s, leaf):
        # Optimizer leaves shaped like their parameter take its sharding; others replicate;
        # a frozen adapter group's placeholder (optax MaskedNode) stays as it is.
        if isinstance(leaf, optax.MaskedNode):
            return leaf
        if not isinstance(s, NamedSharding) or len(s.spec) > leaf.ndim:
            return replicated
        for dim, axes in zip(leaf.shape, s.spec):
            axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
            if dim % math.prod(mesh.shape[a] for a in axes):
                return replicated
        return s

    opt_shard = optax.tree_map_params(
        tx, lambda leaf, s: fit(s, leaf), opt_abstract, param_shard,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)))
    model_state = {k: v for k, v in unboxed_vars.items() if k != "params"}
    shardings = TrainState(
        step=replicated, params=param_shard, opt_state=opt_shard,
        model_state={k: var_shard[k] for k in model_state}, rng=replicated)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_abstract,
        model_state=model_state, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return abstract, shardings


# --------------------------------------------------------------------------- adapters

@struct.dataclass
class AdapterSetup:
    """What an adapter run needs besides its TrainState (whose ``params`` are the adapter's).

    ``base_abstract``/``base_shardings``: the frozen base parameters (not in the state,
    not in the optimizer, not in the train checkpoint); ``base_boxed``/``adapter_boxed``:
    boxed abstract trees (logical names, for counts and sharding).
    """
    adapter: Any = struct.field(pytree_node=False)
    base_abstract: Any = struct.field(pytree_node=False)
    base_shardings: Any = struct.field(pytree_node=False)
    base_boxed: Any = struct.field(pytree_node=False)
    adapter_boxed: Any = struct.field(pytree_node=False)


def adapter_state_shardings(model, tx, config, mesh, rules, adapter, sources=None):
    """Like :func:`state_shardings` for an adapter run: (abstract, shardings, AdapterSetup).
    ``sources``: :func:`adapter_sources` (trained adapters the method starts from)."""
    abstract_vars = jax.eval_shape(_variables(model, config), jax.random.PRNGKey(0))
    var_shard = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_vars), mesh, rules)
    unboxed = strip_boxes(abstract_vars)
    adapter_boxed = jax.eval_shape(
        lambda r, src: adapter.init(r, abstract_vars["params"], **src, **_source_configs(sources)),
        jax.random.PRNGKey(0), _source_params(sources))
    adapter_shard = nn.logical_to_mesh_sharding(nn.get_partition_spec(adapter_boxed), mesh, rules)
    abstract, shardings = _assemble_state(tx, mesh, strip_boxes(adapter_boxed), adapter_shard, unboxed, var_shard)
    base_abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 unboxed["params"], var_shard["params"])
    return abstract, shardings, AdapterSetup(adapter, base_abstract, var_shard["params"],
                                             abstract_vars["params"], adapter_boxed)


def _restore_state(workdir: str, config, model: nn.Module, mesh, rules, step: int | None = None) -> TrainState:
    """The TrainState of a run's newest (or given) checkpoint, placed on ``mesh``; for an
    adapter run ``params`` are its base with the adapter merged in. Call it inside the
    mesh and rules context."""
    import orbax.checkpoint as ocp
    workdir = os.path.abspath(workdir)
    adapter = adapter_lib.from_config(adapter_config(config))
    if adapter_hooks.is_activation_adapter(adapter) and not adapter.mergeable:
        raise ValueError(f"{workdir}: adapter.method={adapter.name!r} acts on activations and cannot be merged "
                         "into the weights; use train.load_adapter(WORKDIR/adapter, base) and "
                         "adapter_hooks.bind (routezoo.layers.adapters.hooks) around model.apply")
    tx, _ = optimizer_for(config, adapter)
    if adapter is None:
        abstract, _, _ = state_shardings(model, tx, config, mesh, rules)
    else:
        abstract, _, setup = adapter_state_shardings(model, tx, config, mesh, rules, adapter,
                                                     adapter_sources(config))
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data"))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    manager.close()
    if adapter is not None:   # an adapter run: its base with the adapter merged in
        base = load_base(model, config, setup, mesh, rules)
        state = state.replace(params=jax.jit(adapter.merge, out_shardings=setup.base_shardings)(
            base, state.params))
    return state


def restore_params(workdir: str, mesh, rules, step: int | None = None) -> tuple[Any, Any]:
    """(config, params) of another run's newest (or given) checkpoint, placed on ``mesh``.

    For an adapter run the params returned are its base with the adapter merged in.
    """
    config = read_workdir_config(workdir)
    return config, _restore_state(workdir, config, zoo.build(config.model), mesh, rules, step).params


def _workdir_params(source: str, want_abstract, param_shardings, mesh, rules) -> Any:
    """``init.from``: another run's trained parameters, checked against the shapes and
    dtypes of ``want_abstract`` and placed with ``param_shardings``."""
    _, params = restore_params(source, mesh, rules)
    want = jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype).name), want_abstract)
    got = jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype).name), params)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        raise ValueError(f"init.from {source!r}: its parameters differ from config.model's "
                         "(another architecture); set config.model as that run's")
    return jax.device_put(params, param_shardings)


def load_base(model, config, setup: AdapterSetup, mesh, rules) -> Any:
    """The frozen base of an adapter run: ``init.from`` (a workdir), ``init.from_hf``, or
    random init from ``config.seed``; placed with ``setup.base_shardings``."""
    if config.init.from_workdir:
        return _workdir_params(config.init.from_workdir, setup.base_abstract, setup.base_shardings, mesh, rules)
    if config.init.from_hf:
        from routezoo.zoo import hf
        return hf.load_params_for_config(config, None, setup.base_shardings)
    init_vars = _variables(model, config)

    def init(seed):
        _, init_rng = jax.random.split(jax.random.PRNGKey(seed))
        return nn.unbox(init_vars(init_rng)["params"])
    return jax.jit(init, static_argnums=0, out_shardings=setup.base_shardings)(config.seed)


def create_adapter_state(model, tx, config, shardings, setup: AdapterSetup, sources=None) -> TrainState:
    """Fresh adapter TrainState: adapter params, optimizer state over them only."""
    init_vars = _variables(model, config)

    def init(seed, src):
        rng, init_rng = jax.random.split(jax.random.PRNGKey(seed))
        variables = nn.unbox(init_vars(init_rng))
        variables.pop("params")
        params = nn.unbox(setup.adapter.init(jax.random.fold_in(init_rng, 0xAD), setup.base_boxed, **src,
                                             **_source_configs(sources)))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          model_state=dict(variables), rng=rng)
    return jax.jit(init, static_argnums=0, out_shardings=shardings)(config.seed, _source_params(sources))


def adapter_config(config):
    """``config.adapter`` with ``num_tasks`` 0 resolved to the number of ``data.tasks``."""
    a = config.adapter
    tasks = [t for t in str(config.data.get("tasks", "")).split(",") if t.strip()]
    if "num_tasks" in a and int(a.num_tasks) == 0 and tasks:
        a = ml_collections.ConfigDict(a.to_dict())
        a.num_tasks = len(tasks)
    return a


def adapter_sources(config) -> dict[str, Any]:
    """Trained adapters an adapter run starts from, read from disk (host arrays):
    ``{'previous': (params, meta)}`` from ``init.adapter_from`` (a workdir whose
    ``adapter/`` initialises this one, e.g. Poly's few-shot modes) and ``{'library':
    [(params, meta), ...]}`` from ``adapter.library`` (comma-separated workdirs of trained
    adapters that ScaLearn, PHATGOOSE, GLIDER or a many-adapter batch combine). Their base
    fingerprints are checked against the base by :func:`check_sources`."""
    out: dict[str, Any] = {}
    if config.init.adapter_from:
        out["previous"] = read_adapter_dir(_adapter_dir_of(config.init.adapter_from))
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
        if meta["base_fingerprint"] != fingerprint:
            raise ValueError(f"adapter in {meta['directory']} belongs to base {meta['base_fingerprint']}, "
                             f"not to this base {fingerprint}; refusing to load it")


def create_state(model, tx, config, shardings) -> TrainState:
    init_vars = _variables(model, config)

    # Pretrained weights (config.init.from_hf), read shard by shard onto the mesh, or
    # another run's trained parameters (config.init.from_workdir; optimizer starts fresh).
    loaded = None
    if config.init.from_hf:
        from routezoo.zoo import hf
        loaded = hf.load_params_for_config(config, None, shardings)
    elif config.init.from_workdir:
        want = jax.eval_shape(lambda r: nn.unbox(init_vars(r))["params"], jax.random.PRNGKey(0))
        loaded = _workdir_params(config.init.from_workdir, want, shardings.params, *mesh_and_rules(config))

    def init(seed, loaded):
        rng, init_rng = jax.random.split(jax.random.PRNGKey(seed))
        variables = nn.unbox(init_vars(init_rng))
        fresh = variables.pop("params")
        params = fresh if loaded is None else loaded
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          model_state=dict(variables), rng=rng)
    return jax.jit(init, static_argnums=0, out_shardings=shardings)(config.seed, loaded)


def optimizer_for(config, adapter=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``config.optimizer``'s transformation, split by the adapter's parameter groups.

    An adapter may name groups of its parameters with learning-rate multipliers
    (``adapter.param_groups(params)`` -> a tree of group names, ``adapter.LR_GROUPS`` ->
    ``{name: multiplier}``): multiplier 0 freezes a group (``optax.set_to_zero``: the
    values stay bit-identical and get no optimizer state), any other scales its updates
    (Poly's router at 100x the adapters').
    """
    tx, schedule = make_optimizer(config.optimizer, config.train.steps)
    if adapter is None:
        return tx, schedule
    groups = getattr(adapter, "LR_GROUPS", None)
    if groups:
        txs = {}
        for name, mult in groups.items():
            if mult == 0:
                txs[name] = optax.set_to_zero()
            else:
                inner = make_optimizer(config.optimizer, config.train.steps)[0]
                txs[name] = inner if mult == 1 else optax.chain(inner, optax.scale(mult))
        tx = optax.multi_transform(txs, adapter.param_groups)
    return tx, schedule


# --------------------------------------------------------------------------- steps

def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """Per-token negative log-likelihood (float32) and correctness."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return nll * weights, correct * weights


def mtp_loss(mtp_logits, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean over depths of the multi-token-prediction cross-entropy (DeepSeek-V3, section
    2.2): depth ``k``'s logits at position ``i`` predict ``targets[i + k]`` (the token
    ``k + 1`` ahead of the input); the last ``k`` positions have no target and drop out."""
    per_depth = []
    for k, logits in enumerate(mtp_logits, 1):
        w = weights[:, k:]
        nll, _ = cross_entropy(logits[:, :-k], targets[:, k:], w)
        per_depth.append(nll.sum() / jnp.maximum(w.sum(), 1.0))
    return sum(per_depth) / len(per_depth)


EVAL_MASK_SEED = 0   # masked_lm evaluation masks with this fixed key: a deterministic eval loss


def objective_batch(model: nn.Module, batch: dict[str, jax.Array], rng: jax.Array):
    """``(inputs, targets, weights)`` that ``model`` trains on, by its class's ``objective``:
    ``'causal_lm'`` (DecoderLM, and the default): the batch's next-token ``inputs``,
    ``targets``, ``weights`` unchanged; ``'masked_lm'`` (EncoderMLM):
    :func:`routezoo.zoo.encoder.masked_lm_batch` with ``model.mask_rate`` and the mask id
    ``model.vocab_size - 1``, drawn from ``rng``; ``'seq2seq'`` (EncoderDecoderLM):
    :func:`routezoo.zoo.encoder_decoder.seq2seq_batch` (``model.seq2seq_split``) or, with
    ``model.seq2seq_objective='span_corruption'``,
    :func:`routezoo.zoo.encoder_decoder.span_corruption_batch` (drawn from ``rng``); its
    ``inputs`` is a dict the model takes as its first argument."""
    objective = getattr(model, "objective", "causal_lm")
    if objective == "causal_lm":
        return batch["inputs"], batch["targets"], batch["weights"]
    if objective == "masked_lm":
        from routezoo.zoo.encoder import masked_lm_batch
        return masked_lm_batch(batch, rng, mask_rate=float(model.cfg.mask_rate),
                               mask_id=int(model.cfg.vocab_size) - 1)
    if objective == "seq2seq":   # EncoderDecoderLM: inputs is a dict of encoder/decoder tokens and masks
        from routezoo.zoo.encoder_decoder import seq2seq_batch, span_corruption_batch
        c = model.cfg
        if str(c.get("seq2seq_objective", "prefix_lm")) == "span_corruption":
            from routezoo.training.data import EOS_ID
            return span_corruption_batch(batch, rng, vocab_size=int(c.vocab_size),
                                         noise_density=float(c.span_noise_density),
                                         mean_span=float(c.span_mean_length),
                                         eos_id=EOS_ID if bool(c.get("span_append_eos", True)) else None)
        return seq2seq_batch(batch, split=float(c.seq2seq_split))
    raise ValueError(f"unknown objective {objective!r} of {type(model).__name__}; "
                     "known: causal_lm, masked_lm, seq2seq")


def forward_params(adapter, base, params):
    """The weights a step's forward pass runs on: the state's own params (no adapter), the
    base with a parameter-space adapter merged in, or the base itself for an adapter that
    acts on activations (through :func:`adapter_hooks.bind` around the forward)."""
    if adapter is None:
        return params
    return base if adapter_hooks.is_activation_adapter(adapter) else adapter.merge(base, params)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, config,
                    schedule: optax.Schedule, adapter: Any = None) -> Callable:
    """``train_step(state, batch)``; with an ``adapter``, ``train_step(state, batch, base)``
    where ``state.params`` are the adapter's and ``base`` the frozen base parameters: the
    model runs on ``adapter.merge(base, params)`` and only ``params`` are differentiated."""
    accum = int(config.train.grad_accum)

    def loss_fn(params, model_state, batch, rng, base):
        rngs = {s: jax.random.fold_in(rng, i) for i, s in enumerate(RNG_STREAMS)}
        mutable = list(model_state)
        full = forward_params(adapter, base, params)
        inputs, targets, w = objective_batch(model, batch, jax.random.fold_in(rng, len(RNG_STREAMS)))
        with adapter_hooks.bind(adapter, base, params, task_ids=batch.get("task_id"),
                                rng=jax.random.fold_in(rng, len(RNG_STREAMS) + 1), deterministic=False):
            out = model.apply({"params": full, **model_state}, inputs, deterministic=False,
                              rngs=rngs, mutable=mutable if mutable else False)
        (logits, aux), new_model_state = out if mutable else (out, {})
        nll, correct = cross_entropy(logits, targets, w)
        denom = jnp.maximum(w.sum(), 1.0)
        ce = nll.sum() / denom
        losses, extra = dict(aux.get("losses", {})), {}
        if aux.get("mtp_logits"):   # DeepSeek-V3 multi-token prediction
            extra["mtp_ce"] = mtp_loss(aux["mtp_logits"], targets, w)
            losses["mtp"] = float(config.model.mtp_weight) * extra["mtp_ce"]
        total = ce + sum(losses.values()) if losses else ce
        metrics = {"ce": ce, "accuracy": correct.sum() / denom, **losses, **extra,
                   **{f"moe/{k}": v for k, v in aux.get("stats", {}).items()}}
        return total, (metrics, dict(new_model_state))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict[str, jax.Array], base):
        rng = jax.random.fold_in(state.rng, state.step)
        if accum == 1:
            (loss, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch, rng, base)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

            def body(carry, mb_i):
                g_acc, l_acc, m_acc, ms = carry
                mb, i = mb_i
                (l, (m, ms)), g = grad_fn(state.params, ms, mb, jax.random.fold_in(rng, i), base)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + l,
                        jax.tree.map(jnp.add, m_acc, m), ms), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            m0 = jax.eval_shape(lambda: grad_fn(state.params, state.model_state,
                                                jax.tree.map(lambda x: x[0], micro), rng, base)[0][1][0])
            m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
            (grads, loss, metrics, model_state), _ = jax.lax.scan(
                body, (zeros, 0.0, m0, state.model_state), (micro, jnp.arange(accum)))
            grads = jax.tree.map(lambda g: g / accum, grads)
            loss, metrics = loss / accum, jax.tree.map(lambda m: m / accum, metrics)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state.step)}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  model_state=model_state)
        return new_state, metrics

    if adapter is not None:
        return step

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        return step(state, batch, None)
    return train_step


def make_eval_step(model: nn.Module, token_bytes: np.ndarray, adapter: Any = None) -> Callable:
    table = jnp.asarray(token_bytes, jnp.float32)

    def step(state: TrainState, batch, base):
        params = forward_params(adapter, base, state.params)
        inputs, targets, w = objective_batch(model, batch, jax.random.PRNGKey(EVAL_MASK_SEED))
        with adapter_hooks.bind(adapter, base, state.params, task_ids=batch.get("task_id")):
            logits, _ = model.apply({"params": params, **state.model_state}, inputs, deterministic=True)
        nll, correct = cross_entropy(logits, targets, w)
        return {"nll": nll.sum(), "correct": correct.sum(), "tokens": w.sum(),
                "bytes": (table[targets] * w).sum()}

    if adapter is not None:
        return step

    def eval_step(state: TrainState, batch):
        return step(state, batch, None)
    return eval_step


def evaluate(eval_step, state, config, mesh, batch_sharding, extra=(), task: str | None = None) -> dict[str, float]:
    from routezoo.training import data as data_lib
    sums = {"nll": 0.0, "correct": 0.0, "tokens": 0.0, "bytes": 0.0}
    for local in data_lib.eval_batches(config, task=task):
        out = jax.device_get(eval_step(state, to_global(local, batch_sharding), *extra))
        for k in sums:
            sums[k] += float(out[k])
    tokens = max(sums["tokens"], 1.0)
    return {"eval_loss": sums["nll"] / tokens, "eval_accuracy": sums["correct"] / tokens,
            "eval_bits_per_byte": sums["nll"] / math.log(2) / max(sums["bytes"], 1.0)}


def eval_variants(config) -> dict[str, nn.Module]:
    """``{suffix: model}``: the extra evaluations the router asks for
    (:meth:`~routezoo.layers.routers.base.Router.eval_variants`, e.g. SMoE-Dropout at several
    ``k``), each the same variables under a changed ``model.moe``; logged as
    ``eval_loss@suffix``. Empty for dense models and most routers."""
    from routezoo.layers.routers import ROUTERS
    m = config.model
    if "moe" not in m or "moe" not in zoo.ffn_kinds(m) or m.moe.router not in ROUTERS:
        return {}
    out = {}
    for suffix, overrides in ROUTERS[m.moe.router].eval_variants(m.moe).items():
        variant = ml_collections.ConfigDict(m.to_dict())
        variant.moe.update(overrides)
        out[suffix] = zoo.build(variant)
    return out


def evaluate_all(eval_steps: dict[str, Callable], state, config, mesh, batch_sharding, extra=()) -> dict[str, float]:
    """:func:`evaluate` for each of ``{suffix: eval_step}``; suffix ``''`` is the plain
    evaluation, others are reported as ``eval_loss@suffix`` and so on. With
    ``train.eval_per_task`` (and ``data.tasks``) the plain evaluation is also run on each
    task's own validation rows: ``eval_loss@task=NAME``, ``eval_bits_per_byte@task=NAME``."""
    from routezoo.training import data as data_lib
    out = {}
    for suffix, eval_step in eval_steps.items():
        res = evaluate(eval_step, state, config, mesh, batch_sharding, extra)
        out.update(res if not suffix else {f"{k}@{suffix}": v for k, v in res.items()})
    if config.train.get("eval_per_task", False) and data_lib.task_names(config.data):
        for name in data_lib.eval_task_names(config.data):
            res = evaluate(eval_steps[""], state, config, mesh, batch_sharding, extra, task=name)
            out.update({f"{k}@task={name}": v for k in ("eval_loss", "eval_bits_per_byte") for v in [res[k]]})
    return out


def to_global(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Per-process batch -> global arrays sharded over the batch axes of the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


# --------------------------------------------------------------------------- loop

class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves a checkpoint and returns at the next step."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a notebook worker)
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def any_process(self) -> bool:
        flag = self.signum is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
        return flag


def describe_model(params_boxed, config) -> dict[str, float]:
    total, active = zoo.count_params(params_boxed, config.model, config.data.seq_len)
    flops = zoo.flops_per_token(config.model, config.data.seq_len, active, params_boxed)
    return {"params_total": total, "params_active": active,
            "flops_per_token_forward": flops["forward"], "flops_per_token_train": flops["train"]}


def train_and_evaluate(config, workdir: str, *, stop_after: int | None = None) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming from its checkpoints) and returns the
    last train and eval metrics. The config must already be validated.

    ``stop_after``: leave after this many steps of this call (saving a checkpoint), as a
    preempted job does; running again resumes. The schedule still spans ``train.steps``.
    """
    from routezoo.training import data as data_lib   # the data stack only where data is read
    maybe_initialize_distributed()
    is_main = jax.process_index() == 0
    workdir = os.path.abspath(workdir)
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))

    mesh, rules = mesh_and_rules(config)
    data_lib.ensure_dataset(config.data)
    tokenizer = data_lib.get_tokenizer(config.data)
    model = zoo.build(config.model)
    adapter = adapter_lib.from_config(adapter_config(config))
    sources = adapter_sources(config) if adapter is not None else {}
    tx, schedule = optimizer_for(config, adapter)
    # Leading (batch) axis sharded, the rest replicated: fits inputs [B, L] and task_id [B].
    batch_sharding = NamedSharding(mesh, shd.batch_spec(1))
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
    progress_log = print if is_main else (lambda *_: None)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        if adapter is None:
            abstract, shardings, boxed_params = state_shardings(model, tx, config, mesh, rules)
        else:
            abstract, shardings, setup = adapter_state_shardings(model, tx, config, mesh, rules, adapter, sources)
            boxed_params = setup.base_boxed
        info = describe_model(boxed_params, config)
        progress_log(
            f"model {config.model.name}: {info['params_total'] / 1e6:.2f}M parameters, "
            f"{info['params_active'] / 1e6:.2f}M active per token, "
            f"{info['flops_per_token_train'] / 1e6:.1f} MFLOP/token (train); "
            f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} devices, "
            f"{jax.process_count()} process(es)")

        extra, adapter_meta = (), None
        if adapter is not None:   # the frozen base, passed to every step beside the state
            base = load_base(model, config, setup, mesh, rules)
            adapter_meta = adapter_metadata(config, setup, base)
            check_sources(sources, adapter_meta["base_fingerprint"])
            check_adapter_dir(os.path.join(workdir, ADAPTER_DIR), adapter_meta["base_fingerprint"])
            # A resumed run keeps the buffers it saved first; a new one saves its own.
            adapter = with_saved_buffers(adapter, os.path.join(workdir, ADAPTER_DIR))
            adapter_buffers = adapter.buffers(setup.base_boxed) if hasattr(adapter, "buffers") else None
            info.update(params_trainable=adapter_meta["params_trainable"],
                        params_total_with_adapter=adapter_meta["params_total"])
            progress_log(f"adapter {adapter.name} on {adapter_meta['num_targets']} weights "
                         f"({config.adapter.targets!r}): {adapter_meta['params_trainable']:,} trainable of "
                         f"{adapter_meta['params_total']:,} parameters "
                         f"({100 * adapter_meta['params_trainable'] / adapter_meta['params_total']:.3f}%); "
                         f"base {adapter_meta['base_fingerprint']} frozen")
            extra = (base,)

        train_iter = data_lib.make_train_iterator(config)
        checkpointer = ckpt_lib.Checkpointer(
            os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
            async_save=config.checkpoint.async_save, verify=config.checkpoint.verify, log=progress_log)
        restored = checkpointer.restore_latest(abstract, data_lib.iterator_restore_args(train_iter))
        if restored is None:
            state = (create_state(model, tx, config, shardings) if adapter is None
                     else create_adapter_state(model, tx, config, shardings, setup, sources))
            start = 0
        else:
            start, state, _ = restored
            progress_log(f"resumed from step {start} ({checkpointer.step_dir(start)})")

        base_shard = () if adapter is None else (setup.base_shardings,)
        train_step = jax.jit(make_train_step(model, tx, config, schedule, adapter),
                             in_shardings=(shardings, batch_sharding, *base_shard),
                             out_shardings=(shardings, None), donate_argnums=0)
        eval_steps = {suffix: jax.jit(make_eval_step(m, tokenizer.token_bytes, adapter),
                                      in_shardings=(shardings, batch_sharding, *base_shard))
                      for suffix, m in {"": model, **eval_variants(config)}.items()}
        if start == 0:   # model size and the untrained model's eval, as step 0
            first = evaluate_all(eval_steps, state, config, mesh, batch_sharding, extra)
            writer.write(0, {**info, **first})
            progress_log(f"step 0: eval loss {first['eval_loss']:.4f}, "
                         f"eval bits/byte {first['eval_bits_per_byte']:.4f}")

        steps, last_metrics, last_eval = config.train.steps, {}, {}
        tokens_per_step = config.train.batch_size * config.data.seq_len
        progress = metrics_lib.Progress(steps, min(start, steps), enabled=is_main and config.train.progress)
        t_last, step_last = time.time(), start
        step = start
        with _StopFlag() as stop:
            while step < steps:
                batch = to_global(next(train_iter), batch_sharding)
                state, metrics = train_step(state, batch, *extra)
                step += 1
                log_now = step % config.train.log_every == 0 or step == steps
                eval_now = step % config.train.eval_every == 0 or step == steps
                if log_now or eval_now:
                    last_metrics = jax.device_get(metrics)
                    now = time.time()
                    tps = tokens_per_step * (step - step_last) / max(now - t_last, 1e-9)
                    t_last, step_last = now, step
                    record = {**last_metrics, "tokens_per_second": tps}
                    if eval_now:
                        last_eval = evaluate_all(eval_steps, state, config, mesh, batch_sharding, extra)
                        record.update(last_eval)
                        progress.write(f"step {step}: loss {float(last_metrics['loss']):.4f}, "
                                       f"eval loss {last_eval['eval_loss']:.4f}, "
                                       f"eval bits/byte {last_eval['eval_bits_per_byte']:.4f}")
                    writer.write(step, record)
                    progress.update_to(step, loss=f"{float(last_metrics['loss']):.3f}", tok_s=f"{tps:,.0f}")
                stopping = stop.any_process() or (stop_after is not None and step - start >= stop_after)
                if stopping or step % config.checkpoint.every == 0 or step == steps:
                    checkpointer.save(step, state, data_lib.iterator_save_args(train_iter), force=True)
                    if adapter is not None:
                        save_adapter(os.path.join(workdir, ADAPTER_DIR), state.params, adapter_meta, step,
                                     adapter_buffers)
                if stopping:
                    progress.write(f"stopped at step {step}; checkpoint saved; run again to resume")
                    break
        progress.close()
        checkpointer.close()
        writer.close()
    if is_main:
        metrics_lib.plot_metrics(workdir)
    return {"step": step, **{k: float(np.mean(v)) for k, v in last_metrics.items()}, **last_eval}


# --------------------------------------------------------------------------- adapter checkpoints

ADAPTER_DIR = "adapter"          # WORKDIR/adapter/: params/ (Orbax) + adapter.json
ADAPTER_JSON = "adapter.json"


def adapter_metadata(config, setup: AdapterSetup, base) -> dict[str, Any]:
    """Method, hyper-parameters, counts and base fingerprint, as stored with the adapter."""
    adapter = setup.adapter
    own = adapter_lib.num_params(setup.adapter_boxed)
    trainable = own
    if getattr(adapter, "LR_GROUPS", None):   # frozen groups (multiplier 0) do not train
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


ADAPTER_BUFFERS = "buffers.npz"   # a method's frozen non-parameter arrays (MoS index buffers)


def save_adapter(directory: str, adapter_params, meta: dict[str, Any], step: int,
                 buffers: dict[str, np.ndarray] | None = None) -> None:
    """Writes the adapter's own small Orbax checkpoint: ``directory/params``,
    ``directory/adapter.json`` (method, hyper-parameters, counts, base fingerprint, step)
    and, for a method with frozen buffers (MoS's index buffers), ``buffers.npz``."""
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
    """(adapter method, adapter params, metadata) from ``directory`` for ``base``.

    Raises ``ValueError`` when the adapter was trained on another base (fingerprint).
    """
    import ml_collections
    params, meta = read_adapter_dir(directory)
    check_adapter_dir(directory, adapter_lib.fingerprint(base))
    adapter = with_saved_buffers(adapter_lib.from_config(ml_collections.ConfigDict(meta["adapter"])), directory)
    return adapter, params, meta


def read_buffers(directory: str) -> dict[str, np.ndarray] | None:
    path = os.path.join(os.path.abspath(directory), ADAPTER_BUFFERS)
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        return {k.replace("|", "/"): f[k] for k in f.files}


def with_saved_buffers(adapter, directory: str):
    """``adapter`` using the buffers saved in ``directory`` (if any, and if the method
    has buffers): an adapter keeps the index buffers it was trained with."""
    buffers = read_buffers(directory)
    if buffers is None or not hasattr(adapter, "with_buffers"):
        return adapter
    return adapter.with_buffers(buffers)


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


def read_workdir_config(workdir: str):
    """The resolved config a run wrote to ``workdir/config.json`` (on top of the defaults)."""
    from routezoo.configs import base
    path = os.path.join(os.path.abspath(workdir), "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: not a routezoo training workdir")
    config = base.get_config()
    config.update_from_flattened_dict(_flatten(json.load(open(path))))
    return config


def load_trained(workdir: str, step: int | None = None, mesh_shape: dict[str, int] | None = None):
    """(config, model, state) from a run's ``config.json`` and its newest (or given) checkpoint.

    The state is restored onto ``mesh_shape`` (default: all devices on ``data``). For an
    adapter run ``state.params`` are the base with the adapter merged in (inference-ready;
    ``state.opt_state`` is the adapter's).
    """
    config = read_workdir_config(workdir)
    for axis in shd.MESH_AXES:
        config.mesh[axis] = (mesh_shape or {"data": -1}).get(axis, 1)
    mesh, rules = mesh_and_rules(config)
    model = zoo.build(config.model)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = _restore_state(workdir, config, model, mesh, rules, step)
    return config, model, state


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
