"""MoE block forward + backward throughput against the dense-matmul ceiling.

For each shape, times ``jit(value_and_grad)`` of the routezoo MoE block (router, permute,
gate/up/down SwiGLU grouped matmuls, unpermute, combine, shared experts) per dispatch
mode and grouped-matmul backend, and reports TFLOP/s counting useful FLOPs only:
``3 x 2·T·k·D·F·3`` (forward + backward of three matmuls per routed copy) plus the shared
experts, against a dense bf16 ``8192^3`` matmul measured in the same process.

    python benchmarks/moe_block.py [--tokens 16384] [--shapes mixtral,deepseek,small] [--out results.json]
        [--queue 3] [--policies default,run3] [--profile]

``--profile`` adds, per case, the device time of every kernel from a profiler trace
(where the block's time goes); ``--dump_hlo DIR`` writes each case's compiled HLO (to
match the profile's fusion names). ``--variants dropless:mosaic`` times the ``mosaic``
backend, with ``--policies`` of ``MOSAIC_POLICIES`` choosing which passes run on the
Mosaic kernels.

Memory: the compiled step's peak (arguments + outputs + scratch, from XLA's
memory analysis) against the analytical minimum (parameters and gradients, input and its
gradient, and the per-copy activations the backward pass needs), as a ratio.

Prints a table and writes JSON. Timing: ``block_until_ready`` after 3 warm-up calls,
median of ``--iters`` calls. Parameters and compute in bf16 (no cast overhead).

The ceiling: a queued bf16 ``n^3`` matmul (``--ceiling_n``, 8192), through XLA and through
cuBLAS (PyTorch, in a child process); every rate is given as % of the higher of the two
(``timing.ceilings``). ``--peers`` (default on when torch and a CUDA device are available)
also times the block a PyTorch user writes (``peers/torch_moe.py``: float32 router, sort,
``torch._grouped_mm``, ``index_add``) at each shape, eager and under ``torch.compile``
(``--no-peer_compile``: eager only), with the same FLOP count and ``--queue``, and prints
routezoo's ratio to each (tokens/s over tokens/s). Order (see ``peers/__init__.py``): the
cuBLAS ceiling and every PyTorch row, each in a child process of its own, then jax in this
process (its ceiling, then the routezoo rows), so each side has the whole card.

CPU smoke run (tiny shapes, PyTorch on the CPU)::

    python benchmarks/moe_block.py --peers --shapes tiny,tiny_shared --tokens 256 \\
        --variants dropless:blocked --iters 2 --ceiling_n 256 --out /tmp/moe_block.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import peers

# decided before jax starts its GPU client; a module importing this one gets no peers
PEERS = peers.decide() if __name__ == "__main__" else {"on": False, "note": "peers off (imported)"}

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from timing import (CEILING_N, CEILING_QUEUE, bench, ceilings, format_ceilings, format_kernel_times,  # noqa: E402
                    torch_ceiling_in_child, traced_kernel_times)

SHAPES = {
    # name: (E, k, D, F, shared experts)
    "mixtral": (8, 2, 4096, 14336, 0),
    "deepseek": (64, 6, 2048, 1408, 2),
    "small": (128, 1, 1024, 4096, 0),
    # CPU smoke runs
    "tiny": (8, 2, 64, 128, 0),
    "tiny_shared": (16, 4, 64, 64, 2),
}
VARIANTS = [
    ("dropless", "ragged_dot", None),
    ("dropless", "blocked", None),
    ("dropless", "pallas", None),
    ("dropless", "mosaic", None),
    ("capacity", "auto", 1.0),
    ("capacity", "auto", 1.25),
]


def _wide(width: int) -> tuple[int, int, int]:
    return (128, 64, 256) if width >= 2048 else (128, 64, 128)


# Grouped-matmul configurations to compare in one process (``--policies``): ``default`` is
# the library's ``gmm_pallas.config_for``; ``run3`` is what run 3 measured (tiling by
# output width, every group size alike); ``nohalf`` the library's without half-height last
# tiles; ``tgmm32`` / ``stages4`` the small-group weight-gradient rule (and 4 stages) for
# every group size; ``tgmm16`` a variant of the small-group rule.
POLICIES = {
    "default": None,
    "run3": lambda m, g, k, n, interpret=False: _gp().GmmConfig(
        tiling=_wide(n), dlhs_tiling=_wide(k), interpret=interpret),
    "nohalf": lambda m, g, k, n, interpret=False: dataclasses.replace(
        _LIBRARY_CONFIG_FOR[0](m, g, k, n, interpret=interpret), half_tiles=False),
    "tgmm32": lambda m, g, k, n, interpret=False: dataclasses.replace(
        _LIBRARY_CONFIG_FOR[0](m, g, k, n, interpret=interpret), tgmm_tiling=(32, 128, 128),
        tgmm_num_stages=4),
    "stages4": lambda m, g, k, n, interpret=False: dataclasses.replace(
        _LIBRARY_CONFIG_FOR[0](m, g, k, n, interpret=interpret), num_stages=4, tgmm_num_stages=4,
        tgmm_tiling=(32, 128, 128)),
    "tgmm16": lambda m, g, k, n, interpret=False: _gp().GmmConfig(
        tiling=_wide(n), dlhs_tiling=_wide(k), tgmm_tiling=(16, 128, 128), num_stages=4,
        tgmm_num_stages=4, interpret=interpret),
}


_LIBRARY_CONFIG_FOR: list = []   # gmm_pallas.config_for before any policy replaced it


def _mosaic(**passes):
    def config_for(m, g, k, n, interpret=False):
        from routezoo.layers.moe.kernels import gmm_mosaic as gm
        t = gm.MosaicTiles()
        return gm.MosaicConfig(**{p: passes.get(p, t) for p in ("fwd", "dlhs", "tgmm")},
                               interpret=interpret)
    return config_for


# ``--policies`` for dropless:mosaic (``gmm_mosaic.config_for`` replaced): which passes run on
# the Mosaic kernels (the others on the Triton kernels of ``gmm_pallas.config_for``).
MOSAIC_POLICIES = {
    "default": None,
    "all": _mosaic(),
    "tgmm_only": _mosaic(fwd=None, dlhs=None),
    "fwd_dlhs": _mosaic(tgmm=None),
    "fwd_only": _mosaic(dlhs=None, tgmm=None),
}


def _gp():
    from routezoo.layers.moe.kernels import gmm_pallas
    if not _LIBRARY_CONFIG_FOR:
        _LIBRARY_CONFIG_FOR.append(gmm_pallas.config_for)
    return gmm_pallas


def moe_case(name: str, tokens: int, dispatch: str, backend: str, cf: float | None, iters: int,
             queue: int = 1, policy: str = "default", profile: bool = False):
    if backend == "mosaic":
        from routezoo.layers.moe.kernels import gmm_mosaic as module
        replacement = MOSAIC_POLICIES[policy]
    else:
        module, replacement = _gp(), POLICIES[policy]
    library_config_for = module.config_for
    if replacement is not None:
        module.config_for = replacement
    try:
        return _moe_case(name, tokens, dispatch, backend, cf, iters, queue, profile)
    finally:
        module.config_for = library_config_for


ROUTER_PRECISION = ["float32"]   # set by --router_precision
HLO_DIR = [""]                   # set by --dump_hlo


def build_step(name: str, tokens: int, dispatch: str, backend: str, cf: float | None):
    """``(step, variables, x)``: the jitted forward + backward of the block at ``name``."""
    from routezoo.configs import base
    from routezoo.layers.moe import moe_from_config

    e, k, d, f, shared = SHAPES[name]
    cfg = base.get_config().model.moe
    cfg.num_experts, cfg.k, cfg.expert_dim, cfg.num_shared_experts = e, k, f, shared
    cfg.shared_expert_dim = f
    cfg.dispatch, cfg.gmm_backend = dispatch, backend
    cfg.capacity_factor = cfg.eval_capacity_factor = cf or 1.0
    cfg.min_capacity = 0
    cfg.group_size = 0
    cfg.jitter = 0.0
    cfg.router_precision = ROUTER_PRECISION[0]
    model = moe_from_config(cfg, d_model=d, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    seq = min(2048, tokens)
    x = jax.random.normal(jax.random.key(2), (tokens // seq, seq, d), jnp.bfloat16)
    variables = jax.jit(lambda: model.init(jax.random.key(0), x, deterministic=True))()

    def loss(v, x):
        y, aux = model.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
        return jnp.sum(y.astype(jnp.float32)) + sum(aux["losses"].values()), aux["stats"]

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)), variables, x


def device_kernel_table(step, args, calls: int = 3, top: int = 15) -> list[dict]:
    """Device time per kernel of ``calls`` calls of ``step(*args)`` (``timing.traced_kernel_times``),
    printed by category and busiest kernel; the sum first, then the ``top`` kernels."""
    jax.block_until_ready(step(*args))

    def run():
        for _ in range(calls):
            out = step(*args)
        jax.block_until_ready(out)

    rows = traced_kernel_times(run, calls, step.lower(*args).compile().as_text())
    print(format_kernel_times(rows, top))
    return [{"sum_ms": sum(r["ms"] for r in rows)}] + rows[:top]


def _moe_case(name, tokens, dispatch, backend, cf, iters, queue, profile=False):
    step, variables, x = build_step(name, tokens, dispatch, backend, cf)
    t = bench(step, variables, x, iters=iters, queue=queue)
    (_, stats), _ = step(variables, x)
    e, k, d, f, shared = SHAPES[name]
    useful = 3 * 2 * tokens * d * f * 3 * (k + shared)
    compiled = step.lower(variables, x).compile()
    if HLO_DIR[0]:
        with open(f"{HLO_DIR[0]}/{name}_{dispatch}_{backend}.hlo.txt", "w") as fh:
            fh.write(compiled.as_text())
    mem = compiled.memory_analysis()
    size = lambda attr: getattr(mem, attr, 0) if mem is not None else 0
    temp = size("temp_size_in_bytes")
    # peak of the compiled step: its inputs, outputs and scratch (XLA's own accounting),
    # against the analytical minimum: parameters + their gradients, x + dx, and what the
    # backward pass must keep per routed copy (the permuted input [T·k, D], gate and up
    # [T·k, F] each, the activation [T·k, F], the expert output [T·k, D]), all bf16.
    peak = size("argument_size_in_bytes") + size("output_size_in_bytes") + temp - size("alias_size_in_bytes")
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables))
    copies = tokens * (k + shared)
    analytic = 2 * (2 * n_params + 2 * tokens * d + copies * (2 * d + 3 * f))
    kernels = device_kernel_table(step, (variables, x), top=30) if profile else None
    return {"shape": name, "dispatch": dispatch, "backend": backend, "capacity_factor": cf,
            "kernels": kernels, "tokens": tokens, "ms": t * 1e3, "tflops": useful / t / 1e12,
            "dropped": float(np.mean(jax.device_get(stats["dropped_fraction"]))),
            "temp_gib": temp / 2 ** 30, "peak_gib": peak / 2 ** 30, "analytic_gib": analytic / 2 ** 30,
            "peak_over_analytic": peak / analytic}


def peer_rows(shapes: list[str], tokens: int, iters: int, queue: int, compile: bool) -> list[dict]:
    """The PyTorch block at every shape, eager then compiled (``peers/torch_moe.py``), each
    row in a child process of its own (``peers.in_child``)."""
    rows = []
    for shape in shapes:
        for compiled in (False, True) if compile else (False,):
            r = peers.in_child("peers.torch_moe", "block_row", name=shape, shape=list(SHAPES[shape]), tokens=tokens,
                               compile=compiled, iters=iters, queue=queue, seq=min(2048, tokens))
            rows.append(r)
            print(json.dumps(r), flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--shapes", default="mixtral,deepseek,small", help=f"of {list(SHAPES)}")
    p.add_argument("--variants", default="all")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="moe_block.json")
    p.add_argument("--queue", type=int, default=1,
                   help="calls per timed sample, issued back to back (timing.call_times); the PyTorch "
                        "block's samples too")
    p.add_argument("--policies", default="default",
                   help=f"grouped-matmul configurations for dropless:pallas, of {list(POLICIES)}, "
                        f"and for dropless:mosaic, of {list(MOSAIC_POLICIES)}")
    p.add_argument("--profile", action="store_true",
                   help="also print each case's device time per kernel (profiler trace)")
    p.add_argument("--router_precision", default="float32", help="moe.router_precision")
    p.add_argument("--dump_hlo", default="", help="directory: write each case's compiled HLO there")
    p.add_argument("--ceiling_n", type=int, default=CEILING_N, help="side of the square ceiling matmul")
    p.add_argument("--ceiling_queue", type=int, default=CEILING_QUEUE, help="ceiling matmuls per timed sample")
    peers.add_flag(p)
    p.add_argument("--peer_compile", action=argparse.BooleanOptionalAction, default=True,
                   help="time the PyTorch block under torch.compile too")
    a = p.parse_args()
    ROUTER_PRECISION[0] = a.router_precision
    HLO_DIR[0] = a.dump_hlo
    shapes = a.shapes.split(",")
    print(PEERS["note"], flush=True)
    # every PyTorch measurement first, each in a child process, then jax (peers/__init__.py)
    torch_ceil = torch_ceiling_in_child(a.ceiling_n, a.iters, a.ceiling_queue) if PEERS["on"] else None
    torch_rows = peer_rows(shapes, a.tokens, a.iters, a.queue, a.peer_compile) if PEERS["on"] else []
    ceil = ceilings(a.ceiling_n, a.iters, a.ceiling_queue, torch_tflops=torch_ceil)
    ceiling = ceil["max"]
    print(format_ceilings(ceil), flush=True)
    for r in torch_rows:
        if "tflops" in r:
            r["pct_ceiling"] = 100 * r["tflops"] / ceiling
    rows = []
    for shape in shapes:
        for dispatch, backend, cf in VARIANTS:
            if a.variants != "all" and f"{dispatch}:{backend}" not in a.variants.split(","):
                continue
            if (dispatch, backend) == ("dropless", "pallas"):
                policies = [q for q in a.policies.split(",") if q in POLICIES]
            elif (dispatch, backend) == ("dropless", "mosaic"):
                policies = [q for q in a.policies.split(",") if q in MOSAIC_POLICIES]
            else:
                policies = ["default"]
            for policy in policies:
                try:
                    r = moe_case(shape, a.tokens, dispatch, backend, cf, a.iters, a.queue, policy,
                                 a.profile)
                except Exception as e:  # noqa: BLE001 - report and go on (e.g. out of memory)
                    r = {"shape": shape, "dispatch": dispatch, "backend": backend, "capacity_factor": cf,
                         "error": " ".join(str(e).split())[:200]}
                r["ceiling_tflops"], r["policy"] = ceiling, policy
                if "tflops" in r:
                    r["pct_ceiling"] = 100 * r["tflops"] / ceiling
                    # routezoo's tokens/s over the PyTorch block's, same shape and tokens
                    for t in torch_rows:
                        if t["shape"] == shape and "ms" in t:
                            r[f"vs_torch_{t['block']}"] = t["ms"] / r["ms"]
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "kernels"}), flush=True)
    info = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "ceiling_tflops": ceiling,
            "ceilings": ceil, "iters": a.iters, "queue": a.queue, "tokens": a.tokens,
            "router_precision": a.router_precision, "peers": PEERS["note"]}
    if PEERS["on"]:
        info["torch_versions"] = peers.versions()
    with open(a.out, "w") as fh:
        json.dump({"info": info, "rows": rows, "torch_rows": torch_rows}, fh, indent=1)
    print(f"\n{info['device']}, jax {info['jax']}, tokens {a.tokens}; {format_ceilings(ceil)}")
    if PEERS["on"]:
        print(f"PyTorch peers: {info['torch_versions']}")
    vs = [b for b in ("eager", "compiled") if any(t.get("block") == b for t in torch_rows)]
    print(f"{'shape':11} {'dispatch':9} {'backend':11} {'policy':8} {'cf':>5} {'ms':>8} {'TFLOP/s':>8} {'% ceil':>7} "
          f"{'dropped':>8} {'temp GiB':>8} {'peak GiB':>8} {'/analytic':>9}"
          + "".join(f" {'x torch ' + b:>16}" for b in vs))
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:11} {r['dispatch']:9} {r['backend']:11} {r['policy']:8} {'':>5} "
                  f"ERROR {r['error'][:80]}")
            continue
        cf = f"{r['capacity_factor']:.2f}" if r["capacity_factor"] else "-"
        ratios = "".join(f" {r[f'vs_torch_{b}']:15.2f}x" if f"vs_torch_{b}" in r else f" {'-':>16}" for b in vs)
        print(f"{r['shape']:11} {r['dispatch']:9} {r['backend']:11} {r['policy']:8} {cf:>5} {r['ms']:8.2f} "
              f"{r['tflops']:8.1f} {r['pct_ceiling']:6.1f}% {r['dropped']:8.3f} {r['temp_gib']:8.2f} "
              f"{r['peak_gib']:8.2f} {r['peak_over_analytic']:9.2f}{ratios}")
    if torch_rows:
        print("\nPyTorch block (peers/torch_moe.py), same tokens and FLOP count")
        print(f"{'shape':11} {'block':9} {'grouped matmul':18} {'ms':>8} {'TFLOP/s':>8} {'% ceil':>7} {'peak GiB':>8}")
        for t in torch_rows:
            if "error" in t:
                print(f"{t['shape']:11} {t['block']:9} {t['grouped_mm']:18} ERROR {t['error'][:80]}")
                continue
            peak = f"{t['peak_gib']:8.2f}" if "peak_gib" in t else f"{'-':>8}"
            print(f"{t['shape']:11} {t['block']:9} {t['grouped_mm']:18} {t['ms']:8.2f} {t['tflops']:8.1f} "
                  f"{t['pct_ceiling']:6.1f}% {peak}")


if __name__ == "__main__":
    main()
