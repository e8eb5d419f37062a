"""``routezoo transform``: operations on a trained model that write a new workdir.

    routezoo transform NAME --from WORKDIR_OR_HF_DIR --workdir OUT [--config.transform.KEY=VALUE ...]
                            [--config.KEY=VALUE ...]

``--from`` is a training workdir (its newest intact checkpoint; an adapter run is read with
its adapter merged into the weights) or a Hugging Face checkpoint directory (read through
the Hugging Face import, :mod:`routezoo.zoo.hf`). The source is only read. ``OUT`` must be
new or an empty directory; it gets, assembled in a temporary sibling and renamed into place
(:func:`routezoo.training.workdir.write_step0_workdir`):

- ``config.json``: the transformed model's config;
- ``checkpoints/0/``: a train state at step 0 (the transformed parameters and model state,
  a fresh optimizer state; a workdir source's data-iterator position when the data config
  is unchanged, else a fresh iterator);
- ``transform.json``: the transform, its options, the source (path, kind, step) and the
  transform's report.

``routezoo train --workdir OUT`` (no ``--config``: ``OUT/config.json`` is used, with any
``--config.KEY=VALUE`` overrides on top) fine-tunes it from step 0; ``routezoo analyze``,
``routezoo convert --to-hf``, :func:`~routezoo.training.workdir.load_trained` (and the
sampler through it) read it as any run.

``--config.transform.KEY=VALUE`` sets an option of the transform (each transform declares
its options with their defaults; the value is parsed to the default's type). Any other
``--config.KEY=VALUE`` changes the source's config before the transform runs (the data the
calibration batches come from, ``train.batch_size``, the fine-tuning optimizer, ...) and is
kept in ``OUT/config.json``.

Refused in one line, exit 2, with nothing written (:class:`TransformError`): an unknown
transform or option, an option value of the wrong type, an ``OUT`` that exists and is not
empty (or lies inside the source), a source that is missing, unreadable or without an intact
checkpoint, and a source the transform cannot handle (a dense model given to an operation on
experts, say).

Writing a transform (in its own module of this package; every module here is imported
when the package is, so registering is all it takes)::

    from routezoo.training.transform import TransformError, TransformResult, register

    @register("my_op", options={"ratio": 0.5, "seed": 0}, needs_moe=True,
              summary="one line for --help")
    def my_op(source, opts, ctx):
        # source: Source (config, params, model_state, path, kind, step, rng), unscanned layout
        # opts: {'ratio': float, 'seed': int} (defaults overridden by --config.transform.*)
        # ctx: Context (calibration batches, routing statistics, evaluate, fine-tune)
        config = source.copy_config()
        ...
        return TransformResult(config, params, model_state, report={"...": ...})

The API:

- :func:`register` ``(name, *, options, needs_moe, summary)``: adds ``fn(source, opts, ctx)
  -> TransformResult`` to :data:`TRANSFORMS`. ``options`` maps each option to its default
  (``bool``, ``int``, ``float`` or ``str``; the type of the default is the option's type).
  ``needs_moe``: the framework refuses a source without MoE layers in one line.
- :class:`Source`: ``config`` (the resolved config, a ``ConfigDict``), ``params`` and
  ``model_state`` (host numpy trees, **unscanned layout**: ``layer0``, ``layer1``, ...),
  ``path``, ``kind`` (``'workdir'`` or ``'hf'``), ``step``, ``rng``; ``copy_config()``,
  ``moe_layers`` (indices of the MoE layers).
- :class:`TransformResult`: ``config``, ``params``, ``model_state`` (unscanned layout; the
  framework moves them into the layout ``config.model.scan_layers`` asks for), ``report``
  (a JSON-able dict, stored in ``transform.json`` and printed in short).
- :class:`Context`: ``ctx.batches(n)`` (``n`` host batches ``{'inputs': [B, L], ...}`` of
  the training split of the source's data config, in order from its start),
  ``ctx.eval_batches()``, ``ctx.routing_stats(config, params, model_state, n)`` (per MoE
  layer the load per router output and the top-1 inter-layer affinity, from
  :mod:`routezoo.training.analyze`), ``ctx.evaluate(config, params, model_state)`` (the
  training loop's evaluation: ``eval_loss``, ``eval_bits_per_byte``, ...),
  ``ctx.finetune(config, params, model_state, steps, update_mask=None)`` (the training
  loop's ``train_step`` on the training split, optionally with updates multiplied by a
  mask tree so only chosen parameters move), ``ctx.apply(config, params, model_state,
  inputs)`` (logits and aux), ``ctx.log``, ``ctx.seed``.
- :class:`TransformError`: raise it with one line for anything the transform refuses.

From Python: :func:`run_transform` ``(name, source_path, out, options=None, overrides=None)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pkgutil
import sys
from typing import Any, Callable

TRANSFORM_JSON = "transform.json"

USAGE = """usage: routezoo transform NAME --from WORKDIR_OR_HF_DIR --workdir OUT [--config.transform.KEY=VALUE ...]
                          [--config.KEY=VALUE ...]

  NAME: the operation; one of:
{names}
  --from: a training workdir (its newest intact checkpoint) or a Hugging Face checkpoint directory;
      only read.
  --workdir OUT: the new workdir (must not exist, or be empty): config.json, checkpoints/0 holding the
      transformed model at step 0, transform.json (options, source, report). Fine-tune it with
      'routezoo train --workdir OUT'; read it with analyze, convert --to-hf, the sampler.
  --config.transform.KEY=VALUE: an option of the transform (defaults above).
  --config.KEY=VALUE: any other config key, set on the source's config before the transform
      (calibration data, batch size, fine-tuning settings).
"""


class TransformError(ValueError):
    """A transform that cannot be done; the message is one line for the user."""


def _line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:500]


@dataclasses.dataclass(frozen=True)
class Transform:
    """A registered transform (see :func:`register`)."""

    name: str
    fn: Callable[..., "TransformResult"]
    options: dict[str, Any]
    needs_moe: bool = False
    summary: str = ""


TRANSFORMS: dict[str, Transform] = {}


def register(name: str, *, options: dict[str, Any] | None = None, needs_moe: bool = False, summary: str = ""):
    """Decorator: makes ``fn(source, opts, ctx) -> TransformResult`` the transform ``name``.

    Args:
      name: the command's value (``routezoo transform NAME``); a taken name is an error.
      options: option name -> default (its type is the option's type: bool, int, float, str).
      needs_moe: refuse sources without MoE layers (one line, before the transform runs).
      summary: one line for the usage text.
    """
    options = dict(options or {})
    for key, default in options.items():
        if not isinstance(default, (bool, int, float, str)):
            raise TypeError(f"transform {name!r}: option {key!r} has default {default!r}; "
                            "defaults are bool, int, float or str")

    def add(fn):
        if name in TRANSFORMS and TRANSFORMS[name].fn is not fn:
            raise ValueError(f"transform name {name!r} is taken by {TRANSFORMS[name].fn.__module__}")
        TRANSFORMS[name] = Transform(name, fn, options, needs_moe, summary)
        return fn
    return add


@dataclasses.dataclass
class TransformResult:
    """What a transform returns.

    Attributes:
      config: the new model's config (a ``ConfigDict``; start from ``source.copy_config()``).
      params: parameters in the unscanned layout (host or device arrays).
      model_state: non-parameter collections in the unscanned layout (``{}`` if none).
      report: JSON-able numbers and facts, stored in ``transform.json``.
    """

    config: Any
    params: Any
    model_state: Any
    report: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Source:
    """A trained model, read once (see the module docstring).

    Attributes:
      config: its resolved config (adapter keys cleared for an adapter run).
      params: host parameters, unscanned layout.
      model_state: host non-parameter collections, unscanned layout.
      path: the absolute path it came from.
      kind: ``'workdir'`` or ``'hf'``.
      step: the checkpoint step (``0`` for a Hugging Face checkpoint).
      rng: the train state's PRNG key (uint32 ``[2]``).
      step_dir: the checkpoint step directory it was read from (``None`` for Hugging Face).
    """

    config: Any
    params: Any
    model_state: Any
    path: str
    kind: str
    step: int
    rng: Any
    step_dir: str | None = None

    def copy_config(self):
        """A mutable copy of :attr:`config`."""
        import ml_collections
        return ml_collections.ConfigDict(self.config.to_dict())

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the layers whose feed-forward slot is an MoE (empty for dense models)."""
        return moe_layers_of(self.config.model)


def moe_layers_of(model_cfg) -> list[int]:
    """Indices of the MoE layers of ``model_cfg`` (empty for dense models and models without layers)."""
    try:
        from routezoo.zoo.lm import ffn_kinds
        return [i for i, kind in enumerate(ffn_kinds(model_cfg)) if kind == "moe"]
    except (ValueError, KeyError, AttributeError):
        return []


def _host_mesh_config(config):
    import ml_collections

    from routezoo.layers import sharding as shd
    config = ml_collections.ConfigDict(config.to_dict())
    for axis in shd.MESH_AXES:
        config.mesh[axis] = -1 if axis == "data" else 1
    return config


def _is_workdir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "checkpoints"))


def load_source(path: str, overrides: dict[str, str] | None = None, *, log: Callable[[str], None] = print,
                check: Callable[[Any], None] | None = None) -> Source:
    """Reads ``path`` (a training workdir or a Hugging Face checkpoint directory).

    ``overrides`` (``{'train.batch_size': '8', ...}``) are set on the source's config
    (never on ``model.*``, which must describe the stored weights). ``check(config)`` runs
    once the config is known, before any weight is read (a transform's refusals).

    Raises:
      TransformError: one line, for a missing, unreadable or checkpoint-less source.
    """
    import jax

    from routezoo.zoo import stack

    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise TransformError(f"--from {path} is not a directory; give a training workdir or a Hugging Face "
                             "checkpoint directory")
    if _is_workdir(path):
        from routezoo.training import checkpoint as ckpt_lib
        from routezoo.training.workdir import load_trained, read_workdir_config
        try:
            config = read_workdir_config(path)
        except (FileNotFoundError, ValueError) as e:
            raise TransformError(f"--from {path}: {_line(e)}") from None
        _apply_overrides(config, overrides or {})
        if check is not None:
            check(config)
        if not ckpt_lib.step_dirs(os.path.join(path, "checkpoints")):
            raise TransformError(f"--from {path} has no checkpoint in {os.path.join(path, 'checkpoints')} "
                                 "(train it first)")
        try:
            _, _, state = load_trained(path, log=log)
        except (FileNotFoundError, ValueError) as e:
            raise TransformError(f"--from {path}: {_line(e)}") from None
        except Exception as e:  # noqa: BLE001 - Orbax raises many types for damaged files
            raise TransformError(f"--from {path}: its checkpoint does not load ({_line(e)})") from None
        step = int(jax.device_get(state.step))
        if str(config.adapter.get("method", "")):   # the adapter is merged into the weights
            config.adapter.method, config.adapter.library = "", ""
            config.init.adapter_from = ""
        step_dir = os.path.join(path, "checkpoints", str(step))
        kind = "workdir"
    elif os.path.isfile(os.path.join(path, "config.json")):
        state, config = _load_hf(path, overrides or {}, check)
        step, step_dir, kind = 0, None, "hf"
    else:
        raise TransformError(f"--from {path} holds no config.json: neither a routezoo training workdir nor a "
                             "Hugging Face checkpoint directory")
    params = stack.to_unscanned(jax.device_get(state.params), config.model)
    model_state = stack.to_unscanned(jax.device_get(dict(state.model_state)), config.model)
    return Source(config=config, params=params, model_state=model_state, path=path, kind=kind, step=step,
                  rng=jax.device_get(state.rng), step_dir=step_dir)


def _load_hf(path: str, overrides: dict[str, str], check: Callable[[Any], None] | None = None):
    """``(TrainState, config)`` of a Hugging Face checkpoint through the import (init.from_hf)."""
    import jax
    from flax import linen as nn

    from routezoo import zoo
    from routezoo.configs import base
    from routezoo.training.adapter_run import optimizer_for
    from routezoo.training.data.tokenizers import resolve_tokenizer
    from routezoo.training.state import create_state, mesh_and_rules, state_shardings
    from routezoo.zoo import hf

    config = base.get_config()
    config.init.from_hf = path
    _apply_overrides(config, overrides)
    try:
        hf.update_config_from_hf(config)
        if check is not None:
            check(config)
        resolve_tokenizer(config)
        mconfig = _host_mesh_config(config)
        mesh, rules = mesh_and_rules(mconfig)
        model = zoo.build(config.model)
        tx = optimizer_for(config, None)[0]
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            _, shardings, _ = state_shardings(model, tx, mconfig, mesh, rules)
            state = create_state(model, tx, mconfig, shardings)
    except (FileNotFoundError, ValueError) as e:   # incl. HFError
        raise TransformError(f"--from {path}: {_line(e)}") from None
    return state, config


def _parse_value(text: str, like: Any, key: str) -> Any:
    if isinstance(like, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise TransformError(f"{key}={text!r} is not a boolean (true or false)")
    try:
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            return float(text)
    except ValueError:
        raise TransformError(f"{key}={text!r} is not {'an int' if isinstance(like, int) else 'a float'}") from None
    return str(text)


def _apply_overrides(config, overrides: dict[str, str]) -> None:
    for key, text in overrides.items():
        if key.startswith("model.") or key == "model":
            raise TransformError(f"--config.{key}: the source's model config describes its stored weights and "
                                 "cannot be overridden; transform options go in --config.transform.*")
        node, parts = config, key.split(".")
        for i, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                where = ".".join(parts[:i]) or "config"
                raise TransformError(f"unknown config key {key!r} (no {part!r} under {where})")
            if i < len(parts) - 1:
                node = node[part]
        leaf = parts[-1]
        if hasattr(node[leaf], "keys"):
            raise TransformError(f"config key {key!r} is a group, not a value")
        node[leaf] = _parse_value(text, node[leaf], f"--config.{key}")


def parse_options(transform: Transform, options: dict[str, str]) -> dict[str, Any]:
    """The transform's options: defaults, with ``options`` (strings or values) parsed to their types."""
    unknown = sorted(set(options) - set(transform.options))
    if unknown:
        allowed = ", ".join(f"{k} (default {v!r})" for k, v in transform.options.items()) or "none"
        raise TransformError(f"transform {transform.name!r} has no option {unknown[0]!r}; its options: {allowed}")
    out = dict(transform.options)
    for key, value in options.items():
        like = transform.options[key]
        out[key] = _parse_value(value, like, f"--config.transform.{key}") if isinstance(value, str) else \
            _parse_value(str(value), like, f"--config.transform.{key}")
    return out


class Context:
    """What a transform may use besides its source (see the module docstring).

    Every model evaluation here runs on one mesh with all local devices on ``data``.
    """

    def __init__(self, source: Source, *, log: Callable[[str], None] = print, seed: int | None = None):
        self.source = source
        self.log = log
        self.seed = int(source.config.seed if seed is None else seed)
        self._data_ready = False

    # ------------------------------------------------------------------ data

    def _data(self, config):
        from routezoo.training import data as data_lib
        data_lib.ensure_dataset(config.data)
        return data_lib

    def batches(self, n: int, config=None) -> list[dict[str, Any]]:
        """The first ``n`` host batches (numpy ``{'inputs': [B, L], ...}``) of the training
        split of ``config`` (default: the source's), as a training run would read them."""
        import numpy as np
        config = config or self.source.config
        data_lib = self._data(config)
        it = data_lib.make_train_iterator(config)
        return [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(int(n))]

    def eval_batches(self, config=None) -> list[dict[str, Any]]:
        """The ``train.eval_steps`` batches of the eval split (what :meth:`evaluate` reads)."""
        import numpy as np
        config = config or self.source.config
        data_lib = self._data(config)
        return [{k: np.asarray(v) for k, v in b.items()} for b in data_lib.eval_batches(config)]

    # ------------------------------------------------------------------ models

    def _setup(self, config):
        from routezoo import zoo
        from routezoo.training.state import mesh_and_rules
        mconfig = _host_mesh_config(config)
        mesh, rules = mesh_and_rules(mconfig)
        return mconfig, mesh, rules, zoo.build(config.model)

    def _state(self, config, params, model_state, tx, mesh, rules, model):
        import jax
        import jax.numpy as jnp

        from routezoo.training.state import TrainState, state_shardings
        from routezoo.zoo import stack
        _, shardings, _ = state_shardings(model, tx, config, mesh, rules)
        params = stack.to_layout(params, config.model)
        model_state = stack.to_layout(dict(model_state), config.model)
        rng = jnp.asarray(self.source.rng, jnp.uint32)
        state = jax.jit(lambda p, ms, r: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                                                    model_state=ms, rng=r), out_shardings=shardings)(
            params, model_state, rng)
        return state, shardings

    def apply(self, config, params, model_state, inputs, *, deterministic: bool = True):
        """``(logits, aux)`` of the model of ``config`` on ``inputs [B, L]`` (unscanned trees in)."""
        import jax
        import jax.numpy as jnp

        from routezoo.zoo import stack
        from routezoo import zoo
        model = zoo.build(stack.with_scan(config.model, False))
        return jax.jit(lambda v, x: model.apply(v, x, deterministic=deterministic))(
            {"params": params, **dict(model_state)}, jnp.asarray(inputs))

    def evaluate(self, config, params, model_state) -> dict[str, float]:
        """The training loop's evaluation (``train.eval_steps`` batches of the eval split):
        ``eval_loss``, ``eval_accuracy``, ``eval_bits_per_byte``, ``eval_bytes_per_token``."""
        import jax
        from flax import linen as nn
        from jax.sharding import NamedSharding

        from routezoo.layers import sharding as shd
        from routezoo.training.adapter_run import optimizer_for
        from routezoo.training.loop import evaluate
        from routezoo.training.step import make_eval_step, special_ids_of
        mconfig, mesh, rules, model = self._setup(config)
        data_lib = self._data(config)
        tokenizer = data_lib.get_tokenizer(config.data)
        tx = optimizer_for(mconfig, None)[0]
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            state, shardings = self._state(mconfig, params, model_state, tx, mesh, rules, model)
            batch_sharding = NamedSharding(mesh, shd.batch_spec(1))
            step = jax.jit(make_eval_step(model, tokenizer.token_bytes, None, special_ids_of(tokenizer)),
                           in_shardings=(shardings, batch_sharding))
            return evaluate(step, state, mconfig, mesh, batch_sharding)

    def finetune(self, config, params, model_state, steps: int, *, update_mask=None, batches=None,
                 log_every: int = 0) -> tuple[Any, Any, list[float]]:
        """``steps`` updates by the training loop's ``train_step`` (``config``'s optimizer
        and schedule, its training split from the start, or ``batches``).

        Args:
          config: the model's config (``optimizer.*``, ``train.*`` apply).
          params, model_state: unscanned trees to start from.
          steps: the number of updates.
          update_mask: ``None`` or a tree like ``params`` of arrays broadcastable to each
            parameter (or scalars): every update is multiplied by it, so 0 freezes exactly.
          batches: host batches to cycle through instead of the training split.
          log_every: log the loss every this many steps (0: never).

        Returns:
          ``(params, model_state, losses)``: unscanned host trees and the loss of every step.
        """
        import itertools

        import jax
        import jax.numpy as jnp
        import optax
        from flax import linen as nn
        from jax.sharding import NamedSharding

        from routezoo.layers import sharding as shd
        from routezoo.training.adapter_run import optimizer_for
        from routezoo.training.loop import to_global
        from routezoo.training.step import make_train_step, special_ids_of
        from routezoo.zoo import stack
        mconfig, mesh, rules, model = self._setup(config)
        data_lib = self._data(config)
        tokenizer = data_lib.get_tokenizer(config.data)
        tx, schedule = optimizer_for(mconfig, None)
        if update_mask is not None:
            import numpy as np
            full = jax.tree.map(lambda p, m: np.broadcast_to(np.asarray(m, np.float32), np.shape(p)),
                                params, update_mask)   # each parameter's own shape, then its layout
            mask = stack.to_layout(full, config.model)
            tx = optax.chain(tx, optax.stateless(
                lambda updates, params=None: jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, mask)))
        source = itertools.cycle(batches) if batches is not None else data_lib.make_train_iterator(mconfig)
        losses: list[float] = []
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            state, shardings = self._state(mconfig, params, model_state, tx, mesh, rules, model)
            batch_sharding = NamedSharding(mesh, shd.batch_spec(1))
            step_fn = jax.jit(make_train_step(model, tx, mconfig, schedule, None, special_ids_of(tokenizer)),
                              in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                              donate_argnums=(0,))
            for i in range(int(steps)):
                state, metrics = step_fn(state, to_global(next(source), batch_sharding))
                losses.append(float(jax.device_get(metrics["loss"])))
                if log_every and (i + 1) % log_every == 0:
                    self.log(f"fine-tune step {i + 1}/{steps}: loss {losses[-1]:.4f}")
            params, model_state = jax.device_get((state.params, state.model_state))
        return (stack.to_unscanned(params, config.model), stack.to_unscanned(dict(model_state), config.model),
                losses)

    def routing_stats(self, config, params, model_state, n: int, batches=None) -> dict[str, Any]:
        """Routing statistics of the model on ``n`` calibration batches (:meth:`batches`),
        counted by :class:`routezoo.training.analyze.RoutingAccumulator` (padding excluded).

        Returns:
          ``{'layers': [MoE layer indices], 'load': int64 [M, E_r] routed copies per router
          output, 'affinity': int64 [M-1, E_r, E_r] top-1 transitions between consecutive
          MoE layers, 'indices': [M] list of int [N, K] router outputs per token (padding
          removed), 'weights': the same for the combine weights, 'tokens': N}`` with ``E_r``
          the router's width.
        """
        import jax
        import numpy as np

        from routezoo.training.analyze import RoutingAccumulator, drop_settings, make_forward
        from routezoo.zoo import stack
        from routezoo import zoo
        moe_cfg = config.model.moe
        seq_len = int(config.data.seq_len)
        model = zoo.build(stack.with_scan(config.model, False))
        forward = make_forward(model, moe_cfg, seq_len)
        data_lib = self._data(config)
        pad = data_lib.get_tokenizer(config.data).pad_id
        batches = batches if batches is not None else self.batches(n, config)
        acc, per_layer_idx, per_layer_w = None, {}, {}
        for b in batches:
            decisions = jax.device_get(forward(params, dict(model_state), b["inputs"]))
            if acc is None:
                k = next(iter(decisions.values()))["indices"].shape[-1]
                settings = drop_settings(moe_cfg, int(moe_cfg.group_size) or seq_len, k)
                width = router_width(moe_cfg)
                acc = RoutingAccumulator(sorted(decisions), width, int(config.model.vocab_size), seq_len,
                                         [s for s, _, _ in settings], pad)
            acc.add(b["inputs"], decisions)
            mask = np.asarray(b["inputs"]) != pad
            for layer, d in decisions.items():
                per_layer_idx.setdefault(layer, []).append(np.asarray(d["indices"])[mask])
                per_layer_w.setdefault(layer, []).append(np.asarray(d["weights"])[mask])
        if acc is None:
            raise TransformError("no calibration batches (n must be >= 1)")
        return {"layers": list(acc.layers), "load": acc.load, "affinity": acc.affinity,
                "indices": [np.concatenate(per_layer_idx[layer]) for layer in acc.layers],
                "weights": [np.concatenate(per_layer_w[layer]) for layer in acc.layers],
                "tokens": int(acc.tokens)}


def router_width(moe_cfg) -> int:
    """The number of router outputs (logical experts): ``len(model.moe.expert_map)`` when a
    map is set, else ``model.moe.num_experts``."""
    try:
        from routezoo.layers.moe.block import logical_num_experts
    except ImportError:   # pragma: no cover - the block without an expert map
        return int(moe_cfg.num_experts)
    return logical_num_experts(moe_cfg)


def check_output(out: str, inputs: list[str]) -> None:
    """``OUT`` must be new or an empty directory, and not one of the inputs or inside one."""
    out = os.path.abspath(out)
    if os.path.lexists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        what = "is not empty (it may hold a run)" if os.path.isdir(out) else "exists and is not a directory"
        raise TransformError(f"--workdir {out} {what}; transform never overwrites: give a new or empty directory")
    for src in inputs:
        src = os.path.abspath(src)
        if out == src or out.startswith(src + os.sep):
            raise TransformError(f"--workdir {out} is inside the source {src}; give a directory outside it")


def get_transform(name: str) -> Transform:
    """The registered transform ``name``; one-line :class:`TransformError` listing the known ones."""
    if name not in TRANSFORMS:
        raise TransformError(f"unknown transform {name!r}; known: {', '.join(sorted(TRANSFORMS)) or 'none'}")
    return TRANSFORMS[name]


def _jsonable(x: Any) -> Any:
    import numpy as np
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def run_transform(name: str, source_path: str, out: str, options: dict[str, Any] | None = None,
                  overrides: dict[str, str] | None = None, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs transform ``name`` on ``source_path`` and writes the new workdir ``out``.

    Args:
      name: a :data:`TRANSFORMS` key.
      source_path: a training workdir or a Hugging Face checkpoint directory (only read).
      out: the new workdir (new, or an empty directory).
      options: the transform's options (strings are parsed to their types).
      overrides: ``{'KEY': 'VALUE'}`` config keys set on the source's config first.
      log: prints a message.

    Returns:
      What ``transform.json`` records.

    Raises:
      TransformError: a refused transform, one line; nothing is written.
    """
    from routezoo.training import config_check
    from routezoo.training.merge import model_differences
    from routezoo.training.workdir import write_step0_workdir
    from routezoo.zoo import stack

    transform = get_transform(name)
    opts = parse_options(transform, options or {})
    check_output(out, [source_path])

    def check(config) -> None:
        if transform.needs_moe and not moe_layers_of(config.model):
            raise TransformError(f"transform {name!r} works on the experts of an MoE model; --from "
                                 f"{os.path.abspath(source_path)} is dense (model.ffn="
                                 f"{config.model.get('ffn', '')!r}, no MoE layer)")

    source = load_source(source_path, overrides, log=log, check=check)
    ctx = Context(source, log=log)
    result = transform.fn(source, opts, ctx)
    if not isinstance(result, TransformResult):
        raise TypeError(f"transform {name!r} returned {type(result).__name__}, not a TransformResult")
    config = result.config
    if source.kind == "hf" and [d for d in model_differences(config, source.config)
                                if not d.startswith("moe.expert_map")]:
        config.init.from_hf = ""   # another architecture than the checkpoint's: the weights are in checkpoints/0
    try:
        config_check.validate(config)
    except config_check.ConfigError as e:
        raise TransformError(f"transform {name!r} made an invalid config: {_line(e)}") from None
    params = stack.to_layout(result.params, config.model)
    model_state = stack.to_layout(dict(result.model_state or {}), config.model)
    same_data = (source.step_dir is not None and config.data.to_dict() == source.config.data.to_dict()
                 and int(config.train.batch_size) == int(source.config.train.batch_size)
                 and int(config.seed) == int(source.config.seed))
    record = {"transform": name, "options": opts,
              "source": {"path": source.path, "kind": source.kind, "step": source.step},
              "overrides": dict(overrides or {}), "report": _jsonable(result.report)}
    try:
        write_step0_workdir(out, config, params, model_state, source.rng, record_name=TRANSFORM_JSON,
                            record=record, data_from=source.step_dir if same_data else None, tag="transform")
    except OSError as e:
        raise TransformError(f"writing {out} failed: {e.strerror or e}; nothing was left there") from None
    log(f"transform {name} of {source.path} written to {os.path.abspath(out)}; fine-tune it with "
        f"'routezoo train --workdir {out}', read it with 'routezoo analyze --workdir {out}'")
    return record


def _split_flags(argv: list[str]) -> tuple[list[str], dict[str, str], dict[str, str]]:
    rest, options, overrides = [], {}, {}
    for a in argv:
        if a.startswith("--config."):
            if "=" not in a:
                raise TransformError(f"{a}: give a value, --config.KEY=VALUE")
            key, value = a[len("--config."):].split("=", 1)
            if key.startswith("transform."):
                options[key[len("transform."):]] = value
            else:
                overrides[key] = value
        else:
            rest.append(a)
    return rest, options, overrides


def usage() -> str:
    names = "\n".join(
        f"      {t.name:<18} {t.summary}" + (f" (options: {', '.join(f'{k}={v!r}' for k, v in t.options.items())})"
                                             if t.options else "")
        for t in sorted(TRANSFORMS.values(), key=lambda t: t.name)) or "      (none)"
    return USAGE.format(names=names)


def main(argv: list[str]) -> int:
    """``routezoo transform`` flags -> exit code (2 with one line on stderr for any problem)."""
    import argparse

    def fail(message: str) -> int:
        print(f"routezoo: error: transform: {message}", file=sys.stderr)
        return 2

    if not argv or any(a in ("-h", "--help", "-help") for a in argv):
        print(usage())
        return 0 if argv else 2

    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise SystemExit(fail(message))

    try:
        rest, options, overrides = _split_flags(argv)
    except TransformError as e:
        return fail(_line(e))
    parser = _Parser(prog="routezoo transform", add_help=False)
    parser.add_argument("name")
    parser.add_argument("--from", dest="source", required=True)
    parser.add_argument("--workdir", required=True)
    try:
        args = parser.parse_args(rest)
    except SystemExit as e:   # flag errors: one line, already printed by fail()
        return int(e.code or 0)
    try:
        run_transform(args.name, args.source, args.workdir, options, overrides)
    except TransformError as e:
        return fail(_line(e))
    return 0


def _import_transforms() -> None:
    """Imports every module of this package, so their :func:`register` calls run."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_transforms()

__all__ = ["TRANSFORMS", "TRANSFORM_JSON", "Context", "Source", "Transform", "TransformError", "TransformResult",
           "check_output", "get_transform", "load_source", "main", "moe_layers_of", "parse_options", "register",
           "router_width", "run_transform", "usage"]
