"""Generation throughput of ``zoo.sampling.sample`` with and without the key/value cache,
and of transformers' ``generate`` for the same model shape.

    python benchmarks/decode.py [--config moe_1b] [--batch 1,8,64] [--prompt 128] [--new 128]
        [--iters 3] [--out decode.json] [--peers | --no-peers] [--profile N]

Builds the config's model with random bfloat16 parameters (compute in bfloat16), and
times greedy generation of ``--new`` tokens after a ``--prompt``-token prompt for each
batch size of ``--batch``: the cached sampler (prefill once, one position per new token)
and the recomputing one (the whole ``[B, P + N]`` buffer through the model per new token;
``--no-recompute`` leaves it out). Both produce the same tokens up to rounding: the first
new token where they part is reported per row (in bfloat16 a near-tie of a random model's
logits can flip). Median of ``--iters`` calls after a warm-up call (the compile); new
tokens per second. ``--profile N`` traces N more cached calls per batch and prints the
device time per call by kernel beside the wall time: where the device is idle most of the
call, the loop is bound by kernel launches, not by the kernels. ``--gmm`` times several grouped-matmul variants of the same model
(e.g. ``pallas,dense``: the Pallas kernel, and every expert on every row), checks that
their greedy tokens equal the first's, and takes the ratios from the first.

``--peers`` (default on when torch and a CUDA device are available): transformers'
``MixtralForCausalLM`` of the same shape (``peers/hf_mixtral.py``, random bf16 weights)
generates the same number of tokens greedily with ``cache_implementation="static"``, its
decoding forward compiled by transformers (``torch.compile``, on a GPU), per batch size and
experts backend of ``--peer_experts``; each batch's ratio is routezoo's cached tokens/s over
the fastest transformers row. Order: the transformers rows, each backend in a child
process of its own, then the routezoo rows in this process (``peers/__init__.py``).

CPU smoke run (the default config's tiny model, PyTorch on the CPU, no compile there)::

    python benchmarks/decode.py --peers --config default --batch 1,4 --prompt 16 --new 8 \\
        --iters 2 --out /tmp/decode.json
"""

from __future__ import annotations

import argparse
import importlib
import json

import peers

# decided before jax starts its GPU client; a module importing this one gets no peers
PEERS = peers.decide() if __name__ == "__main__" else {"on": False, "note": "peers off (imported)"}

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from timing import bench, format_kernel_times, traced_kernel_times  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="moe_1b")
    p.add_argument("--batch", default="1,8,64", help="batch sizes, comma-separated")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", help="routezoo's parameters and compute: bfloat16 or float32 "
                                                       "(the transformers side is bfloat16)")
    p.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=True,
                   help="also time routezoo's sampler without the cache")
    p.add_argument("--out", default="decode.json")
    p.add_argument("--profile", type=int, default=0,
                   help="trace N more cached calls of the first variant per batch and print the device "
                        "time per call by kernel, against the call's wall time (a gap means launch-bound)")
    p.add_argument("--gmm", default="config",
                   help="routezoo variants, comma-separated: 'config' (the config's moe.gmm_backend) or a "
                        "moe.gmm_backend value; ratios use the first")
    peers.add_flag(p)
    p.add_argument("--peer_experts", default="grouped_mm",
                   help="transformers experts backends, comma-separated, or 'auto' (all registered)")
    p.add_argument("--peer_compile", action=argparse.BooleanOptionalAction, default=None,
                   help="transformers' compile of the decoding forward (default: on a GPU only)")
    a = p.parse_args()
    batches = [int(b) for b in a.batch.split(",")]
    print(PEERS["note"], flush=True)

    from routezoo import zoo
    from routezoo.zoo.sampling import sample

    m = importlib.import_module(f"routezoo.configs.{a.config}").get_config().model
    torch_rows = []
    if PEERS["on"]:
        from peers import hf_mixtral
        for impl in hf_mixtral.parse_backends(a.peer_experts, hf_mixtral.GENERATE_BACKENDS):
            torch_rows += peers.in_child("peers.hf_mixtral", "generate_rows", model_cfg=m, batches=batches,
                                         prompt=a.prompt, new=a.new, iters=a.iters, backends=[impl],
                                         compile=a.peer_compile)

    m.dtype = m.param_dtype = a.dtype
    variants = a.gmm.split(",")
    models = {}
    for v in variants:   # the same parameters; only the grouped matmul differs
        mv = ml_collections.ConfigDict(m.to_dict())
        if v != "config" and "moe" in mv:
            mv.moe.gmm_backend = v
        models[v] = zoo.build(ml_collections.FrozenConfigDict(mv))
    model = models[variants[0]]
    m = ml_collections.FrozenConfigDict(m)
    rng = np.random.default_rng(0)
    variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, a.prompt), jnp.int32)))()
    params_m = sum(x.size for x in jax.tree.leaves(variables["params"])) / 1e6
    rows, agreement = [], {}
    for b in batches:
        prompt = jnp.asarray(rng.integers(2, m.vocab_size, (b, a.prompt)), jnp.int32)
        outs = {}
        runs = [(v, True) for v in variants] + ([(variants[0], False)] if a.recompute else [])
        for v, use_cache in runs:
            fn = jax.jit(lambda p_, t_, model=models[v], use_cache=use_cache: sample(
                model, p_, t_, jax.random.key(1), num_tokens=a.new, temperature=0.0, use_cache=use_cache))
            out = np.asarray(fn(variables, prompt))
            t = bench(fn, variables, prompt, iters=a.iters, warmup=1)
            if v == variants[0]:
                outs[use_cache] = out
            rows.append({"side": "routezoo", "gmm": v, "batch": b, "use_cache": use_cache, "s": t,
                         "new_tokens_per_s": b * a.new / t})
            if a.profile and use_cache and v == variants[0]:
                kernels = traced_kernel_times(
                    lambda: [jax.block_until_ready(fn(variables, prompt)) for _ in range(a.profile)], a.profile,
                    fn.lower(variables, prompt).compile().as_text())
                busy = sum(k["ms"] for k in kernels)
                rows[-1].update(device_ms_per_call=busy, launches_per_call=sum(k["launches"] for k in kernels),
                                kernels=kernels[:40])
                print(f"batch {b}, {v}: {t * 1e3:.2f} ms per call, device busy {busy:.2f} ms "
                      f"({rows[-1]['launches_per_call']} kernel launches per call)")
                print(format_kernel_times(kernels))
            if use_cache and v != variants[0]:   # greedy tokens against the first variant's
                rows[-1]["same_tokens_as_first"] = bool(np.array_equal(out, outs[True]))
            print(json.dumps(rows[-1]), flush=True)
        if a.recompute:
            differ = outs[True][:, a.prompt:] != outs[False][:, a.prompt:]
            # per row, the first new token where the two samplers part (-1: never); after it the
            # rows are different sequences
            agreement[b] = {"same_tokens": bool(np.array_equal(outs[True], outs[False])),
                            "first_difference_per_row": [int(np.argmax(r)) if r.any() else -1 for r in differ]}
    ratios = {}
    for b in batches:
        best = max((t for t in torch_rows if t["batch"] == b and "new_tokens_per_s" in t),
                   key=lambda t: t["new_tokens_per_s"], default=None)
        for ours in (r for r in rows if r["batch"] == b and r["use_cache"]):
            if best:
                ours["vs_transformers"] = ours["new_tokens_per_s"] / best["new_tokens_per_s"]
                if ours["gmm"] == variants[0]:
                    ratios[b] = ours["vs_transformers"]
    info = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "config": a.config,
            "dtype": a.dtype, "params_millions": params_m, "batch": batches, "prompt": a.prompt,
            "new": a.new, "gmm": variants, "agreement": agreement, "peers": PEERS["note"], "vs_transformers": ratios}
    if PEERS["on"]:
        info["torch_versions"] = peers.versions()
    with open(a.out, "w") as fh:
        json.dump({"info": info, "rows": rows, "torch_rows": torch_rows}, fh, indent=1)
    print(f"\n{info['device']}, jax {info['jax']}, {a.config} ({params_m:.0f}M parameters, {a.dtype}), "
          f"prompt {a.prompt}, {a.new} new tokens")
    if PEERS["on"]:
        print(f"transformers peer: {info['torch_versions']}")
    for b, g in agreement.items():
        print(f"batch {b}: same tokens with and without cache: {g['same_tokens']} (first new token that "
              f"differs, per row: {g['first_difference_per_row']})")
    print(f"{'batch':>5} {'sampler':40} {'seconds':>9} {'new tokens/s':>13} {'vs transformers':>16}")
    for b in batches:
        for r in (r for r in rows if r["batch"] == b):
            name = (f"routezoo {r['gmm']}, key/value cache" if r["use_cache"]
                    else f"routezoo {r['gmm']}, recomputing")
            ratio = f"{r['vs_transformers']:15.2f}x" if "vs_transformers" in r else f"{'':>16}"
            print(f"{b:5d} {name:40} {r['s']:9.3f} {r['new_tokens_per_s']:13.1f} {ratio}")
        for t in (t for t in torch_rows if t["batch"] == b):
            name = f"transformers {t['experts_implementation']}, static" + ("" if t.get("compiled") else ", eager")
            if "error" in t:
                print(f"{b:5d} {name:40} ERROR {t['error'][:80]}")
            else:
                print(f"{b:5d} {name:40} {t['s']:9.3f} {t['new_tokens_per_s']:13.1f}")
        first = [r for r in rows if r["batch"] == b and r["gmm"] == variants[0]]
        if len(first) == 2:
            print(f"{'':5} speed-up from the cache: {first[1]['s'] / first[0]['s']:.1f}x")


if __name__ == "__main__":
    main()
