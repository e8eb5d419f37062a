"""The MoE block a PyTorch user writes, to time beside routezoo's (``moe_block.py --peers``).

Float32 router (softmax, top-k, the selected weights renormalised for ``k >= 2`` as
routezoo's ``top_k`` router does with ``moe.renormalize``), the token copies sorted by
expert, ``torch._grouped_mm`` for the fused gate/up projection and for the down projection
(SwiGLU), the copies weighted and summed back with ``index_add``, optional shared experts
(a dense SwiGLU of width ``shared · F``), the Switch load-balance loss and the router
z-loss with routezoo's coefficients (0.01, 1e-3). bf16 weights and activations, float32
router. Without ``torch._grouped_mm`` (or on the CPU, where it has no usable kernel) the
grouped matmuls are a loop over experts.

    python benchmarks/peers/torch_moe.py --check        # CPU: against routezoo's block, float32
    python benchmarks/peers/torch_moe.py --shape mixtral --tokens 16384 [--no-compile]

``--check`` builds routezoo's block (dropless) at tiny shapes in float32, copies its
weights into this block (the loop over experts) and compares outputs, losses and the
gradients of the input and of every weight; on a GPU it also compares the block through
``torch._grouped_mm``, eager and compiled, with the loop in bf16. Exits 1 on a mismatch.

:func:`time_block` returns milliseconds per forward + backward (gradients of the input
and every weight through ``torch.autograd.grad``), timed with CUDA events over queued
calls; :func:`useful_flops` is ``moe_block.py``'s count.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):   # run as a script: make benchmarks/ importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

LOAD_BALANCE_COEF = 0.01   # configs/base.py moe.load_balance_coef
Z_LOSS_COEF = 1e-3         # configs/base.py moe.z_loss_coef


def useful_flops(e: int, k: int, d: int, f: int, shared: int, tokens: int) -> int:
    """FLOPs counted for one forward + backward: the three SwiGLU matmuls of every routed
    copy and shared expert, times three (``moe_block.py``'s count)."""
    return 3 * 2 * tokens * d * f * 3 * (k + shared)


_GMM_OK: dict[str, bool] = {}


def grouped_mm_available(device: torch.device | str) -> bool:
    """Whether ``torch._grouped_mm`` runs forward and backward on ``device`` (probed once;
    ``False`` on the CPU: the loop over experts is used there)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not hasattr(torch, "_grouped_mm"):
        return False
    key = str(dev)
    if key not in _GMM_OK:
        try:
            a = torch.randn(64, 32, device=dev, dtype=torch.bfloat16, requires_grad=True)
            b = torch.randn(2, 16, 32, device=dev, dtype=torch.bfloat16, requires_grad=True)
            offs = torch.tensor([16, 64], device=dev, dtype=torch.int32)
            torch._grouped_mm(a, b.transpose(-2, -1), offs=offs).float().sum().backward()
            torch.cuda.synchronize(dev)
            _GMM_OK[key] = True
        except Exception:  # noqa: BLE001 - no kernel for this device or build
            _GMM_OK[key] = False
    return _GMM_OK[key]


def grouped_linear(rows: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, counts: torch.Tensor,
                   use_gmm: bool) -> torch.Tensor:
    """``rows [M, K]`` sorted by group, ``w [G, N, K]`` (``nn.Linear`` layout per group),
    ``offs`` int32 ``[G]`` cumulative ends -> ``[M, N]``, row ``i`` times ``w[g(i)]^T``."""
    if use_gmm:
        return torch._grouped_mm(rows, w.transpose(-2, -1), offs=offs)
    return _loop_linear(rows, w, counts)


@torch.compiler.disable   # data-dependent sizes: left out of compiled graphs (else one recompile per routing)
def _loop_linear(rows: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    parts = rows.split(counts.tolist())   # the loop: one host sync for the sizes
    return torch.cat([p @ w[g].T for g, p in enumerate(parts)])


class TorchMoE(torch.nn.Module):
    """Top-k MoE block on ``x [T, D]``; ``forward`` returns ``(y [T, D], aux_loss)``.

    Parameters: ``router [D, E]`` float32, ``gate_up [E, 2F, D]`` (gate rows first),
    ``down [E, D, F]``; with ``shared > 0``: ``shared_gate_up [2·S·Fs, D]`` and
    ``shared_down [D, S·Fs]`` (``Fs = shared_dim or F``).
    """

    def __init__(self, e: int, k: int, d: int, f: int, shared: int = 0, shared_dim: int = 0, *,
                 renormalize: bool = True, load_balance_coef: float = LOAD_BALANCE_COEF,
                 z_loss_coef: float = Z_LOSS_COEF, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", use_grouped_mm: bool | None = None, seed: int = 0):
        super().__init__()
        self.e, self.k, self.renormalize = e, k, renormalize
        self.load_balance_coef, self.z_loss_coef = load_balance_coef, z_loss_coef
        self.use_gmm = grouped_mm_available(device) if use_grouped_mm is None else use_grouped_mm
        g = torch.Generator(device=device).manual_seed(seed)

        def init(shape, fan_in, dt, scale=1.0):   # drawn on the device: the large shapes are GBs
            w = torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * (scale / fan_in) ** 0.5
            return torch.nn.Parameter(w.to(dt))

        self.router = init((d, e), d, torch.float32, 0.1)
        self.gate_up = init((e, 2 * f, d), d, dtype)
        self.down = init((e, d, f), f, dtype)
        self.shared_width = shared * (shared_dim or f)
        if shared:
            self.shared_gate_up = init((2 * self.shared_width, d), d, dtype)
            self.shared_down = init((d, self.shared_width), self.shared_width, dtype)

    def forward(self, x: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        t, d = x.shape
        e, k = self.e, self.k
        # router, float32
        logits = x.float() @ self.router                                  # [T, E]
        probs = torch.softmax(logits, dim=-1)
        weights, idx = torch.topk(probs, k, dim=-1)                       # [T, K]
        if k > 1 and self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        # sort the T·K token copies by expert
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = torch.div(order, k, rounding_mode="floor")                # source token of each sorted copy
        counts = torch.zeros(e, dtype=torch.int64, device=x.device).index_add_(0, flat, torch.ones_like(flat))
        offs = counts.cumsum(0).to(torch.int32)
        rows = x[token]                                                   # [T·K, D]
        gate, up = grouped_linear(rows, self.gate_up, offs, counts, self.use_gmm).chunk(2, dim=-1)
        out = grouped_linear(F.silu(gate) * up, self.down, offs, counts, self.use_gmm)   # [T·K, D]
        out = out * weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
        y = torch.zeros_like(x).index_add(0, token, out)
        if self.shared_width:
            sg, su = F.linear(x, self.shared_gate_up).chunk(2, dim=-1)
            y = y + F.linear(F.silu(sg) * su, self.shared_down)
        # Switch load balance per group of consecutive tokens, ST-MoE z-loss
        s = group_size or t
        chosen = torch.zeros_like(probs).scatter_(1, idx, 1.0)            # [T, E]
        lb = (chosen.view(t // s, s, e).mean(1) * probs.view(t // s, s, e).mean(1)).mean() * e ** 2
        z = torch.logsumexp(logits, dim=-1).square().mean()
        return y, self.load_balance_coef * lb + self.z_loss_coef * z


def _loss_fn(block: TorchMoE, group_size: int):
    def loss(x):
        y, aux = block(x, group_size)
        return y.float().sum() + aux
    return loss


def time_block(e: int, k: int, d: int, f: int, shared: int, tokens: int, compile: bool, *,
               iters: int = 10, warmup: int = 3, queue: int = 3, seq: int = 2048,
               device: str | None = None, use_grouped_mm: bool | None = None) -> float:
    """Milliseconds per forward + backward of :class:`TorchMoE` at ``(E, k, D, F, shared)``
    on ``tokens`` random bf16 tokens (load balance per ``seq`` tokens, as routezoo's block
    routes one group per sequence): gradients of the input and every weight. ``compile``:
    the forward and loss under ``torch.compile`` (inductor; its backward is compiled with
    it). CUDA events around ``queue`` calls, median of ``iters`` samples after ``warmup``."""
    from timing import torch_bench, torch_device

    dev = device or torch_device()
    block = TorchMoE(e, k, d, f, shared, device=dev, use_grouped_mm=use_grouped_mm)
    params = list(block.parameters())
    x = torch.randn(tokens, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    loss = _loss_fn(block, min(seq, tokens))
    if compile:
        loss = torch.compile(loss)

    def step():
        return torch.autograd.grad(loss(x), [x, *params])

    try:
        return torch_bench(step, iters=iters, warmup=warmup, queue=queue) * 1e3
    finally:
        del block, params, x, loss


def block_row(name: str, shape: tuple, tokens: int, compile: bool, **kw) -> dict:
    """:func:`time_block` as a result row: ms, TFLOP/s (:func:`useful_flops`), which grouped
    matmul ran and PyTorch's peak memory; an ``error`` row when it fails (e.g. out of memory)."""
    e, k, d, f, shared = shape
    dev = kw.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    gmm = grouped_mm_available(dev) if kw.get("use_grouped_mm") is None else kw["use_grouped_mm"]
    row = {"shape": name, "side": "torch", "block": "compiled" if compile else "eager",
           "grouped_mm": "torch._grouped_mm" if gmm else "loop over experts", "tokens": tokens}
    try:
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = time_block(e, k, d, f, shared, tokens, compile, **kw)
        row.update(ms=ms, tflops=useful_flops(e, k, d, f, shared, tokens) / (ms / 1e3) / 1e12)
        if dev == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    except Exception as err:  # noqa: BLE001 - report and go on
        row["error"] = " ".join(str(err).split())[:200]
    return row


# ------------------------------------------------------------------ check against routezoo


CHECK_SHAPES = [
    # (E, k, D, F, shared)
    (8, 2, 16, 24, 0),
    (16, 4, 16, 8, 2),
    (8, 1, 16, 24, 0),
]


def check(atol: float = 2e-5, rtol: float = 2e-5) -> bool:
    """routezoo's dropless block against :class:`TorchMoE` with the same float32 weights on
    the CPU (2 sequences of 16 tokens): output, auxiliary loss, and the gradients of the
    input and of every weight under ``sum(y · r) + aux`` for a random ``r``. Prints one line
    per shape; ``True`` when every comparison is within tolerance."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from routezoo.configs import base
    from routezoo.layers.moe import moe_from_config

    ok = True
    for e, k, d, f, shared in CHECK_SHAPES:
        b, l = 2, 16
        cfg = base.get_config().model.moe
        cfg.num_experts, cfg.k, cfg.expert_dim, cfg.num_shared_experts = e, k, f, shared
        cfg.shared_expert_dim = f
        cfg.dispatch, cfg.gmm_backend, cfg.jitter, cfg.group_size = "dropless", "auto", 0.0, 0
        model = moe_from_config(cfg, d_model=d, dtype=jnp.float32, param_dtype=jnp.float32)
        rng = np.random.default_rng(e + k + shared)
        x = rng.standard_normal((b, l, d)).astype(np.float32)
        r = rng.standard_normal((b, l, d)).astype(np.float32)
        variables = nn.meta.unbox(model.init(jax.random.key(0), x, deterministic=True))
        # a router kernel with larger logits, so that the top-k choices are well separated
        variables["params"]["router"]["kernel"] = jnp.asarray(rng.standard_normal((d, e)), jnp.float32)

        def jloss(v, x):
            y, aux = model.apply(v, x, deterministic=True)
            return jnp.sum(y * r) + sum(aux["losses"].values()), (y, sum(aux["losses"].values()))

        (_, (jy, jaux)), (jgv, jgx) = jax.value_and_grad(jloss, argnums=(0, 1), has_aux=True)(variables, x)
        p = jax.tree.map(np.asarray, variables["params"])
        jg = jax.tree.map(np.asarray, jgv["params"])

        block = TorchMoE(e, k, d, f, shared, dtype=torch.float32, use_grouped_mm=False)
        t = lambda a: torch.from_numpy(np.array(a))   # a writable copy
        ex = p["experts"]
        with torch.no_grad():
            block.router.copy_(t(p["router"]["kernel"]))
            block.gate_up.copy_(t(np.concatenate([ex["wi_gate"], ex["wi"]], axis=-1).transpose(0, 2, 1)))
            block.down.copy_(t(ex["wo"].transpose(0, 2, 1)))
            if shared:
                sh = p["shared_experts"]
                block.shared_gate_up.copy_(t(np.concatenate([sh["wg"], sh["wi"]], axis=-1).T))
                block.shared_down.copy_(t(sh["wo"].T))
        tx = t(x.reshape(b * l, d)).requires_grad_(True)
        ty, taux = block(tx, l)
        tloss = (ty * t(r.reshape(b * l, d))).sum() + taux
        grads = torch.autograd.grad(tloss, [tx, *block.parameters()])
        names = [n for n, _ in block.named_parameters()]
        tg = dict(zip(names, (g.numpy() for g in grads[1:])))
        jex = jg["experts"]
        pairs = {
            "y": (np.asarray(jy).reshape(b * l, d), ty.detach().numpy()),
            "aux": (np.asarray(jaux), taux.detach().numpy()),
            "dx": (np.asarray(jgx).reshape(b * l, d), grads[0].numpy()),
            "d router": (jg["router"]["kernel"], tg["router"]),
            "d gate_up": (np.concatenate([jex["wi_gate"], jex["wi"]], axis=-1).transpose(0, 2, 1), tg["gate_up"]),
            "d down": (jex["wo"].transpose(0, 2, 1), tg["down"]),
        }
        if shared:
            jsh = jg["shared_experts"]
            pairs["d shared_gate_up"] = (np.concatenate([jsh["wg"], jsh["wi"]], axis=-1).T, tg["shared_gate_up"])
            pairs["d shared_down"] = (jsh["wo"].T, tg["shared_down"])
        bad = []
        worst = 0.0
        for name, (a, bb) in pairs.items():
            err = float(np.max(np.abs(a - bb) / (atol + rtol * np.abs(a)))) if a.size else 0.0
            worst = max(worst, err)
            if not np.allclose(bb, a, atol=atol, rtol=rtol):
                bad.append(f"{name} (max |diff| {float(np.max(np.abs(a - bb))):.2e})")
        ok &= not bad
        print(f"E={e} k={k} D={d} F={f} shared={shared}: "
              + ("ok" if not bad else "MISMATCH " + ", ".join(bad))
              + f" (compared {', '.join(pairs)}; worst |diff| / (atol + rtol|ref|) = {worst:.2f})", flush=True)
    return ok


def check_grouped_mm(tokens: int = 1024, tol: float = 5e-2) -> bool:
    """On a GPU with ``torch._grouped_mm``: the bf16 block through it, eager and compiled,
    against the loop over experts with the same weights (routing is identical: the router
    is float32), at one shape with shared experts. Output and gradients compared as
    ``max |a - b| / max |b|``. ``True`` when skipped (no GPU or no kernel)."""
    if not grouped_mm_available("cuda" if torch.cuda.is_available() else "cpu"):
        print("grouped_mm: skipped (no CUDA device or no torch._grouped_mm kernel)")
        return True
    e, k, d, f, shared = 8, 2, 256, 512, 1
    ref = TorchMoE(e, k, d, f, shared, device="cuda", use_grouped_mm=False)
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def run(block, compiled):
        loss = _loss_fn(block, tokens)
        loss = torch.compile(loss) if compiled else loss
        out = loss(x)
        return [out.detach(), *torch.autograd.grad(out, [x, *block.parameters()])]

    want = run(ref, False)
    ok = True
    for compiled in (False, True):
        gmm = TorchMoE(e, k, d, f, shared, device="cuda", use_grouped_mm=True)
        gmm.load_state_dict(ref.state_dict())
        got = run(gmm, compiled)
        names = ["loss", "dx", *(n for n, _ in gmm.named_parameters())]
        errs = {n: float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
                for n, a, b in zip(names, got, want)}
        bad = [n for n, v in errs.items() if not v <= tol]
        ok &= not bad
        print(f"grouped_mm {'compiled' if compiled else 'eager'} vs loop, bf16, E={e} k={k} D={d} F={f} "
              f"shared={shared}, {tokens} tokens: " + ("ok" if not bad else "MISMATCH " + ", ".join(bad))
              + f" (max relative error {max(errs.values()):.1e})", flush=True)
    return ok


SHAPES = {   # moe_block.py's
    "mixtral": (8, 2, 4096, 14336, 0),
    "deepseek": (64, 6, 2048, 1408, 2),
    "small": (128, 1, 1024, 4096, 0),
}


def main():
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare with routezoo's block on the CPU (float32)")
    p.add_argument("--shape", default="mixtral", help=f"one of {list(SHAPES)}, or E,k,D,F,shared")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--queue", type=int, default=3)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the block under torch.compile")
    a = p.parse_args()
    if a.check:
        ok = check()
        ok &= check_grouped_mm()
        sys.exit(0 if ok else 1)
    shape = SHAPES[a.shape] if a.shape in SHAPES else tuple(int(v) for v in a.shape.split(","))
    for compiled in (False, True) if a.compile else (False,):
        print(json.dumps(block_row(a.shape, shape, a.tokens, compiled, iters=a.iters, queue=a.queue)), flush=True)


if __name__ == "__main__":
    main()
