"""GPU correctness check of the expert-parallel dropless exchanges: ragged vs padded vs one device.

    python3 benchmarks/ep_check.py [--gpus 2] [--dtype float32] [--gmm_backend auto] [--tol 5e-3]
        [--mosaic_all]

On ``n >= 2`` GPUs (``--gpus``, default all): the dropless MoE (``dropless_moe``,
SwiGLU experts, T = 256 tokens per GPU, D = 64, F = 128, K = 2), its output and the
gradients of ``sum(y * cot)`` with respect to ``x``, the expert weights and the combine
weights, computed

* on one device (no mesh: the single-shard path), and
* under a mesh ``expert = n`` (tokens and experts split ``n`` ways) with
  ``exchange='padded'`` (``all_to_all`` of padded blocks) and ``exchange='ragged'``
  (``ragged_all_to_all`` of the real rows),

for ``E = 8`` (several experts per GPU: the receiver's counting-sort reorder runs) and
``E = n`` (one expert per GPU: no reorder), with routings ``balanced``, ``one_shard``
(every copy to the first GPU's experts: its receive buffer fills to the worst case),
``empty_experts`` (most experts get nothing) and ``random``. Prints, per case, the largest
absolute difference of each exchange to the one-device result divided by the largest
absolute reference value, and ragged against padded; exits 1 if any exceeds ``--tol``.
Also checks that the compiled ragged step holds ``ragged-all-to-all`` (and the padded one
does not; with XLA's decomposer flag the compiled step holds other collectives instead, and
that check is reported as failed while the values still compare).

Run on CPU with ``--exchange_ragged ragged_emulated`` (and
``XLA_FLAGS=--xla_force_host_platform_device_count=2``) to try the script itself.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from routezoo.layers import sharding
from routezoo.layers.moe.gmm import EXPERT_PARAM_NAMES
from routezoo.layers.moe.dropless import dropless_moe
from routezoo.layers.moe.exchange import resolve_ep_exchange

T_PER_GPU, D, F, K = 256, 64, 128, 2


def routing(case: str, t: int, e: int, n: int):
    el = e // n
    i = np.arange(t)
    if case == "balanced":
        idx = np.stack([i % e, (i + 1) % e], 1)
    elif case == "one_shard":                      # first GPU's experts only
        idx = np.stack([i % el, np.where(el > 1, (i + 1) % el, -1)], 1)
    elif case == "empty_experts":                  # only the last expert (and expert 1 when E > 2)
        idx = np.stack([np.full(t, e - 1), np.where(e > 2, 1, -1) * np.ones(t, int)], 1)
    elif case == "random":
        rng = np.random.default_rng(0)
        idx = np.stack([rng.choice(e, K, replace=False) for _ in i])
    else:
        raise ValueError(case)
    w = jax.random.uniform(jax.random.key(5), (t, K), jnp.float32)
    return jnp.asarray(idx, jnp.int32), w


def step_fn(exchange: str, gmm_backend: str, cot):
    def loss(x, params, w, idx):
        y = dropless_moe(x, idx, w, params, expert_type="swiglu", gmm_backend=gmm_backend,
                                  exchange=exchange)
        return jnp.sum(y.astype(jnp.float32) * cot), y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, default=0, help="devices to use; 0 = all")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--gmm_backend", default="auto")
    p.add_argument("--tol", type=float, default=5e-3, help="max |diff| / max |reference| allowed")
    p.add_argument("--exchange_ragged", default="ragged", help="ragged, or ragged_emulated to try on CPU")
    p.add_argument("--mosaic_all", action="store_true",
                   help="with --gmm_backend mosaic: every pass on the Mosaic kernels (these "
                        "shapes' small groups would otherwise run on Triton)")
    a = p.parse_args()
    if a.mosaic_all:
        from routezoo.layers.moe.kernels import gmm_mosaic as gm
        gm.config_for = lambda *args, interpret=False: gm.MosaicConfig(interpret=interpret)
    jax.config.update("jax_default_matmul_precision", "highest")
    n = a.gpus or jax.device_count()
    if n < 2 or n > jax.device_count():
        print(f"need 2 <= --gpus <= {jax.device_count()} devices, got {n}")
        return 1
    dtype = jnp.dtype(a.dtype)
    devices = jax.devices()[:n]
    mesh = sharding.make_mesh({"expert": n}, devices=devices)
    rules = sharding.DEFAULT_RULES
    t = T_PER_GPU * n
    print(f"{devices[0].device_kind} x{n}, jax {jax.__version__}, dtype {a.dtype}, "
          f"gmm_backend {a.gmm_backend}, ragged exchange {a.exchange_ragged}")
    worst = 0.0
    hlo_ok = True
    for e in sorted({8, n}):
        if e % n:
            continue
        ks = jax.random.split(jax.random.key(e), 5)
        params = {"wi": jax.random.normal(ks[0], (e, D, F), dtype) * D ** -0.5,
                  "wi_gate": jax.random.normal(ks[1], (e, D, F), dtype) * D ** -0.5,
                  "wo": jax.random.normal(ks[2], (e, F, D), dtype) * F ** -0.5}
        x = jax.random.normal(ks[3], (t, D), dtype)
        cot = jax.random.normal(ks[4], (t, D), jnp.float32)
        for case in ("balanced", "one_shard", "empty_experts", "random"):
            idx, w = routing(case, t, e, n)
            (_, y_ref), g_ref = step_fn("padded", a.gmm_backend, cot)(x, params, w, idx)   # no mesh
            ref = {"y": y_ref, **{f"d{name}": g for name, g in
                                  zip(["x", "wi", "wi_gate", "wo", "w"], jax.tree.leaves(g_ref))}}
            got = {}
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                tok = sharding.logical_sharding(mesh, ("batch", None), rules)
                args = (jax.device_put(x, tok),
                        {k: jax.device_put(v, sharding.logical_sharding(mesh, EXPERT_PARAM_NAMES[k], rules))
                         for k, v in params.items()},
                        jax.device_put(w, tok), jax.device_put(idx, tok))
                for exchange in ("padded", a.exchange_ragged):
                    fn = step_fn(exchange, a.gmm_backend, cot)
                    (_, y), g = fn(*args)
                    got[exchange] = {"y": y, **{f"d{name}": v for name, v in
                                                zip(["x", "wi", "wi_gate", "wo", "w"], jax.tree.leaves(g))}}
                    if case == "balanced":
                        hlo = fn.lower(*args).compile().as_text()
                        has = "ragged-all-to-all" in hlo
                        expect = exchange == "ragged"
                        hlo_ok &= has == expect
                        print(f"  E={e} {exchange}: ragged-all-to-all in compiled HLO: {has} (expected {expect})")
            if float(jnp.max(jnp.abs(y_ref))) == 0:
                hlo_ok = False
                print(f"E={e} {case}: the reference output is all zeros; the check would be empty")
            line = []
            for label, a_, b_ in [("padded-1dev", got["padded"], ref), ("ragged-1dev", got[a.exchange_ragged], ref),
                                  ("ragged-padded", got[a.exchange_ragged], got["padded"])]:
                rel = max(float(jnp.max(jnp.abs(a_[k].astype(jnp.float32) - b_[k].astype(jnp.float32))))
                          / max(float(jnp.max(jnp.abs(ref[k].astype(jnp.float32)))), 1e-30) for k in ref)
                worst = max(worst, rel)
                line.append(f"{label} {rel:.2e}")
            absd = {k: float(jnp.max(jnp.abs(got[a.exchange_ragged][k].astype(jnp.float32)
                                             - ref[k].astype(jnp.float32)))) for k in ref}
            print(f"E={e:2d} {case:>13}: " + ", ".join(line) + "  | ragged-1dev max abs: "
                  + " ".join(f"{k} {v:.1e}" for k, v in absd.items()))

    auto = resolve_ep_exchange("auto")
    print(f"exchange='auto' resolves to {auto!r} on {jax.default_backend()}")
    ok = worst <= a.tol and hlo_ok
    print(f"worst relative difference {worst:.2e} (tol {a.tol:.0e}); HLO checks {'ok' if hlo_ok else 'FAILED'}; "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
