"""The training loop: :func:`train_and_evaluate` drives the jitted steps of
:mod:`routezoo.training.step` over the data pipeline, evaluates, logs and checkpoints.

A run resumes from its newest checkpoint (state and data iterator). SIGTERM/SIGINT
(:class:`StopFlag`) saves a checkpoint and returns at the next step, as does
``stop_after``. A run holds its workdir's lock (:class:`~routezoo.training.workdir.WorkdirLock`)
throughout and writes nothing there before its config, its sources and its checkpoints
have been checked: ``config.json``, ``metrics.jsonl`` and TensorBoard are written only
once the state is restored or created. A resumed run cuts ``metrics.jsonl`` back to its
checkpoint's step first. A non-finite loss or gradient norm (``train.on_nonfinite``,
docs/runs.md) is flagged inside the step and read with the metrics the loop fetches
anyway, and again before every save: ``stop`` raises :class:`Diverged` without saving the
flagged state, ``skip`` drops the update and counts it. Evaluation (:func:`evaluate_all`)
runs the plain eval, the router's eval variants (``eval_loss@SUFFIX``) and, with
``train.eval_per_task``, each task's own (``eval_loss@task=NAME``). Plain and adapter runs
share the loop through :func:`routezoo.training.adapter_run.make_run`.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from routezoo import zoo
from routezoo.layers import adapters as adapter_lib
from routezoo.layers import sharding as shd
from routezoo.training import checkpoint as ckpt_lib
from routezoo.training import metrics as metrics_lib
from routezoo.training import workdir as workdir_lib
from routezoo.training.adapter_run import adapter_config, make_run, optimizer_for, resolve_layout
from routezoo.training.state import maybe_initialize_distributed, mesh_and_rules
from routezoo.training.step import init_guard, make_eval_step, make_train_step, special_ids_of

GUARD_SAVED = ("skipped", "loss_mean", "count")   # the guard's counters kept with each checkpoint


class Diverged(ckpt_lib.RunError):
    """The run met a non-finite (or spiking) loss or gradient and ``train.on_nonfinite``
    says stop (or ``skip`` skipped too many steps in a row); nothing after it was saved."""

    exit_code = 3


def check_guard(guard: dict[str, Any], config, step: int, checkpointer) -> None:
    """Raises :class:`Diverged` when the fetched guard says the run must stop."""
    t = config.train
    policy = str(t.get("on_nonfinite", "stop"))
    first = int(guard["first_bad"])
    latest = checkpointer.latest_step()
    kept = (f"the newest checkpoint is step {latest} (intact; running again resumes from it)"
            if latest is not None else "no checkpoint was saved")
    if policy == "stop" and first >= 0:
        loss, gnorm = float(guard["first_loss"]), float(guard["first_grad_norm"])
        if int(guard["first_spike"]):
            what = (f"loss {loss:.4g} above train.spike_factor={float(t.spike_factor):g} times its running "
                    f"mean {float(guard['loss_mean']):.4g}")
        else:
            what = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} (loss {loss:.4g}, " \
                   f"grad norm {gnorm:.4g})"
        raise Diverged(f"train: diverged at step {first}: {what}; stopped (train.on_nonfinite=stop) without "
                       f"saving anything after it; {kept}; lower optimizer.learning_rate, or set "
                       "train.on_nonfinite=skip to drop such steps")
    limit = int(t.get("max_consecutive_skips", 0))
    if policy == "skip" and limit and int(guard["worst"]) >= limit:
        raise Diverged(f"train: {int(guard['worst'])} steps in a row skipped for a non-finite or spiking loss "
                       f"(train.max_consecutive_skips={limit}), at step {step}: the run no longer recovers; "
                       f"stopped without saving; {kept}; lower optimizer.learning_rate")


def jit_train_step(model, tx, config, schedule, run, special_ids, batch_sharding: NamedSharding,
                   replicated: NamedSharding, teacher=None):
    """The loop's train step, jitted as the loop runs it (``routezoo compile`` compiles this
    same one): the guarded step (:func:`~routezoo.training.step.make_train_step` with
    ``guarded=True``), the state donated and sharded as ``run.shardings``, the divergence
    guard replicated and donated, the batch on ``batch_sharding``. Called as
    ``train_step(state, guard, batch, *run.extra) -> (state, guard, metrics)``; with a
    ``teacher`` (:func:`routezoo.training.distill.load_teacher`) its variables follow, not
    donated: ``train_step(state, guard, batch, *run.extra, teacher.variables)``."""
    spec, extra = (None, ()) if teacher is None else (teacher.spec, (teacher.shardings,))
    return jax.jit(make_train_step(model, tx, config, schedule, run.adapter, special_ids, guarded=True,
                                   teacher=spec),
                   in_shardings=(run.shardings, replicated, batch_sharding, *run.extra_shardings, *extra),
                   out_shardings=(run.shardings, replicated, None), donate_argnums=(0, 1))


def to_global(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Per-process batch -> global arrays sharded over the batch axes of the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def evaluate(eval_step, state, config, mesh, batch_sharding, extra=(), task: str | None = None) -> dict[str, float]:
    """One evaluation over ``train.eval_steps`` batches of the eval split.

    Args:
      eval_step: a jitted :func:`~routezoo.training.step.make_eval_step`.
      state: the TrainState.
      config: the run's config.
      mesh: the device mesh.
      batch_sharding: the batches' sharding.
      extra: extra step arguments (an adapter run's base).
      task: one task of ``data.tasks`` to evaluate alone, or ``None``.

    Returns:
      ``{'eval_loss', 'eval_accuracy', 'eval_bits_per_byte', 'eval_bytes_per_token'}``
      (the last: UTF-8 bytes per weighted target token, from the tokenizer's ``token_bytes``).
    """
    from routezoo.training import data as data_lib
    sums = {"nll": 0.0, "correct": 0.0, "tokens": 0.0, "bytes": 0.0}
    for local in data_lib.eval_batches(config, task=task):
        out = jax.device_get(eval_step(state, to_global(local, batch_sharding), *extra))
        for k in sums:
            sums[k] += float(out[k])
    tokens = max(sums["tokens"], 1.0)
    return {"eval_loss": sums["nll"] / tokens, "eval_accuracy": sums["correct"] / tokens,
            "eval_bits_per_byte": sums["nll"] / math.log(2) / max(sums["bytes"], 1.0),
            "eval_bytes_per_token": sums["bytes"] / tokens}


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


class StopFlag:
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
        """Whether any process got a signal (all processes agree)."""
        flag = self.signum is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
        return flag


def describe_model(params_boxed, config) -> dict[str, float]:
    """Parameter counts and FLOPs per token of ``config.model`` (logged at step 0).

    Args:
      params_boxed: boxed (or abstract) model parameters.
      config: the run's config.

    Returns:
      ``{'params_total', 'params_active', 'flops_per_token_forward', 'flops_per_token_train'}``.
    """
    total, active = zoo.count_params(params_boxed, config.model, config.data.seq_len)
    flops = zoo.flops_per_token(config.model, config.data.seq_len, active, params_boxed)
    return {"params_total": total, "params_active": active,
            "flops_per_token_forward": flops["forward"], "flops_per_token_train": flops["train"]}


def layout_hint(model_cfg, backend: str) -> str | None:
    """One line for a GPU run with a stack scanned without remat (``zoo.stack.is_scanned``:
    ``model.scan_layers`` and a stack that can scan), or ``None``. Scanned,
    the backward pass keeps every layer's residuals in stacked buffers: ``moe_1b`` on an H100
    trained at 105k tokens/s with 68.8 GiB, against 141k with 46.8 GiB unscanned, while with
    ``dots_saveable`` the two layouts were within 4% (BENCHMARKS.md, depth)."""
    from routezoo.zoo import stack
    if backend != "gpu" or str(model_cfg.get("remat", "none")) != "none" or not stack.is_scanned(model_cfg):
        return None
    return ("note: layers scanned without remat; on a GPU this ran 25% slower and took 22 GiB more than "
            "unscanned for configs/moe_1b.py: set model.scan_layers=false, or a model.remat policy to keep the scan "
            "(docs/scale.md)")


def train_and_evaluate(config, workdir: str, *, stop_after: int | None = None) -> dict[str, Any]:
    """Trains ``config`` in ``workdir``, resuming from its checkpoints.

    Args:
      config: the run's config, already validated; ``data.tokenizer='auto'`` with an
        ``init.from_hf`` tokenizer is resolved in place (:func:`~routezoo.training.data.resolve_tokenizer`).
      workdir: the run's directory (config.json, checkpoints, metrics, adapter/).
      stop_after: leave after this many steps of this call (saving a checkpoint), as a
        preempted job does; running again resumes. The schedule still spans ``train.steps``.

    Returns:
      The last train metrics (means) and eval metrics, with ``step``.

    Raises:
      routezoo.training.checkpoint.RunError: one line, with the CLI's ``exit_code``:
        :class:`~routezoo.training.workdir.WorkdirBusy` (another run holds the workdir),
        :class:`~routezoo.training.checkpoint.CheckpointMismatch` (the checkpoints are of
        another model), :class:`~routezoo.training.checkpoint.NoIntactCheckpoint`,
        :class:`Diverged`, :class:`~routezoo.training.checkpoint.CheckpointWriteFailed`.
    """
    from routezoo.training import data as data_lib   # the data stack only where data is read
    maybe_initialize_distributed()
    data_lib.resolve_tokenizer(config)   # data.tokenizer=auto with init.from_hf: its tokenizer
    is_main = jax.process_index() == 0
    workdir = os.path.abspath(workdir)
    log = print if is_main else (lambda *_: None)
    resolve_layout(config, log)          # an adapter run's base runs unscanned
    with workdir_lib.WorkdirLock(workdir, enabled=is_main, log=log):
        return _train(config, workdir, stop_after, is_main)


def _train(config, workdir: str, stop_after: int | None, is_main: bool) -> dict[str, Any]:
    from routezoo.training import data as data_lib
    mesh, rules = mesh_and_rules(config)
    data_lib.ensure_dataset(config.data)
    tokenizer = data_lib.get_tokenizer(config.data)
    model = zoo.build(config.model)
    adapter = adapter_lib.from_config(adapter_config(config))
    tx, schedule = optimizer_for(config, adapter)
    # Leading (batch) axis sharded, the rest replicated: fits inputs [B, L] and task_id [B].
    batch_sharding = NamedSharding(mesh, shd.batch_spec(1))
    replicated = NamedSharding(mesh, PartitionSpec())
    progress_log = print if is_main else (lambda *_: None)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        run = make_run(model, tx, config, mesh, rules, adapter)
        abstract, shardings = run.abstract, run.shardings
        info = describe_model(run.boxed_params, config)
        progress_log(
            f"model {config.model.name}: {info['params_total'] / 1e6:.2f}M parameters, "
            f"{info['params_active'] / 1e6:.2f}M active per token, "
            f"{info['flops_per_token_train'] / 1e6:.1f} MFLOP/token (train); "
            f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} devices, "
            f"{jax.process_count()} process(es)")
        hint = layout_hint(config.model, jax.default_backend())
        if hint:
            progress_log(hint)
        run.load(workdir, info, progress_log)   # an adapter run: its frozen base, passed to every step
        extra = run.extra
        from routezoo.training.distill import load_teacher
        teacher = load_teacher(config, mesh, rules, progress_log)   # distill.*: a frozen teacher, or None
        train_extra = extra + (() if teacher is None else (teacher.variables,))

        train_iter = data_lib.make_train_iterator(config)
        checkpointer = ckpt_lib.Checkpointer(
            os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
            async_save=config.checkpoint.async_save, verify=config.checkpoint.verify, log=progress_log,
            on_corrupt=str(config.checkpoint.get("on_corrupt", "stop")))
        try:
            try:
                restored = checkpointer.restore_latest(abstract, data_lib.iterator_restore_args(train_iter))
            except ckpt_lib.CheckpointMismatch:
                diff = workdir_lib.config_differences(workdir, config)
                if not diff:
                    raise
                raise ckpt_lib.CheckpointMismatch(
                    f"the checkpoints in {checkpointer.directory} are of another config ({'; '.join(diff[:3])}"
                    f"{'; ...' if len(diff) > 3 else ''}); use the config they were saved with, or another "
                    "--workdir") from None
            saved_guard = {}
            if restored is None:
                state, start = run.create_state(), 0
            else:
                start, state, _ = restored
                saved_guard = {k: v for k, v in (checkpointer.restored_extra or {}).items() if k in GUARD_SAVED}
                progress_log(f"resumed from step {start} ({checkpointer.step_dir(start)})")
        except BaseException:
            checkpointer.abandon()
            raise

        # The config, its sources and the checkpoints are good: from here on the run writes.
        restart_at = start + 1 if start else 0   # the first step written again
        if is_main:
            dropped = metrics_lib.truncate_metrics(workdir, restart_at)
            if dropped:
                progress_log(f"metrics.jsonl: dropped {dropped} record(s) of steps >= {restart_at}, "
                             "which this run writes again")
            tmp = os.path.join(workdir, "config.json.tmp")
            with open(tmp, "w") as f:
                f.write(config.to_json_best_effort(indent=2, sort_keys=True))
            os.replace(tmp, os.path.join(workdir, "config.json"))
        writer = metrics_lib.MetricWriter(workdir, enabled=is_main, restart_step=restart_at)
        progress = None
        try:
            special_ids = special_ids_of(tokenizer)
            train_step = jit_train_step(model, tx, config, schedule, run, special_ids, batch_sharding, replicated,
                                        teacher)
            eval_steps = {suffix: jax.jit(make_eval_step(m, tokenizer.token_bytes, run.adapter, special_ids),
                                          in_shardings=(shardings, batch_sharding, *run.extra_shardings))
                          for suffix, m in {"": model, **eval_variants(config)}.items()}
            guard = jax.jit(lambda: init_guard(**saved_guard), out_shardings=replicated)()
            if start == 0:   # model size and the untrained model's eval, as step 0
                first = evaluate_all(eval_steps, state, config, mesh, batch_sharding, extra)
                writer.write(0, {**info, **first})
                progress_log(f"step 0: eval loss {first['eval_loss']:.4f}, "
                             f"eval bits/byte {first['eval_bits_per_byte']:.4f}")

            steps, last_metrics, last_eval = config.train.steps, {}, {}
            tokens_per_step = config.train.batch_size * config.data.seq_len
            progress = metrics_lib.Progress(steps, min(start, steps), enabled=is_main and config.train.progress)
            skip_mode = str(config.train.get("on_nonfinite", "stop")) == "skip"
            t_last, step_last = time.time(), start
            step, waited, skipped_seen = start, 0.0, int(saved_guard.get("skipped", 0))
            with StopFlag() as stop:
                while step < steps:
                    t_wait = time.perf_counter()
                    host_batch = next(train_iter)   # the device runs the previous step meanwhile (async dispatch)
                    waited += time.perf_counter() - t_wait
                    batch = to_global(host_batch, batch_sharding)
                    state, guard, metrics = train_step(state, guard, batch, *train_extra)
                    step += 1
                    log_now = step % config.train.log_every == 0 or step == steps
                    eval_now = step % config.train.eval_every == 0 or step == steps
                    if log_now or eval_now:
                        last_metrics, fetched = jax.device_get((metrics, guard))
                        now = time.time()
                        tps = tokens_per_step * (step - step_last) / max(now - t_last, 1e-9)
                        # the share of wall time spent waiting for the input pipeline: the device idles then
                        record = {**last_metrics, "tokens_per_second": tps,
                                  "data_wait_fraction": min(waited / max(now - t_last, 1e-9), 1.0)}
                        t_last, step_last, waited = now, step, 0.0
                        if skip_mode and int(fetched["skipped"]) > skipped_seen:
                            progress.write(f"step {step}: {int(fetched['skipped']) - skipped_seen} step(s) skipped "
                                           f"for a non-finite or spiking loss since the last log, "
                                           f"{int(fetched['skipped'])} in all (train.on_nonfinite=skip)")
                            skipped_seen = int(fetched["skipped"])
                        try:
                            check_guard(fetched, config, step, checkpointer)
                        except Diverged:
                            writer.write(step, record)   # the diverged values, as null
                            raise
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
                        fetched = jax.device_get(guard)
                        check_guard(fetched, config, step, checkpointer)   # never save a diverged state
                        checkpointer.save(step, state, data_lib.iterator_save_args(train_iter), force=True,
                                          extra={k: fetched[k].item() for k in GUARD_SAVED})
                        run.save(workdir, step, state)
                    if stopping:
                        progress.write(f"stopped at step {step}; checkpoint saved; run again to resume")
                        break
        except BaseException:
            if progress is not None:
                progress.close()
            checkpointer.abandon()   # lets a save of an earlier (good) step finish
            writer.close()
            if is_main:
                try:   # the curves up to the failure; a plot that cannot be written is no reason to hide it
                    metrics_lib.plot_metrics(workdir)
                except Exception:  # noqa: BLE001
                    pass
            raise
        progress.close()
        try:
            checkpointer.close()   # waits for the last save: CheckpointWriteFailed if it failed
        finally:
            writer.close()
    if is_main:
        metrics_lib.plot_metrics(workdir)
    return {"step": step, **{k: float(np.mean(v)) for k, v in last_metrics.items()}, **last_eval}
