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

One process, two frameworks. With peers on, ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` is set
before jax starts its GPU client (else XLA takes 75% of the card up front), and the scripts
run in this order: the dense ceilings (PyTorch, then JAX), every PyTorch peer, PyTorch's
buffers freed and its cache emptied (:func:`free_torch`), then every routezoo row. XLA's
allocator keeps what it has grown to, so PyTorch never runs after a routezoo row.
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
    neither: on when torch and a CUDA device are available, else off with a note. When on,
    sets ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (unless already set).

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
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return {"on": True, "note": f"peers on: {note}" if usable else f"peers on, forced: {note}, PyTorch on the CPU"}


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
