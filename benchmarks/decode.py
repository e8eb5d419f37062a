"""Generation throughput of ``zoo.sampling.sample`` with and without the key/value cache.

    python benchmarks/decode.py [--config moe_1b] [--batch 8] [--prompt 128] [--new 128]
        [--iters 3] [--out decode.json]

Builds the config's model with random bfloat16 parameters (compute in bfloat16), and
times greedy generation of ``--new`` tokens after a ``--prompt``-token prompt for
``--batch`` rows: the cached sampler (prefill once, one position per new token) and the
recomputing one (the whole ``[B, P + N]`` buffer through the model per new token). Both
produce the same tokens up to rounding: the first new token where they part is reported
per row (in bfloat16 a near-tie of a random model's logits can flip). Median of ``--iters`` calls after a
warm-up call (the compile); new tokens per second.
"""

from __future__ import annotations

import argparse
import importlib
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from timing import bench


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="moe_1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", help="parameters and compute: bfloat16 or float32")
    p.add_argument("--out", default="decode.json")
    a = p.parse_args()

    from routezoo import zoo
    from routezoo.zoo.sampling import sample

    m = importlib.import_module(f"routezoo.configs.{a.config}").get_config().model
    m.dtype = m.param_dtype = a.dtype
    m = ml_collections.FrozenConfigDict(m)
    model = zoo.build(m)
    prompt = jnp.asarray(np.random.default_rng(0).integers(2, m.vocab_size, (a.batch, a.prompt)), jnp.int32)
    variables = jax.jit(lambda: model.init(jax.random.key(0), prompt))()
    params_m = sum(x.size for x in jax.tree.leaves(variables["params"])) / 1e6
    rows, outs = [], {}
    for use_cache in (True, False):
        fn = jax.jit(lambda v, t, use_cache=use_cache: sample(
            model, v, t, jax.random.key(1), num_tokens=a.new, temperature=0.0, use_cache=use_cache))
        outs[use_cache] = np.asarray(fn(variables, prompt))
        t = bench(fn, variables, prompt, iters=a.iters, warmup=1)
        rows.append({"use_cache": use_cache, "s": t, "new_tokens_per_s": a.batch * a.new / t})
        print(json.dumps(rows[-1]), flush=True)
    same = bool(np.array_equal(outs[True], outs[False]))
    differ = outs[True][:, a.prompt:] != outs[False][:, a.prompt:]
    # per row, the first new token where the two samplers part (-1: never); after it the
    # rows are different sequences
    first = [int(np.argmax(r)) if r.any() else -1 for r in differ]
    info = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "config": a.config,
            "dtype": a.dtype, "params_millions": params_m, "batch": a.batch, "prompt": a.prompt,
            "new": a.new, "same_tokens": same, "first_difference_per_row": first}
    with open(a.out, "w") as fh:
        json.dump({"info": info, "rows": rows}, fh, indent=1)
    print(f"\n{info['device']}, jax {info['jax']}, {a.config} ({params_m:.0f}M parameters, {a.dtype}), batch "
          f"{a.batch}, prompt {a.prompt}, {a.new} new tokens; same tokens with and without cache: {same}"
          f" (first new token that differs, per row: {first})")
    print(f"{'cache':>6} {'seconds':>9} {'new tokens/s':>13}")
    for r in rows:
        print(f"{str(r['use_cache']):>6} {r['s']:9.3f} {r['new_tokens_per_s']:13.1f}")
    speedup = rows[1]["s"] / rows[0]["s"]
    print(f"speed-up from the cache: {speedup:.1f}x")


if __name__ == "__main__":
    main()
