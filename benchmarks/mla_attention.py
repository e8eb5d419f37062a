"""Multi-head latent attention (DeepSeek-V2/V3) in bfloat16 on one GPU: the q·k score
product with float32 accumulation against the float32-upcast, ``Precision.HIGHEST``
product routezoo used before, and the whole ``MLAttention`` layer forward + backward with
materialised scores (``implementation='xla'``) and with cuDNN flash attention
(``'cudnn'``, values zero-padded to the q·k head dim), with the largest differences of
the output and of every gradient between the two.

    python3 benchmarks/mla_attention.py [--batch 4] [--length 2048] [--iters 10] [--out FILE]

Shapes: DeepSeek-V2-Lite's attention (16 heads, d_model 2048, kv rank 512, q·k head dim
128 + 64 rotary, value head dim 128). Timing: ``timing.bench`` with queued calls. Prints
a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from timing import bench

H, D, R, N, P, V = 16, 2048, 512, 128, 64, 128


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--queue", type=int, default=5)
    ap.add_argument("--out", default="mla_attention.json")
    a = ap.parse_args()
    from routezoo.layers.mla import MLAttention

    b, l = a.batch, a.length
    kq, kk, kx = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (b, l, H, N + P), jnp.bfloat16)
    k = jax.random.normal(kk, (b, l, H, N + P), jnp.bfloat16)
    flops_scores = 2 * b * H * l * l * (N + P)

    def upcast(q, k):
        return jnp.einsum("BLHK,BMHK->BHLM", q.astype(jnp.float32), k.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)

    def accum(q, k):
        return jnp.einsum("BLHK,BMHK->BHLM", q, k, preferred_element_type=jnp.float32)

    rows = []
    for name, f in (("scores: float32 upcast, HIGHEST (before)", upcast),
                    ("scores: bf16 x bf16 -> f32 (now)", accum)):
        t = bench(jax.jit(f), q, k, iters=a.iters, queue=a.queue)
        rows.append({"case": name, "ms": t * 1e3, "tflops": flops_scores / t / 1e12})

    x = jax.random.normal(kx, (b, l, D), jnp.bfloat16)
    cot = jax.random.normal(jax.random.key(3), (b, l, D), jnp.bfloat16)
    results = {}
    for impl in ("xla", "cudnn"):
        layer = MLAttention(num_heads=H, kv_lora_rank=R, qk_nope_head_dim=N, qk_rope_head_dim=P,
                            v_head_dim=V, q_lora_rank=0, implementation=impl,
                            dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)

        def loss(p, x, layer=layer):
            y = layer.apply(p, x)
            return jnp.sum(y.astype(jnp.float32) * cot.astype(jnp.float32)), y

        step = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        try:
            # the same weights for both: initialised through the materialised path
            params = jax.jit(layer.clone(implementation="xla").init)(jax.random.key(1), x)
            t = bench(step, params, x, iters=a.iters, queue=a.queue)
            results[impl] = step(params, x)
            rows.append({"case": f"MLAttention layer fwd+bwd, implementation={impl}", "ms": t * 1e3,
                         "tflops": None})
        except Exception as err:  # noqa: BLE001 - e.g. cuDNN missing: report and go on
            rows.append({"case": f"MLAttention layer fwd+bwd, implementation={impl}", "ms": float("nan"),
                         "tflops": None, "error": " ".join(str(err).split())[:300]})
    if len(results) == 2:   # cuDNN against the materialised path, relative to the largest value
        (gx, yx), (gc, yc) = results["xla"], results["cudnn"]
        for name, u, w in [("output", yc, yx), *[(jax.tree_util.keystr(pth), u, w) for (pth, u), w in
                                                   zip(jax.tree_util.tree_leaves_with_path(gc),
                                                       jax.tree.leaves(gx))]]:
            u, w = jnp.asarray(u, jnp.float32), jnp.asarray(w, jnp.float32)
            rel = float(jnp.max(jnp.abs(u - w)) / jnp.maximum(jnp.max(jnp.abs(w)), 1e-30))
            rows.append({"case": f"cudnn vs xla, max |diff| / max |xla|: {name}", "ms": None, "rel": rel})

    info = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "batch": b, "length": l}
    json.dump({"info": info, "rows": rows}, open(a.out, "w"), indent=1)
    print(f"{info['device']}, jax {info['jax']}, batch {b} x {l}, {H} heads")
    for r in rows:
        if "rel" in r:
            print(f"  {r['case']:<72} {r['rel']:.2e}")
            continue
        tf = "" if r["tflops"] is None else f"{r['tflops']:8.1f} TFLOP/s"
        print(f"  {r['case']:<48} {r['ms']:9.3f} ms {tf} {r.get('error', '')}")


if __name__ == "__main__":
    main()
