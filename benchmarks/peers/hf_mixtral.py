"""transformers' Mixtral of a routezoo config's shape: a compiled training step and ``generate``.

The model: ``MixtralForCausalLM`` from ``routezoo.zoo.hf.hf_config_from_model`` of the
config's ``model`` section (the same parameters as routezoo's model; a config with tied,
scaled logits is written with plain tied logits, which changes no shape), random bf16
weights, SDPA attention.

* :func:`train_rows`: one training step per batch of random tokens (forward with the
  load-balancing loss, backward, fused AdamW), the model under ``torch.compile`` (default
  inductor mode; AOTAutograd compiles the backward with it), per experts backend of
  transformers (``grouped_mm``, ``eager``, ``batched_mm``, ...); a backend whose gathered
  weights cannot fit the device (``batched_mm`` at training sizes) is skipped without
  running. tokens/s, median of ``iters`` steps after ``warmup``.
* :func:`generate_rows`: greedy ``generate`` with ``cache_implementation="static"``; on a
  GPU transformers compiles the decoding forward itself (its default ``CompileConfig``:
  inductor, ``reduce-overhead``); exactly ``new`` tokens after a ``prompt``-token prompt
  (``min_new_tokens``), per batch size. New tokens/s, median of ``iters`` calls after
  ``warmup`` calls (the compile and the CUDA graphs' capture).

Every row records an ``error`` instead of a rate when its run fails (out of memory,
a backend this build lacks); call :func:`peers.free_torch` before JAX runs.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

TRAIN_BACKENDS = ("grouped_mm", "eager")
GENERATE_BACKENDS = ("grouped_mm",)


def hf_config(model_cfg: Any) -> dict:
    """The HF ``MixtralForCausalLM`` config dict of a routezoo ``config.model``."""
    from routezoo.zoo import hf

    m = copy.deepcopy(model_cfg)
    if m.get("tie_embeddings", False) and m.get("scale_tied_logits", True):
        m.scale_tied_logits = False   # logits scaling is no shape: write it as HF's plain tied logits
    return hf.hf_config_from_model(m, "MixtralForCausalLM")


def registered_backends() -> list[str]:
    """Experts backends this transformers offers: ``eager`` and its ``ExpertsInterface``."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        return ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]
    except ImportError:
        return ["eager"]


def parse_backends(spec: str, default: tuple[str, ...]) -> list[str]:
    """``'grouped_mm,eager'``, ``'auto'`` (every registered backend) or ``''`` (``default``)."""
    if not spec:
        return list(default)
    return registered_backends() if spec == "auto" else spec.split(",")


def build(model_cfg: Any, experts: str, device: str, *, train: bool, aux_loss: bool = True):
    """``MixtralForCausalLM`` with random bf16 weights on ``device``, experts backend ``experts``."""
    import torch
    import transformers

    cfg = transformers.MixtralConfig(**{k: v for k, v in hf_config(model_cfg).items() if k != "architectures"})
    cfg.output_router_logits = bool(train and aux_loss)
    try:
        model = transformers.MixtralForCausalLM._from_config(
            cfg, attn_implementation="sdpa", experts_implementation=experts, dtype=torch.bfloat16)
    except TypeError:   # versions that take it only through the setter
        model = transformers.MixtralForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
        model.set_experts_implementation(experts)
    model = model.to(device)
    model.train(train)
    return model


def batched_mm_gib(model_cfg: Any, tokens: int) -> float:
    """GiB that ``batched_mm`` gathers for one MoE layer: every token copy's gate/up and
    down weights, ``T·k · 3·D·F`` bf16 values."""
    mo = model_cfg.moe
    return tokens * int(mo.k) * 3 * int(model_cfg.d_model) * int(mo.expert_dim) * 2 / 2 ** 30


def _fits(experts: str, model_cfg: Any, tokens: int, device: str) -> str | None:
    """Why ``experts`` cannot run at ``tokens`` on ``device`` (``None``: try it)."""
    import torch
    if experts != "batched_mm" or device != "cuda":
        return None
    need = batched_mm_gib(model_cfg, tokens)
    have = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    return f"skipped: batched_mm gathers {need:.0f} GiB of expert weights per layer, the device has {have:.0f}" \
        if need > have else None


def _optimizer(model):
    import torch
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError):   # a device without the fused kernel
        return torch.optim.AdamW(model.parameters(), lr=1e-4)


def train_rows(model_cfg: Any, batch: int, seq: int, *, iters: int = 10, warmup: int = 3,
               backends: list[str] | tuple[str, ...] = TRAIN_BACKENDS, compile: bool = True,
               device: str | None = None, log=print) -> list[dict]:
    """Training tokens/s of the Mixtral model per experts backend (see the module docstring).

    Args:
      model_cfg: routezoo ``config.model``.
      batch / seq: rows and tokens per row of each step.
      iters / warmup: timed steps (median) and untimed steps before them (the compile).
      backends: experts backends to time.
      compile: ``torch.compile`` the model (``False``: eager).
      device: ``'cuda'`` / ``'cpu'`` (default: the GPU when PyTorch sees one).
      log: called with each row as it completes.

    Returns:
      One row per backend: ``tokens_per_second``, ``step_s``, ``peak_gib`` or ``error``.
    """
    import torch
    import transformers

    from peers import free_torch
    from timing import torch_call_times, torch_device

    device = device or torch_device()
    rows = []
    for impl in backends:
        row = {"side": "transformers", "experts_implementation": impl, "compiled": compile,
               "batch": batch, "seq_len": seq,
               "versions": f"torch {torch.__version__}, transformers {transformers.__version__}"}
        why = _fits(impl, model_cfg, batch * seq, device)
        if why:
            row["error"] = why
        else:
            try:
                model = build(model_cfg, impl, device, train=True)
                opt = _optimizer(model)
                fwd = torch.compile(model) if compile else model
                tokens = torch.randint(2, int(model_cfg.vocab_size), (batch, seq), device=device)

                def step():
                    out = fwd(input_ids=tokens, labels=tokens)
                    out.loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                t = statistics.median(torch_call_times(step, iters=iters, warmup=warmup))
                row.update(step_s=t, tokens_per_second=batch * seq / t)
                if device == "cuda":
                    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            except Exception as e:  # noqa: BLE001 - report and go on (out of memory, missing kernels)
                row["error"] = " ".join(str(e).split())[:300]
            finally:
                model = opt = fwd = tokens = step = None
                free_torch()
        rows.append(row)
        log(row)
    return rows


def generate_rows(model_cfg: Any, batches: list[int], prompt: int, new: int, *, iters: int = 3,
                  warmup: int = 2, backends: list[str] | tuple[str, ...] = GENERATE_BACKENDS,
                  compile: bool | None = None, device: str | None = None, log=print) -> list[dict]:
    """Greedy static-cache ``generate`` tokens/s per batch size and experts backend.

    Args:
      model_cfg: routezoo ``config.model``.
      batches: batch sizes.
      prompt / new: prompt tokens and generated tokens per row.
      iters / warmup: timed calls (median) and untimed calls before them.
      backends: experts backends to time.
      compile: transformers' automatic compile of the decoding forward; ``None``: on for
        a GPU, off on the CPU (where inductor's CUDA graphs do not apply).
      device: ``'cuda'`` / ``'cpu'`` (default: the GPU when PyTorch sees one).
      log: called with each row as it completes.

    Returns:
      One row per (backend, batch): ``new_tokens_per_s``, ``s``, ``peak_gib`` or ``error``.
    """
    import torch
    import transformers

    from peers import free_torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    compile = (device == "cuda") if compile is None else compile
    rows = []
    for impl in backends:
        model = None
        try:
            model = build(model_cfg, impl, device, train=False)
        except Exception as e:  # noqa: BLE001
            err = " ".join(str(e).split())[:300]
            for b in batches:
                rows.append({"side": "transformers", "experts_implementation": impl, "batch": b, "error": err})
                log(rows[-1])
            continue
        for b in batches:
            row = {"side": "transformers", "experts_implementation": impl, "batch": b, "prompt": prompt, "new": new,
                   "compiled": compile, "cache": "static",
                   "versions": f"torch {torch.__version__}, transformers {transformers.__version__}"}
            try:
                g = torch.Generator(device="cpu").manual_seed(0)
                ids = torch.randint(2, int(model_cfg.vocab_size), (b, prompt), generator=g).to(device)
                kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, cache_implementation="static", pad_token_id=0)
                if compile and device != "cuda":
                    cc = transformers.CompileConfig()
                    cc._compile_all_devices = True
                    kw["compile_config"] = cc
                elif not compile:
                    kw["disable_compile"] = True

                def gen():
                    return model.generate(ids, **kw)   # generate runs under torch.no_grad itself

                for _ in range(warmup):
                    out = gen()
                got = int(out.shape[1]) - prompt
                if got != new:
                    raise RuntimeError(f"generate returned {got} new tokens, asked for {new}")
                ts = []
                for _ in range(iters):
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    gen()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t0)
                t = statistics.median(ts)
                row.update(s=t, new_tokens_per_s=b * new / t)
                if device == "cuda":
                    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            except Exception as e:  # noqa: BLE001 - report and go on
                row["error"] = " ".join(str(e).split())[:300]
            torch._dynamo.reset()   # the next batch size compiles afresh
            rows.append(row)
            log(row)
        model = None
        free_torch()
    return rows
