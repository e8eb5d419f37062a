"""float32 grouped matmul on the GPU at wide shapes (the tiles config_for picks for 4-byte
inputs): forward and both gradients against a dense float32 reference.

    python3 benchmarks/f32_check.py
"""
import jax
import jax.numpy as jnp
import numpy as np

from routezoo.layers.moe.gmm import gmm_dense
from routezoo.layers.moe.kernels import gmm_pallas as gp

for m, k, n, e in ((4096, 2048, 4096, 8), (2048, 4096, 1024, 16)):
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (m, k), jnp.float32)
    w = jax.random.normal(kw, (e, k, n), jnp.float32) * k ** -0.5
    ct = jax.random.normal(kc, (m, n), jnp.float32)
    gs = jnp.asarray(np.random.default_rng(0).multinomial(m - 100, np.full(e, 1 / e)), jnp.int32)

    def run(f):
        out, vjp = jax.vjp(f, x, w)
        return (out, *vjp(ct))
    with jax.default_matmul_precision("highest"):
        want = jax.jit(lambda: run(lambda a, b: gmm_dense(a, b, gs)))()
    got = jax.jit(lambda: run(lambda a, b: gp.gmm_backend(a, b, gs)))()
    errs = {name: float(jnp.abs(a - b).max() / jnp.abs(b).max()) for name, a, b in zip(("out", "dx", "dw"), got, want)}
    print(f"float32 gmm m={m} k={k} n={n} E={e}: max |err| / max |ref| {errs}")
