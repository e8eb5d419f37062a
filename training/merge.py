"""``routezoo merge``: fine-tunes of one base merged into one model, without training.

    routezoo merge --method ties --base runs/base --from runs/ft_email,runs/lora_asyncio --workdir runs/merged

``--base B`` is a plain training workdir (a full model). Each ``--from`` workdir is either a
full fine-tune of ``B`` (``init.from=B``) or an adapter run on ``B`` whose method merges into
the weights (``lora``, ``mos``, ``hydra``, ``mhr_mu``). Its task vector is its parameters
minus ``B``'s: for an adapter run, the weights it gives at inference (``adapter.merge``, for
LoRA ``W + s·A·B`` on every target) minus ``B``'s. The vectors are merged by
:mod:`routezoo.zoo.merge` (task arithmetic, TIES, DARE, Model Breadcrumbs) in the unscanned
layer layout (per-tensor masks see one layer at a time) and the result is moved back to
``B``'s layout.

What ``--workdir OUT`` gets (assembled in a temporary sibling directory and renamed into
place once complete; the sources are only read):

- ``config.json``: ``B``'s, with the adapter keys cleared;
- ``checkpoints/0/``: a train state at step 0 whose parameters are the merged model, with a
  fresh optimizer state and ``B``'s model state and PRNG key; ``B``'s data-iterator position
  and Orbax step metadata copied byte for byte; a manifest. ``routezoo analyze``,
  ``routezoo convert --to-hf``, ``load_trained`` (and the sampler through it) and
  ``--config.init.from=OUT`` read it as any run; ``routezoo train --workdir OUT`` with
  ``B``'s config fine-tunes it from step 0;
- ``merge.json``: method, hyper-parameters, the paper, the base and every source (workdir,
  kind, step).

Refused in one line before anything is written (:class:`MergeError`, a ``ValueError``; the
CLI exits 2): an unknown method or a hyper-parameter it does not take, an ``OUT`` that exists
and is not empty, a base or source that is missing, not a workdir, without an intact
checkpoint, or corrupt; a base that is an adapter run; a source whose parameters or model
config differ from ``B``'s (another base), an adapter run on another base (its stored
fingerprint), a full run that records another starting point (``init.from_workdir`` naming
another existing directory, ``init.from_hf``, or none at all), and an adapter method that
acts on activations (no merged weights exist).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

USAGE = """usage: routezoo merge --method {methods} --base B --from W1,W2,... --workdir OUT
                      [--scale L] [--density D] [--top T] [--bottom B] [--seed S] [--combine task_arithmetic|ties]

  --method: how the task vectors (each W minus B) are merged (defaults from each paper):
      task_arithmetic  B + scale * sum                                    (--scale 0.4)
      ties             trim to the top density by magnitude, elect sign by mass, disjoint mean
                                                                           (--density 0.2 --scale 1)
      dare             drop with rate 1 - density, rescale by 1/density, then task arithmetic or,
                       with --combine ties, elect + disjoint mean          (--density 0.1 --scale 1 --seed 0)
      breadcrumbs      per tensor, mask the top and bottom magnitude fractions, then task arithmetic
                                                                           (--top 0.007 --bottom 0.85 --scale 0.3)
  --base B: a training workdir (the model the sources were fine-tuned from).
  --from W1,W2,...: full fine-tunes of B (init.from=B) or adapter runs on B (lora, mos, hydra, mhr_mu).
  --workdir OUT: the new workdir (must not exist, or be empty): config.json, checkpoints/0 holding
      the merged model, merge.json. Sources are only read.
"""

MERGE_JSON = "merge.json"
# Model keys that change how the same parameters are computed, not what they are: a
# fine-tune may differ from its base in these.
COMPUTE_ONLY_MODEL_KEYS = ("model.scan_layers", "model.remat", "model.dtype", "model.attention_impl",
                           "model.moe.gmm_backend", "model.moe.ep_exchange")
FLAGS = ("scale", "density", "top", "bottom", "seed", "combine")   # method hyper-parameters


class MergeError(ValueError):
    """A merge that cannot be done; the message is one line for the user."""


def _line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:500]


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def model_differences(config, base_config) -> list[str]:
    """``'KEY: A here, B in the base'`` for the ``model.*`` keys (other than
    :data:`COMPUTE_ONLY_MODEL_KEYS`) in which two configs differ."""
    a = _flatten({"model": config.model.to_dict()})
    b = _flatten({"model": base_config.model.to_dict()})
    return [f"{k}: {a.get(k)!r} here, {b.get(k)!r} in the base" for k in sorted(set(a) | set(b))
            if k not in COMPUTE_ONLY_MODEL_KEYS and a.get(k) != b.get(k)]


def _read_config(workdir: str, role: str):
    from routezoo.training.workdir import read_workdir_config
    if not os.path.isdir(workdir):
        raise MergeError(f"{role} {workdir} is not a directory; give a routezoo training workdir")
    try:
        return read_workdir_config(workdir)
    except (FileNotFoundError, ValueError) as e:
        raise MergeError(f"{role} {workdir}: {_line(e)}") from None


def _mesh_and_rules(config):
    """All local devices on ``data`` (merging reads values; the placement does not matter)."""
    import ml_collections

    from routezoo.layers import sharding as shd
    from routezoo.training.state import mesh_and_rules
    config = ml_collections.ConfigDict(config.to_dict())
    for axis in shd.MESH_AXES:
        config.mesh[axis] = -1 if axis == "data" else 1
    return mesh_and_rules(config)


def _restore_plain(workdir: str, config, role: str, log: Callable[[str], None]):
    """``(step, TrainState)`` of a plain run's newest intact checkpoint, on the host."""
    import jax
    from flax import linen as nn

    from routezoo import zoo
    from routezoo.training import checkpoint as ckpt_lib
    from routezoo.training.adapter_run import optimizer_for
    from routezoo.training.state import state_shardings

    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not ckpt_lib.step_dirs(ckpt_dir):
        raise MergeError(f"{role} {workdir} has no checkpoint in {ckpt_dir} (train it first)")
    mesh, rules = _mesh_and_rules(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract, _, _ = state_shardings(zoo.build(config.model), optimizer_for(config, None)[0], config, mesh, rules)
        try:
            step, state = ckpt_lib.restore_state_item(
                ckpt_dir, abstract, verify=bool(config.checkpoint.get("verify", True)), log=log)
        except (FileNotFoundError, ValueError) as e:
            raise MergeError(f"{role} {workdir}: {_line(e)}") from None
    return step, jax.device_get(state)


def _unscanned(params, config):
    from routezoo.zoo import stack
    return stack.to_unscanned(params, config.model)


def _check_start(workdir: str, config, base: str) -> None:
    """A full run must record ``base`` (or a path that no longer exists) as where it started."""
    start = str(config.init.get("from_workdir", ""))
    hf = str(config.init.get("from_hf", ""))
    if hf:
        raise MergeError(f"--from {workdir} was fine-tuned from the Hugging Face checkpoint {hf} "
                         f"(init.from_hf), not from --base {base}; merging needs the runs of one routezoo "
                         "workdir base")
    if not start:
        raise MergeError(f"--from {workdir} was trained from scratch (its config.json has no init.from_workdir), "
                         f"so it is not a fine-tune of --base {base} and has no task vector against it")
    if os.path.isdir(start) and not os.path.samefile(start, base):
        raise MergeError(f"--from {workdir} was fine-tuned from {os.path.abspath(start)} (init.from_workdir), "
                         f"not from --base {base}; give the runs of one base")


def _adapter_delta_params(workdir: str, config, base_params, base: str):
    """The inference weights of an adapter run on ``base_params`` (host arrays)."""
    import jax

    from routezoo.layers.adapters import hooks as adapter_hooks
    from routezoo.training.adapter_run import ADAPTER_DIR, load_adapter

    directory = os.path.join(workdir, ADAPTER_DIR)
    try:
        adapter, params, meta = load_adapter(directory, base_params)
    except ValueError as e:   # another base (fingerprint), or a layout the adapter cannot address
        raise MergeError(f"--from {workdir} is not an adapter on --base {base}: {_line(e)}") from None
    except FileNotFoundError as e:
        raise MergeError(f"--from {workdir} is an adapter run (adapter.method={config.adapter.method!r}) "
                         f"without a readable adapter: {_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for damaged files
        raise MergeError(f"--from {workdir}: its adapter in {directory} does not load ({_line(e)})") from None
    if adapter_hooks.is_activation_adapter(adapter) and not adapter.mergeable:
        raise MergeError(f"--from {workdir}: adapter.method={adapter.name!r} acts on activations and has no merged "
                         "weights, so no task vector; merge lora, mos, hydra or mhr_mu runs, or full fine-tunes")
    return jax.device_get(jax.jit(adapter.merge)(base_params, params)), int(meta.get("step", -1))


def check_output(out: str, inputs: list[str]) -> None:
    """``OUT`` must be new or an empty directory, and not one of the inputs or inside one."""
    out = os.path.abspath(out)
    if os.path.lexists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        what = "is not empty (it may hold a run)" if os.path.isdir(out) else "exists and is not a directory"
        raise MergeError(f"--workdir {out} {what}; merge never overwrites: give a new or empty directory")
    for src in inputs:
        src = os.path.abspath(src)
        if out == src or out.startswith(src + os.sep):
            raise MergeError(f"--workdir {out} is inside the input {src}; give a directory outside the inputs")


def merge_workdirs(method: str, base: str, sources: list[str], out: str, *, log: Callable[[str], None] = print,
                   **hyper: Any) -> dict[str, Any]:
    """Merges the fine-tunes ``sources`` of ``base`` into the new workdir ``out`` (module
    docstring).

    Args:
      method: a :data:`routezoo.zoo.merge.METHODS` name.
      base: the base's training workdir.
      sources: workdirs of full fine-tunes of ``base`` or adapter runs on it.
      out: the new workdir (new, or an empty directory).
      log: prints a message.
      **hyper: the method's hyper-parameters (``scale``, ``density``, ``top``, ``bottom``,
        ``seed``, ``combine``); ``None`` or absent: the paper's default.

    Returns:
      What ``merge.json`` records.

    Raises:
      MergeError: a refused merge (module docstring), one line; nothing is written.
    """
    from routezoo.zoo import merge as merge_lib
    from routezoo.zoo import stack

    try:
        hp = merge_lib.hyperparameters(method, **hyper)
    except ValueError as e:
        raise MergeError(_line(e)) from None
    if not sources:
        raise MergeError("--from names no workdir; give the fine-tunes to merge: --from W1,W2,...")
    base, out = os.path.abspath(base), os.path.abspath(out)
    sources = [os.path.abspath(s) for s in sources]
    if len(set(sources)) != len(sources):
        raise MergeError(f"--from names a workdir twice ({', '.join(s for s in sources if sources.count(s) > 1)})")
    check_output(out, [base, *sources])

    base_config = _read_config(base, "--base")
    if str(base_config.adapter.get("method", "")):
        raise MergeError(f"--base {base} is an adapter run (adapter.method={base_config.adapter.method!r}); give "
                         "the workdir of a full model (the run its adapters and fine-tunes start from)")
    configs = []
    for src in sources:
        config = _read_config(src, "--from")
        diff = model_differences(config, base_config)
        if diff:
            raise MergeError(f"--from {src} is a run of another model than --base {base} "
                             f"({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''}); give runs of one base")
        if not str(config.adapter.get("method", "")):
            _check_start(src, config, base)
        configs.append(config)

    base_step, base_state = _restore_plain(base, base_config, "--base", log)
    base_params = _unscanned(base_state.params, base_config)
    vectors, records = [], []
    for src, config in zip(sources, configs):
        if str(config.adapter.get("method", "")):
            params, step = _adapter_delta_params(src, config, base_params, base)
            kind = f"adapter ({config.adapter.method})"
        else:
            step, state = _restore_plain(src, config, "--from", log)
            params, kind = _unscanned(state.params, config), "full fine-tune"
        try:
            vectors.append(merge_lib.task_vector(params, base_params))
        except ValueError as e:
            raise MergeError(f"--from {src} does not fit --base {base}: {_line(e)}") from None
        records.append({"workdir": src, "kind": kind, "step": step})
        log(f"task vector {len(vectors)}: {src} ({kind}, step {step})")

    merged = stack.to_layout(merge_lib.merge(method, base_params, vectors, **hp), base_config.model)
    info = {"method": method, "hyperparameters": hp, "paper": merge_lib.METHODS[method].paper,
            "base": {"workdir": base, "step": base_step}, "sources": records}
    _write(out, base, base_step, base_config, base_state, merged, info)
    log(f"merged {len(sources)} fine-tune(s) of {base} by {method} "
        f"({', '.join(f'{k} {v}' for k, v in hp.items())}) into {out}; read it as any run "
        f"(routezoo analyze --workdir {out}), or fine-tune it with --config.init.from={out}")
    return info


def _write(out: str, base: str, base_step: int, base_config, base_state, merged, info: dict[str, Any]) -> None:
    """``OUT`` (module docstring), written by :func:`routezoo.training.workdir.write_step0_workdir`."""
    from routezoo.training.workdir import write_step0_workdir

    with open(os.path.join(base, "config.json")) as f:
        tree = json.load(f)
    adapter = tree.setdefault("adapter", {})
    adapter["method"], adapter["library"] = "", ""
    tree.setdefault("init", {})["adapter_from"] = ""
    try:
        write_step0_workdir(out, base_config, merged, base_state.model_state, base_state.rng,
                            record_name=MERGE_JSON, record=info, config_tree=tree,
                            data_from=os.path.join(base, "checkpoints", str(base_step)), tag="merge")
    except OSError as e:
        raise MergeError(f"writing {out} failed: {e.strerror or e}; nothing was left there") from None


def main(argv: list[str]) -> int:
    """``routezoo merge`` flags -> exit code (2 with one line on stderr for any problem)."""
    import argparse

    from routezoo.zoo.merge import COMBINE, METHODS

    def fail(message: str) -> int:
        print(f"routezoo: error: merge: {message}", file=sys.stderr)
        return 2

    if any(a in ("-h", "--help", "-help") for a in argv):
        print(USAGE.format(methods="{" + ",".join(METHODS) + "}"))
        return 0

    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise SystemExit(fail(message))

    parser = _Parser(prog="routezoo merge", add_help=False)
    parser.add_argument("--method", required=True, choices=tuple(METHODS))
    parser.add_argument("--base", required=True)
    parser.add_argument("--from", dest="sources", required=True)
    parser.add_argument("--workdir", required=True)
    for name in ("scale", "density", "top", "bottom"):
        parser.add_argument(f"--{name}", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--combine", default=None, choices=COMBINE)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:   # flag errors: one line, already printed by fail()
        return int(e.code or 0)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    try:
        merge_workdirs(args.method, args.base, sources, args.workdir,
                       **{k: getattr(args, k) for k in FLAGS})
    except MergeError as e:
        return fail(_line(e))
    return 0


__all__ = ["COMPUTE_ONLY_MODEL_KEYS", "MERGE_JSON", "MergeError", "check_output", "main", "merge_workdirs",
           "model_differences"]
