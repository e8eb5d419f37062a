"""Pallas-Triton grouped matmul (``routezoo.layers.moe.kernels.gmm_pallas``) against the dense
matmul and a perfectly balanced batched einsum, on GPU.

For each shape ``(E experts, M rows, K, N)`` (bf16 in, f32 accumulation, bf16 out) it
times, with random balanced-ish group sizes (multinomial, equal probabilities):

* ``dense``: ``[M, K] @ [K, N]`` (the same FLOPs, no grouping: the ceiling);
* ``einsum``: ``[E, M/E, K] x [E, K, N]`` (perfectly balanced groups, capacity dispatch);
* ``gmm``: for several tilings ``(bm, bk, bn)``, ``num_warps``, ``num_stages``:
  forward, the backward data matmul ``d_lhs = gmm(d_out, rhs^T)`` alone, and forward +
  backward (``jax.vjp``: ``gmm``, ``gmm^T``, ``tgmm``);
* ``tgmm`` alone (the weight gradient) for several tilings;
* the ``mosaic`` backend (``routezoo.layers.moe.kernels.gmm_mosaic``: jax's own Mosaic GPU
  Hopper kernels ``ragged_dot_mgpu`` / ``transposed_ragged_dot_mgpu`` under routezoo's VJP)
  for several tiles, each pass alone and forward + backward, and the hybrid of Triton
  forward / backward data with the Mosaic weight gradient.

Useful FLOPs: ``2·M·K·N`` per matmul (forward), ``3x`` for forward + backward. ``% dense``
is against the dense matmul of the same shape and mode, measured in the same process;
the ``8192^3`` dense rate is printed as well. Timing: after 3 warm-up calls, median of
``--iters`` samples of ``--queue`` calls issued back to back (``timing.call_times``). A correctness check (bf16 and f32 against a masked
dense reference, empty groups and rows past the end included) runs first. Each case is
in its own try/except; failures are printed and recorded, the rest goes on.

    python3 benchmarks/gmm_kernel.py --out gmm_kernel.json [--shapes mixtral,deepseek,small]
        [--iters 10] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from timing import bench, dense_ceiling

SHAPES = {
    # name: (E, M, K, N)
    "mixtral": (8, 32768, 4096, 14336),
    "deepseek": (64, 98304, 2048, 1408),
    "small": (128, 16384, 1024, 4096),
    "small_down": (128, 16384, 4096, 1024),   # the down projection of "small"
    "small32k": (128, 32768, 1024, 4096),     # "small" at 32k tokens (256 rows per group)
    "tiny": (4, 512, 128, 256),   # smoke test only (runs interpreted on CPU)
}
DEFAULT_SHAPES = "mixtral,deepseek,small"
# (bm, bk, bn), num_warps, num_stages
GMM_CONFIGS = [
    ((128, 64, 128), 4, 3),
    ((128, 64, 128), 8, 3),
    ((128, 64, 128), 4, 4),
    ((128, 64, 256), 8, 3),
    ((128, 64, 256), 8, 4),
    ((64, 64, 128), 4, 3),
    ((64, 64, 256), 4, 4),
    ((128, 32, 128), 4, 4),
    ((256, 64, 128), 8, 3),
    ((64, 64, 256), 8, 3),
    ((64, 128, 128), 4, 3),
    ((128, 64, 128), 8, 4),
]
GMM_CONFIGS_QUICK = [GMM_CONFIGS[0], GMM_CONFIGS[3], GMM_CONFIGS[5]]
# tgmm: (bm rows per step, bk, bn), num_warps, num_stages
TGMM_CONFIGS = [
    ((128, 128, 128), 4, 3),
    ((128, 128, 128), 8, 3),
    ((64, 128, 128), 4, 3),
    ((64, 128, 128), 4, 4),
    ((32, 128, 128), 4, 4),
    ((128, 64, 128), 4, 3),
    ((64, 128, 256), 8, 3),
    ((64, 256, 128), 8, 3),
    ((32, 128, 256), 8, 3),
    ((32, 128, 128), 4, 5),
    ((32, 128, 128), 8, 4),
    ((32, 64, 128), 4, 4),
    ((16, 128, 128), 4, 4),
]
TGMM_CONFIGS_QUICK = [TGMM_CONFIGS[0], TGMM_CONFIGS[2]]


# Mosaic tiles swept by default: (block_m, block_n, block_k, steps in flight, grid_block_n)
DEFAULT_MOSAIC_TILES = "128,128,64,4,1;128,128,64,4,4;64,128,64,5,2"


def _mosaic_tiles(spec: str):
    from routezoo.layers.moe.kernels.gmm_mosaic import MosaicTiles
    return [MosaicTiles(*map(int, t.split(","))) for t in spec.split(";") if t]


MOSAIC_TILES: list = []   # filled in main()


INTERPRET = False   # set in main(): True off GPU (smoke runs of --shapes tiny on CPU)


def fwd_bwd(f):
    """``(x, w, ct) -> (out, dx, dw)``: the forward and both cotangents."""
    def run(x, w, ct):
        out, vjp = jax.vjp(f, x, w)
        return (out, *vjp(ct))
    return jax.jit(run)


def group_sizes_for(e: int, m: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).multinomial(m, np.full(e, 1.0 / e)).astype(np.int32)


def correctness_check(gmm, dtypes=(jnp.bfloat16, jnp.float32)) -> dict:
    """Small bf16 and f32 problems against a masked dense reference (f32 maths);
    ``gmm(lhs, rhs, group_sizes)``."""
    m, k, n, e = 4096, 512, 768, 8
    sizes = np.array([700, 0, 512, 1000, 0, 333, 900, 300], np.int32)   # sum 3745 < m
    rx, rw, rc = jax.random.split(jax.random.key(7), 3)
    out = {}
    for dtype in dtypes:
        x = jax.random.normal(rx, (m, k), dtype)
        w = jax.random.normal(rw, (e, k, n), dtype)
        ct = jax.random.normal(rc, (m, n), dtype)
        gs = jnp.asarray(sizes)

        def ref(x, w):
            ends = jnp.cumsum(gs)
            g = jnp.searchsorted(ends, jnp.arange(m), side="right")
            mask = jax.nn.one_hot(g, e, dtype=jnp.float32)
            y = jnp.einsum("MK,EKN->MEN", x.astype(jnp.float32), w.astype(jnp.float32),
                           precision="highest")
            return jnp.einsum("MEN,ME->MN", y, mask, precision="highest")

        got = fwd_bwd(lambda a, b: gmm(a, b, gs))(x, w, ct)
        want = fwd_bwd(ref)(x, w, ct.astype(jnp.float32))
        errs = {}
        for name, a, b in zip(("out", "d_lhs", "d_rhs"), got, want):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            errs[name] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
        total = int(sizes.sum())
        errs["tail_rows_zero"] = bool(np.all(np.asarray(got[0])[total:] == 0)
                                      and np.all(np.asarray(got[1])[total:] == 0))
        errs["empty_groups_zero"] = bool(np.all(np.asarray(got[2])[[1, 4]] == 0))
        out[jnp.dtype(dtype).name] = errs
    return out


def pct(x, ref):
    return None if x is None or ref is None else 100.0 * x / ref


def run_triton_sweeps(name, e, m, k, n, args, gp, gs, x, w, ct, record):
    """Every tiling of GMM_CONFIGS (forward, backward data, both) and TGMM_CONFIGS."""
    configs = GMM_CONFIGS_QUICK if args.quick else GMM_CONFIGS
    for tiling, warps, stages in configs:
        label = f"gmm {tiling} w{warps} s{stages}"
        extra = {"tiling": tiling, "num_warps": warps, "num_stages": stages}

        def f(a, b, tiling=tiling, warps=warps, stages=stages):
            return gp.gmm(a, b, gs, tiling=tiling, num_warps=warps, num_stages=stages,
                          interpret=INTERPRET)
        record(label, "fwd", jax.jit(f), x, w, extra=extra)
        cfg = gp.GmmConfig(tiling=tiling, num_warps=warps, num_stages=stages,
                           interpret=INTERPRET)
        dlhs = jax.jit(lambda d, b, cfg=cfg: gp._gmm_call(d, b, gs, tiling=cfg.tiling, cfg=cfg,
                                                          transpose_rhs=True))
        record(label, "dlhs", dlhs, ct, w, extra=extra)
        record(label, "fwdbwd", fwd_bwd(f), x, w, ct, mult=3, extra=extra)

    for tiling, warps, stages in (TGMM_CONFIGS_QUICK if args.quick else TGMM_CONFIGS):
        t = jax.jit(lambda a, d, tiling=tiling, warps=warps, stages=stages:
                    gp.tgmm(a, d, gs, tiling=tiling, num_warps=warps, num_stages=stages,
                            interpret=INTERPRET))
        record(f"tgmm {tiling} w{warps} s{stages}", "tgmm", t, x, ct,
               extra={"tiling": tiling, "num_warps": warps, "num_stages": stages})



def run_shape(name, e, m, k, n, args, gp, rows):
    gs_np = group_sizes_for(e, m)
    gs = jnp.asarray(gs_np)
    kx, kw, kc = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (e, k, n), jnp.bfloat16) * (k ** -0.5)
    ct = jax.random.normal(kc, (m, n), jnp.bfloat16)
    flops = 2.0 * m * k * n
    iters = args.iters
    print(f"\n== {name}: E={e} M={m} K={k} N={n}  group sizes min/max "
          f"{gs_np.min()}/{gs_np.max()} (mean {m / e:.0f})", flush=True)
    base: dict[str, float | None] = {"fwd": None, "fwdbwd": None}
    rows.append({"shape": name, "E": e, "M": m, "K": k, "N": n, "variant": "group_sizes",
                 "sizes": gs_np.tolist()})

    def record(variant, mode, fn, *fargs, mult=1.0, ref_mode=None, extra=None):
        row = {"shape": name, "E": e, "M": m, "K": k, "N": n, "variant": variant, "mode": mode}
        row.update(extra or {})
        try:
            t = bench(fn, *fargs, iters=iters, queue=args.queue)
            tf = mult * flops / t / 1e12
            row.update(ms=t * 1e3, tflops=tf, pct_dense=pct(tf, base.get(ref_mode or mode)))
        except Exception as exc:  # noqa: BLE001 - one failure must not stop the rest
            row.update(error=f"{type(exc).__name__}: {exc}"[:2000],
                       traceback=traceback.format_exc()[-4000:])
        rows.append(row)
        if "error" in row:
            print(f"  {variant:<44} {mode:<7} FAILED {row['error'][:300]}", flush=True)
        else:
            p = row["pct_dense"]
            print(f"  {variant:<44} {mode:<7} {row['ms']:9.3f} ms {row['tflops']:7.1f} TF/s"
                  f"  {'' if p is None else f'{p:5.1f}% dense'}", flush=True)
        return row

    # Dense ceiling of the same shape, and the balanced batched einsum.
    w0 = w[0]
    r = record("dense [M,K]@[K,N]", "fwd", jax.jit(lambda a, b: a @ b), x, w0)
    base["fwd"] = r.get("tflops")
    r = record("dense [M,K]@[K,N]", "fwdbwd", fwd_bwd(lambda a, b: a @ b), x, w0, ct, mult=3)
    base["fwdbwd"] = r.get("tflops")
    base["dlhs"] = base["tgmm"] = base["fwd"]

    def einsum(a, b):
        return jnp.einsum("EMK,EKN->EMN", a.reshape(e, m // e, k), b).reshape(m, n)
    record("einsum balanced [E,M/E,K]x[E,K,N]", "fwd", jax.jit(einsum), x, w)
    record("einsum balanced [E,M/E,K]x[E,K,N]", "fwdbwd", fwd_bwd(einsum), x, w, ct, mult=3)

    # The library's own configuration (gmm_pallas.config_for), with and without half-height
    # last tiles.
    for half in (True, False):
        cfg = dataclasses.replace(gp.config_for(m, e, k, n, interpret=INTERPRET), half_tiles=half)
        label = f"config_for half_tiles={half}"
        f = lambda a, b, cfg=cfg: gp.gmm(a, b, gs, config=cfg)   # noqa: E731
        record(label, "fwd", jax.jit(f), x, w, extra={"half_tiles": half})
        dlhs = jax.jit(lambda d, b, cfg=cfg: gp._gmm_call(d, b, gs, tiling=cfg.dlhs_tiling or cfg.tiling,
                                                          cfg=cfg, transpose_rhs=True))
        record(label, "dlhs", dlhs, ct, w, extra={"half_tiles": half})
        record(label, "fwdbwd", fwd_bwd(f), x, w, ct, mult=3, extra={"half_tiles": half})
        tg = jax.jit(lambda a, d, cfg=cfg: gp._tgmm_call(a, d, gs, e, cfg=cfg, out_dtype=a.dtype))
        record(label, "tgmm", tg, x, ct, extra={"half_tiles": half})
    if not args.only_config_for:
        run_triton_sweeps(name, e, m, k, n, args, gp, gs, x, w, ct, record)

    if not args.skip_mgpu:   # jax's Mosaic GPU (Hopper) kernels: routezoo's gmm_mosaic
        from routezoo.layers.moe.kernels import gmm_mosaic as gm
        for t in MOSAIC_TILES:
            label = f"mosaic {dataclasses.astuple(t)}"
            extra = {"mosaic_tiles": dataclasses.astuple(t)}
            cfg = gm.MosaicConfig(fwd=t, dlhs=t, tgmm=t)
            modes = args.mosaic_modes.split(",")
            if "fwd" in modes:
                f = jax.jit(lambda a, b, cfg=cfg: gm.gmm(a, b, gs, config=cfg))
                record(label, "fwd", f, x, w, extra=extra)
            if "dlhs" in modes:
                dl = jax.jit(lambda d, b, t=t: gm.rows_in_groups(gm._mosaic_ragged_dot(
                    d, b, gs, t, transpose_rhs=True, interpret=False), gs))
                record(label, "dlhs", dl, ct, w, extra=extra)
            if "tgmm" in modes:
                tg = jax.jit(lambda a, d, t=t: gm.tgmm(a, d, gs, tiles=t))
                record(label, "tgmm", tg, x, ct, extra=extra)
            if "fwdbwd" in modes:
                record(label, "fwdbwd", fwd_bwd(lambda a, b, cfg=cfg: gm.gmm(a, b, gs, config=cfg)),
                       x, w, ct, mult=3, extra=extra)
        # Triton forward and backward data, Mosaic weight gradient (the first tiles).
        cfg = gm.MosaicConfig(fwd=None, dlhs=None, tgmm=MOSAIC_TILES[0])
        record("hybrid: triton fwd/dlhs + mosaic tgmm", "fwdbwd",
               fwd_bwd(lambda a, b: gm.gmm(a, b, gs, config=cfg)), x, w, ct, mult=3)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gmm_kernel.json")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"of {list(SHAPES)}")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--queue", type=int, default=10,
                   help="calls per timed sample, issued back to back (timing.call_times)")
    p.add_argument("--quick", action="store_true", help="3 gmm and 2 tgmm configurations")
    p.add_argument("--skip-mgpu", action="store_true", help="skip jax's Mosaic GPU kernels")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--mosaic-tiles", default=DEFAULT_MOSAIC_TILES,
                   help="Mosaic tiles to sweep, ';'-separated 'block_m,block_n,block_k,steps,grid_block_n'")
    p.add_argument("--mosaic-modes", default="fwd,dlhs,tgmm,fwdbwd",
                   help="which Mosaic passes to time per tile (of fwd,dlhs,tgmm,fwdbwd)")
    p.add_argument("--only-config-for", action="store_true",
                   help="of the Triton kernels, time only the library's configuration "
                        "(half tiles on and off)")
    args = p.parse_args()

    from routezoo.layers.moe.kernels import gmm_pallas as gp
    MOSAIC_TILES[:] = _mosaic_tiles(args.mosaic_tiles)

    dev = jax.devices()[0]
    info = {"device": getattr(dev, "device_kind", str(dev)), "backend": jax.default_backend(),
            "jax": jax.__version__, "python": platform.python_version(),
            "iters": args.iters, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(json.dumps(info), flush=True)
    global INTERPRET
    INTERPRET = jax.default_backend() != "gpu"
    if INTERPRET:
        print("warning: not on a GPU: Pallas kernels run interpreted (smoke test only), "
              "no 8192^3 ceiling, no Mosaic GPU kernels")
        args.skip_mgpu = True
    rows: list[dict] = []
    result = {"info": info, "rows": rows}

    def save():
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1, default=str)

    if not args.skip_check:
        checks = [("check", lambda a, b, gs: gp.gmm(a, b, gs, interpret=INTERPRET),
                   (jnp.bfloat16, jnp.float32))]
        if not args.skip_mgpu:   # Mosaic: bf16 only (its kernels take 16-bit operands)
            from routezoo.layers.moe.kernels import gmm_mosaic as gm
            checks.append(("check_mosaic", gm.gmm, (jnp.bfloat16,)))
        for key, fn, dtypes in checks:
            try:
                result[key] = correctness_check(fn, dtypes)
            except Exception as exc:  # noqa: BLE001
                result[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                               "traceback": traceback.format_exc()[-4000:]}
            print(f"correctness ({key}):", json.dumps(result[key])[:3000], flush=True)
        save()
    try:
        if INTERPRET:
            raise RuntimeError("skipped off GPU")
        info["dense_8192_tflops"] = dense_ceiling(args.iters, queue=args.queue)
        print(f"dense bf16 8192^3: {info['dense_8192_tflops']:.1f} TFLOP/s", flush=True)
    except Exception as exc:  # noqa: BLE001
        info["dense_8192_error"] = repr(exc)

    for name in args.shapes.split(","):
        e, m, k, n = SHAPES[name]
        try:
            run_shape(name, e, m, k, n, args, gp, rows)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory creating the inputs
            rows.append({"shape": name, "error": f"{type(exc).__name__}: {exc}"[:2000],
                         "traceback": traceback.format_exc()[-4000:]})
            print(f"shape {name} FAILED: {exc!r}"[:500], flush=True)
        save()

    # Summary: best gmm configuration per shape and mode.
    print("\n== best gmm configuration per shape and mode")
    print(f"{'shape':<10} {'mode':<7} {'variant':<44} {'TF/s':>7} {'% dense':>8}"
          "   (library's Triton config_for in brackets)")
    for name in args.shapes.split(","):
        for mode in ("fwd", "dlhs", "fwdbwd", "tgmm"):
            cands = [r for r in rows if r.get("shape") == name and r.get("mode") == mode
                     and "tflops" in r and not r["variant"].startswith(("dense", "einsum"))]
            if cands:
                b = max(cands, key=lambda r: r["tflops"])
                pd = "" if b["pct_dense"] is None else f"{b['pct_dense']:.1f}"
                lib = [r for r in cands if r["variant"] == "config_for half_tiles=True"]
                libs = f"  [{lib[0]['tflops']:.1f}]" if lib else ""
                print(f"{name:<10} {mode:<7} {b['variant']:<44} {b['tflops']:7.1f} {pd:>8}{libs}")
    save()
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
