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


def parse_train_flags(argv: list[str]):
    """(config, workdir, stop_after) from ``train`` flags; SystemExit(2) on any problem."""
    from absl import flags
    from ml_collections import config_flags

    argv = _resolve_config_arg(argv)
    if any(a in ("-h", "--help", "-help") for a in argv):
        print("usage: routezoo train [--config FILE|NAME] --workdir DIR [--config.a.b=value ...]\n")
        print("  --config: config file (get_config()) or name of a shipped config; default: default")
        print("  --workdir: directory for checkpoints, metrics.jsonl, TensorBoard events, plots")
        print("  --config.KEY=VALUE: override any key of the config, e.g. --config.train.steps=100")
        print("  --stop_after=N: leave after N steps of this run (checkpoint saved); run again to resume")
        raise SystemExit(0)
    _check_override_keys(argv)
    fv = flags.FlagValues()
    try:
        config_flags.DEFINE_config_file(
            "config", default=os.path.join(_configs_dir(), "default.py"),
            help_string="config file (get_config()) or name of a shipped config", flag_values=fv,
            lock_config=True, sys_argv=["routezoo train", *argv])
        flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics, plots", flag_values=fv)
        flags.DEFINE_integer("stop_after", None, "leave after this many steps (checkpoint saved); "
                             "running again resumes", flag_values=fv)
        fv(["routezoo train", *argv])
        config = fv.config
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - absl and config_flags raise many types
        msg = " ".join(str(e).split()) or type(e).__name__
        raise SystemExit(_fail(msg[:500])) from None
    if not fv.workdir:
        raise SystemExit(_fail("--workdir is required"))
    return config, fv.workdir, fv.stop_after


def train_main(argv: list[str]) -> int:
    from routezoo.training import config_check

    config, workdir, stop_after = parse_train_flags(argv)
    from routezoo.training.train import maybe_initialize_distributed
    maybe_initialize_distributed()   # before anything touches the XLA backend
    try:
        config_check.validate(config)
    except config_check.ConfigError as e:
        return _fail(str(e))
    from routezoo.training.train import train_and_evaluate
    result = train_and_evaluate(config, workdir, stop_after=stop_after)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in result.items()
                        if k in ("step", "loss", "eval_loss", "eval_bits_per_byte"))
    print(f"done: {summary}; outputs in {os.path.abspath(workdir)}")
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {"train": train_main}


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
