"""Document-masked attention on a GPU: the paths a packed batch can take, forward + backward.

    python benchmarks/attention_segments.py [--batch 4 --length 2048 --heads 16 --kv_heads 8 --docs 8]

Causal grouped-query attention over rows of ``--docs`` equal documents (segment ids as
``data.packing='masked'`` makes them), bf16, timed as the gradient of ``sum(out * g)``
w.r.t. q, k, v (median of ``--iters``):

* ``xla+mask``: ``jax.nn.dot_product_attention`` with the ``[B, 1, L, L]`` mask, XLA path;
* ``cudnn+mask``: the same mask through cuDNN's fused kernel (as a bias): what the layers run;
* ``cudnn``: no mask (attention crosses documents, as ``data.packing='eos'``);
* ``cudnn packed``: :func:`routezoo.layers.attention.cudnn_packed_attention`, cuDNN's packed
  layout with ``--docs`` segments per row (no mask array).

Outputs at real tokens are checked against the XLA path. Temporary memory is XLA's
compiled-memory estimate of the gradient program. Writes ``--out`` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from timing import bench


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default="attention_segments.json")
    a = p.parse_args()
    from routezoo.layers.attention import cudnn_packed_attention, segment_mask_of
    b, l, h, u, d = a.batch, a.length, a.heads, a.kv_heads, a.head_dim
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, l, h, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, l, u, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, l, u, d), jnp.bfloat16)
    g = jax.random.normal(ks[3], (b, l, h, d), jnp.bfloat16)
    seg = jnp.asarray(np.repeat(np.arange(1, a.docs + 1), l // a.docs)[None].repeat(b, 0).astype(np.int32))
    mask = segment_mask_of(seg, seg)
    paths = {
        "xla+mask": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                                                 implementation="xla"),
        "cudnn+mask": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                                                   implementation="cudnn"),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
        "cudnn packed": lambda q, k, v: cudnn_packed_attention(q, k, v, seg, max_segments=a.docs),
    }
    ref = np.asarray(paths["xla+mask"](q, k, v), np.float32)
    rows = []
    for name, fn in paths.items():
        grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32) * g), argnums=(0, 1, 2)))
        row = {"path": name}
        try:
            out = np.asarray(jax.jit(fn)(q, k, v), np.float32)
            row["max_abs_err_vs_xla"] = float(np.max(np.abs(out - ref))) if name != "cudnn" else None
            row["fwd_bwd_ms"] = 1e3 * bench(grad, q, k, v, iters=a.iters)
            mem = grad.lower(q, k, v).compile().memory_analysis()
            row["temp_mib"] = getattr(mem, "temp_size_in_bytes", 0) / 2 ** 20
        except Exception as e:  # noqa: BLE001 - report and go on
            row["error"] = " ".join(str(e).split())[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    info = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, **vars(a)}
    json.dump({"info": info, "rows": rows}, open(a.out, "w"), indent=1)
    print(f"\n{info['device']}, jax {info['jax']}; B={b} L={l} H={h} U={u} A={d}, {a.docs} documents per row, bf16")
    print(f"{'path':14} {'fwd+bwd ms':>10} {'temp MiB':>9} {'max err':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['path']:14} ERROR {r['error'][:90]}")
        else:
            err = "-" if r["max_abs_err_vs_xla"] is None else f"{r['max_abs_err_vs_xla']:.3f}"
            print(f"{r['path']:14} {r['fwd_bwd_ms']:10.2f} {r['temp_mib']:9.0f} {err:>8}")


if __name__ == "__main__":
    main()
