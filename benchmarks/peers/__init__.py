"""PyTorch peers for the benchmark scripts: what a PyTorch user would run instead of routezoo.

* :mod:`peers.torch_moe`: the MoE block a PyTorch user writes (float32 router, sort by
  expert, ``torch._grouped_mm``, weighted ``index_add_``), eager and under ``torch.compile``;
  ``python benchmarks/peers/torch_moe.py --check`` compares it with routezoo's block in
  float32 on the CPU.
* :mod:`peers.hf_mixtral`: transformers' ``MixtralForCausalLM`` of a routezoo config's
  shape: one compiled training step (fastest experts backend) and static-cache ``generate``.

``moe_block.py``, ``train_step.py`` and ``decode.py`` take ``--peers`` / ``--no-peers``;
:func:`decide` reads them before jax is imported. Nothing here imports torch at import
time.

Two processes, two frameworks. Every PyTorch measurement (the cuBLAS ceiling, the block,
the transformers model) runs in a child process of its own (:func:`in_child`), one after
another and before jax starts its GPU client in the script's process. So each side has the
whole card, PyTorch's caches (compiled graphs, CUDA-graph pools) end with its process, and
routezoo runs with jax's own defaults (XLA preallocates 75% of the card); nothing in the
script's process holds GPU memory for the other framework.
"""

from __future__ import annotations

import argparse
import os
import sys


def torch_gpu() -> tuple[bool, str]:
    """``(usable, note)``: whether torch imports and sees a CUDA device."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure means no peers
        return False, f"torch not importable ({type(e).__name__})"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device"
    return True, f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}"


def add_flag(p: argparse.ArgumentParser) -> None:
    """``--peers`` / ``--no-peers`` on a script's parser (the value :func:`decide` saw)."""
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the PyTorch peers (default: on when torch and a CUDA device are "
                        "available; --peers forces them on, e.g. on the CPU at tiny shapes)")


def decide(argv: list[str] | None = None) -> dict:
    """Whether this run times the PyTorch peers; call before jax is imported.

    ``--peers`` forces them on (PyTorch on the CPU if there is no GPU), ``--no-peers`` off;
    neither: on when torch and a CUDA device are available, else off with a note. It looks
    for the device without creating a CUDA context in this process.

    Returns:
      ``{'on': bool, 'note': str}``.
    """
    p = argparse.ArgumentParser(add_help=False)
    add_flag(p)
    asked = p.parse_known_args(sys.argv[1:] if argv is None else argv)[0].peers
    if asked is False:
        return {"on": False, "note": "peers off (--no-peers)"}
    usable, note = torch_gpu()
    if asked is None and not usable:
        return {"on": False, "note": f"peers off: {note} (--peers forces them on)"}
    return {"on": True, "note": f"peers on: {note}" if usable else f"peers on, forced: {note}, PyTorch on the CPU"}


def in_child(module: str, func: str, **kwargs):
    """``module.func(**kwargs)`` in a fresh Python process; returns its result.

    ``module`` is a module path importable from ``benchmarks/`` (``peers.torch_moe``,
    ``timing``); keyword values must be JSON-serialisable, except ``model_cfg``, an
    ``ml_collections`` config sent as a dict. The child's output streams through; its
    result comes back as JSON (through a file, not its stdout), so a row logged by the child
    is also printed here as it happens. A child that fails raises ``RuntimeError`` naming
    the call and its exit status.
    """
    import json
    import subprocess
    import tempfile

    if "model_cfg" in kwargs and hasattr(kwargs["model_cfg"], "to_dict"):
        kwargs = {**kwargs, "model_cfg": kwargs["model_cfg"].to_dict()}
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        code = _CHILD.format(here=here, module=module, func=func, out=out)
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], check=False)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"{module}.{func} in a child process exited with status {proc.returncode}")
        with open(out) as f:
            return json.load(f)


_CHILD = """
import importlib, inspect, json, sys
sys.path.insert(0, {here!r})
kwargs = json.loads(sys.argv[1])
if "model_cfg" in kwargs:
    import ml_collections
    kwargs["model_cfg"] = ml_collections.ConfigDict(kwargs["model_cfg"])
fn = getattr(importlib.import_module({module!r}), {func!r})
if "log" in inspect.signature(fn).parameters:
    kwargs["log"] = lambda r: print(json.dumps(r, default=float), flush=True)
result = fn(**kwargs)
with open({out!r}, "w") as f:
    json.dump(result, f, default=float)
"""


def free_torch() -> None:
    """Releases what PyTorch holds: compiled graphs, collected tensors, the CUDA cache."""
    import gc

    import torch
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def versions() -> str:
    """``torch X, transformers Y`` (whichever import)."""
    out = []
    for name in ("torch", "transformers"):
        try:
            out.append(f"{name} {__import__(name).__version__}")
        except Exception:  # noqa: BLE001
            pass
    return ", ".join(out)
