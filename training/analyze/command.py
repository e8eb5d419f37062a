"""The ``routezoo analyze`` command: a workdir's newest checkpoint in, the report out."""

from __future__ import annotations

import os
import sys
from typing import Any

import jax

from routezoo.training.analyze.accumulate import RoutingAccumulator
from routezoo.training.analyze.capture import drop_settings, make_forward, moe_layer_indices
from routezoo.training.analyze.report import write_report

USAGE = """usage: routezoo analyze --workdir DIR [--steps N] [--top N] [--min-count N] [--out DIR]

  --workdir DIR: a training workdir (config.json + checkpoints/); its newest intact
      checkpoint is analysed (a corrupt newer step is reported and skipped).
  --steps N: validation batches to run (default: the run's train.eval_steps).
  --top N: token ids listed per expert and most/least specialised token ids (default 10).
  --min-count N: a token id needs this many occurrences to enter the most/least
      specialised lists (default 10).
  --out DIR: output folder (default: WORKDIR/analysis).

Writes CSV tables, PNG plots and summary.json (see routezoo.training.analyze).
"""


class AnalyzeError(Exception):
    """A problem with the workdir or the model, reported as one line (exit 2)."""


def read_run_config(workdir: str):
    """The resolved config of a run, read by :func:`training.train.read_workdir_config`;
    a missing ``config.json`` is an :class:`AnalyzeError`."""
    from routezoo.training.train import read_workdir_config
    try:
        return read_workdir_config(workdir)
    except (FileNotFoundError, ValueError) as e:   # missing, or not JSON (the message names the file)
        raise AnalyzeError(str(e)) from None


def analyze(workdir: str, *, steps: int | None = None, top: int = 10, min_count: int = 10,
            out_dir: str | None = None, log=print) -> dict[str, Any]:
    """Analyses the routing of ``workdir``'s newest checkpoint; returns the summary.

    Raises :class:`AnalyzeError` (one line) for a workdir without config, MoE layers or
    checkpoint.
    """
    from flax import linen as nn
    from jax.sharding import NamedSharding

    from routezoo.layers import sharding as shd
    from routezoo.training import data as data_lib
    from routezoo.training.train import load_trained, mesh_and_rules, to_global

    workdir = os.path.abspath(workdir)
    config = read_run_config(workdir)
    try:
        layers = moe_layer_indices(config.model)
    except ValueError as e:
        raise AnalyzeError(str(e)) from None
    if not layers:
        raise AnalyzeError(f"the model in {workdir} has no MoE layers (model.ffn={config.model.ffn!r}); "
                           f"routing analysis needs at least one")
    from routezoo.layers.routers import router_class
    try:
        router_cls = router_class(str(config.model.moe.router))
    except ValueError as e:
        raise AnalyzeError(str(e)) from None
    if not router_cls.makes_expert_choices:   # routers whose layers make no token-to-expert choices
        raise AnalyzeError(router_cls.analysis_note or f"moe.router={config.model.moe.router!r} makes no "
                           "token-to-expert decisions to analyse")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir) or not any(n.isdigit() for n in os.listdir(ckpt_dir)):
        raise AnalyzeError(f"no checkpoint in {ckpt_dir}")
    if jax.process_count() > 1:
        raise AnalyzeError("analyze runs in a single process")
    try:   # the newest intact checkpoint: a corrupt newer step is reported through log and skipped
        config, model, state = load_trained(workdir, log=log)
    except (FileNotFoundError, ValueError) as e:
        raise AnalyzeError(" ".join(str(e).split())) from None
    if steps is not None:
        config.train.eval_steps = int(steps)
    moe_cfg = config.model.moe
    seq_len = int(config.data.seq_len)
    group = int(moe_cfg.group_size) or seq_len
    data_lib.ensure_dataset(config.data)
    tokenizer = data_lib.get_tokenizer(config.data)
    batches = data_lib.eval_batches(config)

    mesh, rules = mesh_and_rules(config)
    forward = make_forward(model, moe_cfg, seq_len)
    acc, settings = None, None
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batch_sharding = NamedSharding(mesh, shd.batch_spec(2))
        for local in batches:
            inputs = to_global({"inputs": local["inputs"]}, batch_sharding)["inputs"]
            decisions = jax.device_get(forward(state.params, state.model_state, inputs))
            if acc is None:
                k = next(iter(decisions.values()))["indices"].shape[-1]
                settings = drop_settings(moe_cfg, group, k)
                from routezoo.layers.moe.block import logical_num_experts   # router outputs (expert_map)
                acc = RoutingAccumulator(sorted(decisions), logical_num_experts(moe_cfg),
                                         int(config.model.vocab_size), seq_len,
                                         [s for s, _, _ in settings], tokenizer.pad_id)
            acc.add(local["inputs"], decisions)
    if acc is None:
        raise AnalyzeError("no validation batches to analyse (--steps must be >= 1)")
    missing = sorted(set(layers) - set(acc.layers))
    if missing:
        raise AnalyzeError(f"no routing captured for MoE layer(s) {missing}")
    meta = {
        "workdir": workdir,
        "checkpoint_step": int(jax.device_get(state.step)),
        "router": str(moe_cfg.router),
        "dispatch": str(moe_cfg.dispatch),
        "num_experts": int(moe_cfg.num_experts),
        "k": int(moe_cfg.k),
        "moe_layers": [f"layer{i}" for i in acc.layers],
        "seq_len": seq_len,
        "group_size": group,
    }
    out_dir = out_dir or os.path.join(workdir, "analysis")
    summary = write_report(acc, out_dir, tokenizer=tokenizer, settings=settings, meta=meta,
                           top=top, min_count=min_count)
    m = summary["mean_over_layers"]
    drops = ", ".join(f"drop rate ({k.split('/')[1]}) {v:.3g}" for k, v in m.items() if k.startswith("drop_rate/"))
    log(f"analysed {summary['tokens']} tokens ({summary['batches']} batches) at step "
        f"{summary['checkpoint_step']}: max load / mean {m['load_max_over_mean']:.3g}, experts per token "
        f"{m['experts_per_token']:.3g}, token-id information {m['token_information_fraction']:.3g} of "
        f"H(expert), {drops}; outputs in {out_dir}")
    return summary


def main(argv: list[str]) -> int:
    """``routezoo analyze`` flags -> exit code (2 with one line on stderr for any problem)."""
    import argparse

    def fail(message: str) -> int:
        print(f"routezoo: error: analyze: {message}", file=sys.stderr)
        return 2

    if any(a in ("-h", "--help", "-help") for a in argv):
        print(USAGE)
        return 0

    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise SystemExit(fail(message))

    def positive(v: str) -> int:
        n = int(v)
        if n < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
        return n

    parser = _Parser(prog="routezoo analyze", add_help=False)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=positive, default=None)
    parser.add_argument("--top", type=positive, default=10)
    parser.add_argument("--min-count", "--min_count", dest="min_count", type=positive, default=10)
    parser.add_argument("--out", default=None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:   # flag errors: one line, already printed by fail()
        return int(e.code or 0)
    try:
        analyze(args.workdir, steps=args.steps, top=args.top, min_count=args.min_count, out_dir=args.out)
    except AnalyzeError as e:
        return fail(" ".join(str(e).split()))
    return 0
