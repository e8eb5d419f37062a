"""``routezoo compose``: a library of trained runs behind one model, and routers over it.

    routezoo compose train-router --library W1,W2,... --workdir OUT [--routers tryage,coe,retriever]
    routezoo compose eval --workdir OUT [--cost-weights 0,0.1,0.5] [--json FILE]

The library (:func:`load_library`): each ``W`` is a training workdir, either a full model
(a plain run, a merged or transformed workdir, or an adapter run whose method merges into
the weights, served merged) or a LoRA run (``adapter.method=lora``) on a base workdir
(``init.from_workdir``; a LoRA on another base, ``init.from_hf``, is served merged as a full
model). LoRA runs on one base share one engine and are served together by
:class:`~routezoo.layers.adapters.multi_lora.MultiLoRA` (one forward, an adapter id per
sequence); a full member that is that base is the engine's slot 0. The members and the
routing rules are :mod:`routezoo.zoo.compose`.

Router data. The domains are the members' ``data.tasks`` (stdlib packages), or
``--domains``. Each domain gives up to ``--rows`` packed rows of its validation documents
(``data.eval_split``); the first half of each domain's rows fits the routers, the second
half is what ``compose eval`` scores. A sequence's prompt is its first ``--prefix`` tokens
(what the routers read); its loss is over the tokens after the prompt. The members' true
losses on the fitting rows are the routers' training targets.

Routers (``--routers``; ``oracle`` needs no training and is always evaluated):

- an encoder (``encoder_mlm``) embeds prompts: ``--encoder DIR`` (a trained run) or, by
  default, a fresh one trained for ``--encoder-steps`` steps of masked-token prediction
  on the corpus (the members' data without tasks) through routezoo's train step;
- ``tryage``: the encoder fine-tuned with a regression head to predict every member's
  loss on the prompt (mean squared error on standardised losses), ``--steps`` steps of
  routezoo's optimizer (``make_optimizer``); the choice adds ``--cost-weight`` times each
  member's relative FLOPs per token;
- ``coe``: the encoder fine-tuned with a classification head over the domains
  (cross-entropy), and the table of the best member per domain on the fitting rows;
  ``--entropy-threshold`` sends uncertain prompts to the best member overall;
- ``retriever``: the frozen encoder's pooled features of the fitting rows are the pilots,
  each labelled with its lowest-loss member (``--pool nearest`` or ``mean``).

What ``OUT`` gets (assembled in a temporary sibling directory and renamed into place):
``compose.json`` (the library's workdirs and members, domains, data settings, router
settings and training losses), ``encoder/config.json`` and ``encoder/params.npz``, and
``routers/NAME.npz`` for each trained router. ``compose eval`` reads it, loads the library
again from the recorded workdirs and prints bits per byte of every member, the best single
member, uniform random choice (its expectation), each router and the oracle, with each
router's FLOPs per routed prompt; ``OUT/eval.json`` (or ``--json``) holds every number.

Refused in one line with exit code 2, before anything is written: an unknown router; an
``OUT`` that exists and is not empty; a library of fewer than two members or naming a
workdir twice; a workdir that is missing, not a workdir, without an intact checkpoint, or
corrupt; an adapter run whose adapter does not load or acts on activations; members that disagree in vocabulary (``model.vocab_size`` or the
tokenizer); no domains; a domain that is not a task of the data.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

COMPOSE_JSON = "compose.json"
EVAL_JSON = "eval.json"
ENCODER_DIR = "encoder"
ROUTERS_DIR = "routers"
TRAINED_ROUTERS = ("tryage", "coe", "retriever")
# name: (layers, d_model, heads, kv_heads, head_dim, mlp_dim) of a fresh prompt encoder
ENCODER_SIZES = {"tiny": (2, 64, 2, 1, 32, 128), "small": (4, 256, 4, 2, 64, 1024)}

USAGE = """usage: routezoo compose train-router --library W1,W2,... --workdir OUT [flags]
       routezoo compose eval --workdir OUT [--cost-weights L1,L2,...] [--json FILE]

train-router:
  --library W1,W2,...   training workdirs: full models, or LoRA runs on a base workdir (served
                        together, one forward with an adapter id per sequence)
  --workdir OUT         new (or empty) directory for the routers
  --routers R1,R2       of tryage, coe, retriever, oracle (default: tryage,coe,retriever)
  --domains D1,D2       stdlib packages the router data come from (default: the members' data.tasks)
  --rows N              validation rows per domain (default 64): the first half fits, the second is eval's
  --seq-len L           tokens per row (default: the first member's data.seq_len)
  --prefix P            prompt tokens the routers read (default L/2); losses are over the rest
  --steps S             fine-tuning steps of tryage and coe (default 200)
  --batch B             their batch (default 32)
  --lr LR               their peak learning rate (default 1e-3)
  --encoder DIR         a trained encoder workdir (e.g. model.name=encoder_mlm) to embed prompts
  --encoder-steps N     else: masked-token pre-training steps of a fresh encoder (default 300)
  --encoder-size S      its size: tiny | small (default tiny)
  --cost-weight W       tryage: nats per unit of relative member cost (default 0)
  --costs C1,C2,...     tryage: relative member costs (default: FLOPs per token over the cheapest's)
  --entropy-threshold T coe: prompts whose category entropy (nats) exceeds T go to the best member overall
  --pool nearest|mean   retriever: nearest pilot, or nearest per-member mean of the pilots (default nearest)
  --seed S              (default 0)
eval:
  --workdir OUT         a directory written by train-router
  --cost-weights W,...  tryage at these cost weights as well
  --json FILE           also write the results here (always: OUT/eval.json)
"""


class ComposeError(ValueError):
    """A library or router workdir that cannot be used; the message is one line."""


def _line(e: BaseException) -> str:
    return (" ".join(str(e).split()) or type(e).__name__)[:500]


# --------------------------------------------------------------------------- the library


def _read_config(workdir: str):
    from routezoo.training.workdir import read_workdir_config
    if not os.path.isdir(workdir):
        raise ComposeError(f"--library {workdir} is not a directory; give routezoo training workdirs")
    try:
        return read_workdir_config(workdir)
    except (FileNotFoundError, ValueError) as e:
        raise ComposeError(f"--library {workdir}: {_line(e)}") from None


def vocabulary_of(config) -> tuple:
    """What fixes a run's token ids: ``model.vocab_size`` and the tokenizer (kind, file,
    SentencePiece settings)."""
    from routezoo.training.data.tokenizers import tokenizer_choice
    kind, path = tokenizer_choice(config)
    d = config.data
    spm = (str(d.get("spm_model", "")), int(d.get("spm_vocab_size", 0))) if kind == "sentencepiece" else ()
    return (int(config.model.vocab_size), kind, os.path.abspath(path) if path else "", *spm)


def _describe_vocab(v: tuple) -> str:
    out = f"vocab_size {v[0]}, {v[1]} tokenizer"
    return out + (f" {v[2]}" if v[2] else "") + (f" {v[3] or '(trained)'} size {v[4]}" if len(v) > 3 else "")


def _kind(config) -> str:
    """``'lora'`` (served by multi_lora) or ``'full'``; activation adapters refused."""
    from routezoo.layers import adapters as adapter_lib
    from routezoo.layers.adapters import hooks as adapter_hooks
    from routezoo.training.adapter_run import adapter_config
    method = str(config.adapter.get("method", ""))
    if not method:
        return "full"
    if method == "lora" and str(config.init.get("from_workdir", "")):
        return "lora"
    try:
        adapter = adapter_lib.from_config(adapter_config(config))
    except ValueError as e:
        raise ComposeError(_line(e)) from None
    if adapter_hooks.is_activation_adapter(adapter) and not adapter.mergeable:
        raise ComposeError(f"adapter.method={method!r} acts on activations (it needs task ids or its own routing), "
                           "so it is not one model; compose LoRA runs, merged adapters or full models")
    return "full"


def _load_full(workdir: str, log):
    import jax
    from routezoo.training.workdir import load_trained
    try:
        config, model, state = load_trained(workdir, log=log)
    except Exception as e:  # noqa: BLE001 - Orbax and the restore raise many types for damaged runs
        raise ComposeError(f"--library {workdir}: {_line(e)}") from None
    host = jax.device_get({"params": state.params, **state.model_state})
    return config, model, host


def _check_workdirs(workdirs: Sequence[str]) -> list[str]:
    workdirs = [os.path.abspath(w) for w in workdirs]
    if len(workdirs) < 2:
        raise ComposeError(f"--library names {len(workdirs)} workdir(s); a composition needs at least two members")
    twice = sorted({w for w in workdirs if workdirs.count(w) > 1})
    if twice:
        raise ComposeError(f"--library names {twice[0]} more than once")
    return workdirs


def load_library(workdirs: Sequence[str], *, seq_len: int | None = None, log: Callable[[str], None] = print):
    """The :class:`~routezoo.zoo.compose.Library` of ``workdirs`` (module docstring).

    Returns:
      ``(library, configs)``: ``configs[i]`` is member ``i``'s config.

    Raises:
      ComposeError: a refused library (module docstring), one line.
    """
    from routezoo import zoo
    from routezoo.layers.adapters.multi_lora import MultiLoRA
    from routezoo.training.adapter_run import ADAPTER_DIR, load_adapter
    from routezoo.training.data import get_tokenizer
    from routezoo.zoo import compose as C
    from routezoo.zoo import stack

    workdirs = _check_workdirs(workdirs)
    configs = [_read_config(w) for w in workdirs]
    vocabs = [vocabulary_of(c) for c in configs]
    if len(set(vocabs)) > 1:
        raise ComposeError("library members disagree in vocabulary: " + "; ".join(
            f"{w} ({_describe_vocab(v)})" for w, v in zip(workdirs, vocabs)) + "; compose runs of one tokenizer")
    kinds = []
    for w, c in zip(workdirs, configs):
        try:
            kinds.append(_kind(c))
        except ComposeError as e:
            raise ComposeError(f"--library {w}: {e}") from None
    seq_len = int(seq_len or configs[0].data.seq_len)

    engines: list[C.Engine] = []
    members: list[C.Member | None] = [None] * len(workdirs)
    bases: dict[str, dict] = {}   # base workdir -> {'engine', 'params', 'loras': [(i, params, cfg)]}
    for i, (w, c, kind) in enumerate(zip(workdirs, configs, kinds)):
        if kind != "lora":
            continue
        base = os.path.abspath(str(c.init.from_workdir))
        if base not in bases:
            if not os.path.isdir(base):
                raise ComposeError(f"--library {w}: its base {base} (init.from_workdir) is not a directory")
            base_config, _, host = _load_full(base, log)
            params = stack.to_layout(stack.to_unscanned(host["params"], base_config.model), c.model)
            bases[base] = {"config": c, "variables": {**host, "params": params}, "loras": [],
                           "flops": C.forward_flops_per_token(zoo.build(c.model), seq_len)}
        entry = bases[base]
        try:
            _, params, meta = load_adapter(os.path.join(w, ADAPTER_DIR), entry["variables"]["params"])
        except FileNotFoundError as e:
            raise ComposeError(f"--library {w} is a LoRA run without a readable adapter: {_line(e)}") from None
        except ValueError as e:   # another base (fingerprint)
            raise ComposeError(f"--library {w} is not a LoRA on its base {base}: {_line(e)}") from None
        except Exception as e:  # noqa: BLE001 - Orbax raises many types for damaged files
            raise ComposeError(f"--library {w}: its adapter does not load ({_line(e)})") from None
        entry["loras"].append((i, params, meta["adapter"]))
    for base, entry in bases.items():
        loras = entry["loras"]
        try:
            stacked = MultiLoRA.stack(entry["variables"]["params"], [p for _, p, _ in loras], [a for _, _, a in loras])
        except ValueError as e:
            raise ComposeError(f"the LoRA runs on {base} cannot be served together: {_line(e)}") from None
        engine = len(engines)
        engines.append(C.Engine(zoo.build(entry["config"].model), entry["variables"], stacked, MultiLoRA(targets=".*")))
        for n, (i, params, _) in enumerate(loras):
            members[i] = C.Member(workdirs[i], engine, n + 1, entry["flops"] + C.lora_flops_per_token(params), "lora",
                                  str(configs[i].data.get("tasks", "")))
        entry["engine"] = engine
    for i, (w, c, kind) in enumerate(zip(workdirs, configs, kinds)):
        if kind == "lora":
            continue
        domain = str(c.data.get("tasks", ""))
        if w in bases:   # the base of LoRA members: their engine's slot 0
            members[i] = C.Member(w, bases[w]["engine"], 0, bases[w]["flops"], "full", domain)
            continue
        _, model, host = _load_full(w, log)
        engines.append(C.Engine(model, host))
        members[i] = C.Member(w, len(engines) - 1, 0, C.forward_flops_per_token(model, seq_len), "full", domain)
    token_bytes = get_tokenizer(configs[0].data).token_bytes
    try:
        library = C.Library(engines, members, token_bytes)
    except ValueError as e:
        raise ComposeError(_line(e)) from None
    return library, configs


# --------------------------------------------------------------------------- router data


def rows_to_data(rows: np.ndarray, pad_id: int, prefix: int, domain: int | np.ndarray = 0) -> dict[str, np.ndarray]:
    """Packed rows ``[N, L + 1]`` as router data: ``inputs``/``targets`` ``[N, L]``, ``weights``
    (1 on real targets after the prompt: positions ``>= prefix - 1``), ``domain`` ``[N]``."""
    rows = np.asarray(rows).astype(np.int32)
    inputs, targets = rows[:, :-1], rows[:, 1:]
    weights = (targets != pad_id).astype(np.float32)
    weights[:, :max(prefix - 1, 0)] = 0.0
    domain = np.broadcast_to(np.asarray(domain, np.int32), (len(rows),)).copy()
    return {"inputs": inputs, "targets": targets, "weights": weights, "domain": domain}


def concat(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    keys = set.intersection(*(set(p) for p in parts))
    return {k: np.concatenate([p[k] for p in parts]) for k in sorted(keys)}


def take(data: dict[str, np.ndarray], idx) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in data.items()}


def check_domains(config, domains: Sequence[str]) -> None:
    """The domains are tasks of ``config``'s data (stdlib packages), each named once."""
    import ml_collections

    from routezoo.training import data as data_lib
    c = ml_collections.ConfigDict(config.data.to_dict())
    c.tasks = ",".join(domains)
    try:
        data_lib.ensure_dataset(c)
        data_lib.task_names(c)
    except ValueError as e:
        raise ComposeError(f"--domains: {_line(e)}") from None


def domain_data(config, domains: Sequence[str], rows: int, seq_len: int, prefix: int
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(fit, eval)`` router data: per domain up to ``rows`` packed rows of its validation
    documents, the first half for fitting and the second for evaluation (module docstring)."""
    import ml_collections

    from routezoo.training import data as data_lib

    c = ml_collections.ConfigDict(config.to_dict())
    c.data.seq_len, c.train.batch_size = seq_len, 16
    c.train.eval_steps = max(1, math.ceil(rows / 16))
    c.data.tasks = ",".join(domains)
    try:
        data_lib.ensure_dataset(c.data)
        data_lib.task_names(c.data)
    except ValueError as e:
        raise ComposeError(f"--domains: {_line(e)}") from None
    fit, ev = [], []
    for d, name in enumerate(domains):
        try:
            batches = list(data_lib.eval_batches(c, task=name))
        except ValueError as e:
            raise ComposeError(f"domain {name!r}: {_line(e)}") from None
        got = {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in ("inputs", "targets", "weights")
               if k in batches[0]}
        for k in ("segment_ids", "positions"):
            if k in batches[0]:
                got[k] = np.concatenate([np.asarray(b[k]) for b in batches])
        keep = np.nonzero(got["weights"].sum(1) > 0)[0][:rows]
        if len(keep) < 2:
            raise ComposeError(f"domain {name!r} has {len(keep)} validation row(s) of {seq_len} tokens; "
                               "it needs at least 2 (one to fit, one to evaluate)")
        got = take(got, keep)
        got["weights"] = got["weights"].astype(np.float32)
        got["weights"][:, :max(prefix - 1, 0)] = 0.0
        got["domain"] = np.full(len(keep), d, np.int32)
        half = len(keep) // 2
        fit.append(take(got, slice(0, half)))
        ev.append(take(got, slice(half, None)))
    return concat(fit), concat(ev)


def chunks(data: dict[str, np.ndarray], batch: int):
    """``(start, n, batch dict)`` over ``data`` in batches of exactly ``batch`` rows (the last
    padded with rows of weight 0), so each function compiles once."""
    n = len(data["inputs"])
    for start in range(0, n, batch):
        part = take(data, slice(start, start + batch))
        k = len(part["inputs"])
        if k < batch:
            part = {key: np.concatenate([v, np.zeros((batch - k, *v.shape[1:]), v.dtype)]) for key, v in part.items()}
        yield start, k, part


def member_scores(library, data: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """Every member's per-sequence ``nll``/``loss`` ``[N, M]``, ``tokens`` and ``bytes`` ``[N]``."""
    out: dict[str, list] = {}
    for _, k, part in chunks(data, batch):
        for key, v in library.member_scores(part).items():
            out.setdefault(key, []).append(v[:k])
    return {k: np.concatenate(v) for k, v in out.items()}


# --------------------------------------------------------------------------- router training


def encoder_config(data_config, vocab_size: int, seq_len: int, size: str = "tiny", *, steps: int = 300,
                   batch: int = 16, lr: float = 2e-3, seed: int = 0):
    """The config of a fresh prompt encoder: ``encoder_mlm`` of ``ENCODER_SIZES[size]`` with
    one more id than the library's vocabulary (the mask id), on ``data_config``'s corpus
    without tasks."""
    import ml_collections

    from routezoo.configs import base
    c = base.get_config()
    c.data = ml_collections.ConfigDict(data_config.to_dict())
    c.data.tasks, c.data.seq_len = "", seq_len
    layers, d, h, kv, hd, f = ENCODER_SIZES[size]
    m = c.model
    m.name, m.vocab_size = "encoder_mlm", vocab_size + 1
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = layers, d, h, kv, hd
    m.ffn, m.mlp_dim, m.scan_layers = "mlp", f, False
    c.train.steps, c.train.batch_size, c.seed = steps, batch, seed
    c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.weight_decay = lr, max(steps // 20, 1), 0.0
    c.mesh.data = -1
    return c


def train_encoder(config, batches: Callable[[], dict], log: Callable[[str], None] = print) -> dict:
    """Trains ``config.model`` (an encoder, masked-token objective) for ``config.train.steps``
    steps of routezoo's train step on ``batches()``; returns its variables on the host."""
    import jax
    from flax import linen as nn
    from jax.sharding import NamedSharding

    from routezoo import zoo
    from routezoo.layers import sharding as shd
    from routezoo.training.optim import make_optimizer
    from routezoo.training.state import create_state, mesh_and_rules, state_shardings
    from routezoo.training.step import make_train_step

    mesh, rules = mesh_and_rules(config)
    model = zoo.build(config.model)
    tx, schedule = make_optimizer(config.optimizer, config.train.steps)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        bs = NamedSharding(mesh, shd.batch_spec(1))
        _, shardings, _ = state_shardings(model, tx, config, mesh, rules)
        state = create_state(model, tx, config, shardings)
        step = jax.jit(make_train_step(model, tx, config, schedule), in_shardings=(shardings, bs),
                       out_shardings=(shardings, None), donate_argnums=0)
        metrics = None
        for _ in range(int(config.train.steps)):
            b = batches()
            b = {k: np.asarray(b[k]) for k in ("inputs", "targets", "weights", "segment_ids", "positions") if k in b}
            state, metrics = step(state, jax.device_put(b, bs))
        if metrics is not None:
            log(f"encoder: {config.train.steps} steps of masked-token prediction, loss {float(metrics['loss']):.4f}")
        return jax.device_get({"params": state.params, **state.model_state})


def _head_optimizer(steps: int, lr: float):
    from routezoo.configs import base
    from routezoo.training.optim import make_optimizer
    o = base.get_config().optimizer
    o.learning_rate, o.warmup_steps, o.weight_decay = lr, max(steps // 10, 1), 0.0
    return make_optimizer(o, steps)[0]


def fit_head(encoder, data: dict[str, np.ndarray], targets: np.ndarray, num_outputs: int, *, loss: str,
             steps: int, batch: int, lr: float, seed: int):
    """Fine-tunes ``encoder`` (a :class:`~routezoo.zoo.compose.PromptEncoder`) with a linear
    head of ``num_outputs`` on the prompts of ``data``: ``loss='mse'`` against float
    ``targets [N, K]``, ``'xent'`` against int ``targets [N]``. Minibatches drawn uniformly
    (``seed``); routezoo's AdamW with warmup and cosine decay. Returns ``(encoder, head,
    final loss)``."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import optax

    from routezoo.zoo import compose as C

    tokens, mask = C.prompt_of(data, encoder.prefix, encoder.pad_id)
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    model, other = encoder.model, {k: v for k, v in encoder.variables.items() if k != "params"}
    d = int(model.cfg.d_model)
    params = {"trunk": encoder.variables["params"], "head": C.init_head(jax.random.PRNGKey(seed), d, num_outputs)}
    tx = _head_optimizer(steps, lr)
    opt_state = tx.init(params)

    def loss_fn(p, tok, msk, y):
        out = C.head_apply(p["head"], C.pooled_features(model, {"params": p["trunk"], **other}, tok, msk))
        if loss == "mse":
            return jnp.mean((out - y) ** 2)
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

    @jax.jit
    def step(p, s, tok, msk, y):
        value, grads = jax.value_and_grad(loss_fn)(p, tok, msk, y)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    rng = np.random.default_rng(seed)
    n, value = len(tokens), float("nan")
    for _ in range(steps):
        idx = rng.choice(n, batch, replace=n < batch)
        params, opt_state, value = step(params, opt_state, tokens[idx], mask[idx], targets[idx])
    params = jax.device_get(params)
    tuned = dataclasses.replace(encoder, variables={"params": params["trunk"], **other})
    return tuned, params["head"], float(value)


def fit_tryage(library, encoder, data, losses: np.ndarray, *, costs=None, cost_weight: float = 0.0, steps: int = 200,
               batch: int = 32, lr: float = 1e-3, seed: int = 0, log=print):
    """Tryage: the encoder with a regression head on every member's (standardised) loss."""
    from routezoo.zoo import compose as C
    mean, std = float(losses.mean()), float(losses.std()) or 1.0
    tuned, head, final = fit_head(encoder, data, ((losses - mean) / std).astype(np.float32), losses.shape[1],
                                  loss="mse", steps=steps, batch=batch, lr=lr, seed=seed)
    log(f"tryage: {steps} steps, final mean squared error {final:.4f} (standardised losses)")
    costs = library.relative_costs() if costs is None else np.asarray(costs, np.float64)
    return C.Tryage(tuned, head, mean, std, costs, cost_weight), final


def fit_coe(library, encoder, data, losses: np.ndarray, categories: Sequence[str], *,
            entropy_threshold: float | None = None, steps: int = 200, batch: int = 32, lr: float = 1e-3, seed: int = 0,
            log=print):
    """CoE: the encoder with a classification head over ``categories`` (``data['domain']``),
    and the table of the best member per category on ``losses``."""
    from routezoo.zoo import compose as C
    tuned, head, final = fit_head(encoder, data, data["domain"].astype(np.int32), len(categories), loss="xent",
                                  steps=steps, batch=batch, lr=lr, seed=seed)
    table, fallback = C.coe_table(losses, data["domain"], len(categories))
    log(f"coe: {steps} steps, final cross-entropy {final:.4f}; table "
        + ", ".join(f"{c} -> {table[i]}" for i, c in enumerate(categories)))
    return C.CoE(tuned, head, table, tuple(categories), fallback, entropy_threshold), final


def fit_retriever(encoder, data, losses: np.ndarray, *, pool: str = "nearest", batch: int = 32):
    """RouterRetriever: pilots = the frozen encoder's features of ``data``'s prompts, each
    labelled with its lowest-loss member."""
    from routezoo.zoo import compose as C
    feats = np.concatenate([encoder.features(part)[:k] for _, k, part in chunks(data, batch)])
    return C.Retriever(encoder, feats.astype(np.float32), np.argmin(losses, axis=1).astype(np.int64), pool)


# --------------------------------------------------------------------------- evaluation


def _bpb(nll: np.ndarray, nbytes: np.ndarray) -> float:
    return float(nll.sum() / math.log(2) / max(float(nbytes.sum()), 1.0))


def evaluate(library, routers: dict, data: dict[str, np.ndarray], *, batch: int = 32, domains: Sequence[str] = (),
             cost_weights: Sequence[float] = ()) -> dict[str, Any]:
    """Bits per byte over ``data``'s weighted tokens of every member, the best single member,
    uniform random choice (its expectation: the mean of the members' totals), and each
    router (its choices scored through :meth:`Library.score`), with each router's FLOPs per
    routed prompt, its agreement with the oracle and how often it chose each member; tryage
    (if present) again at each of ``cost_weights``."""
    from routezoo.zoo import compose as C

    scores = member_scores(library, data, batch)
    nll, nbytes = scores["nll"], scores["bytes"]
    seq_len = int(data["inputs"].shape[1])
    members = [{"name": m.name, "kind": m.kind, "domain": m.domain, "flops_per_token": m.flops_per_token,
                "bpb": _bpb(nll[:, i], nbytes)} for i, m in enumerate(library.members)]
    best = int(np.argmin([m["bpb"] for m in members]))
    oracle = np.argmin(nll, axis=1)
    out: dict[str, Any] = {
        "rows": int(len(nbytes)), "seq_len": seq_len, "members": members,
        "best_single": {"member": best, "name": members[best]["name"], "bpb": members[best]["bpb"],
                        "flops_per_token": members[best]["flops_per_token"]},
        "uniform": {"bpb": float(np.mean([m["bpb"] for m in members])),
                    "flops_per_token": float(library.flops.mean())},
        "routers": {}}

    def record(name, router, choice, composed):
        d = {"bpb": _bpb(composed, nbytes), "agreement_with_oracle": float(np.mean(choice == oracle)),
             "choices": np.bincount(choice, minlength=len(library)).tolist(),
             "flops_per_token_of_chosen": float(library.flops[choice].mean()),
             "router_flops_per_prompt": float(router.flops_per_prompt(library, seq_len))}
        if domains:
            d["per_domain"] = {dom: _bpb(composed[data["domain"] == i], nbytes[data["domain"] == i])
                               for i, dom in enumerate(domains) if (data["domain"] == i).any()}
        out["routers"][name] = d

    for name, router in routers.items():
        choice, composed = [], []
        for _, k, part in chunks(data, batch):
            c = router.choose(library, part)
            composed.append(library.score(part, c)["nll"][:k])
            choice.append(c[:k])
        choice, composed = np.concatenate(choice), np.concatenate(composed)
        record(name, router, choice, composed)
        if isinstance(router, C.Tryage) and cost_weights:
            predicted = np.concatenate([router.predicted_losses(part)[:k] for _, k, part in chunks(data, batch)])
            out["tryage_cost_weight"] = []
            for w in cost_weights:
                c = C.tryage_select(predicted, router.costs, w)
                out["tryage_cost_weight"].append({
                    "cost_weight": float(w), "bpb": _bpb(nll[np.arange(len(c)), c], nbytes),
                    "flops_per_token_of_chosen": float(library.flops[c].mean()),
                    "choices": np.bincount(c, minlength=len(library)).tolist()})
    if "oracle" not in out["routers"]:
        record("oracle", C.Oracle(), oracle, nll[np.arange(len(oracle)), oracle])
    return out


def print_results(res: dict[str, Any], log=print) -> None:
    short = lambda name: os.path.basename(str(name).rstrip("/")) or str(name)  # noqa: E731
    log(f"{'model':28} {'bits/byte':>9} {'oracle agreement':>16} {'router FLOPs/prompt':>20}")
    for m in res["members"]:
        log(f"{'member ' + short(m['name']):28} {m['bpb']:9.4f}")
    log(f"{'best single member':28} {res['best_single']['bpb']:9.4f}")
    log(f"{'uniform random (expected)':28} {res['uniform']['bpb']:9.4f}")
    for name, r in res["routers"].items():
        log(f"{name:28} {r['bpb']:9.4f} {r['agreement_with_oracle']:16.3f} {r['router_flops_per_prompt']:20,.0f}")
    for r in res.get("tryage_cost_weight", []):
        log(f"{'tryage cost weight ' + format(r['cost_weight'], 'g'):28} {r['bpb']:9.4f}   chosen members' "
            f"FLOPs/token {r['flops_per_token_of_chosen']:,.0f}")


# --------------------------------------------------------------------------- saving and loading


def _flat(tree) -> dict[str, np.ndarray]:
    from flax import traverse_util
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _unflat(flat: dict[str, np.ndarray]):
    from flax import traverse_util
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def _save_npz(path: str, **trees) -> None:
    arrays = {}
    for name, tree in trees.items():
        if isinstance(tree, dict):
            arrays.update({f"{name}/{k}": v for k, v in _flat(tree).items()})
        else:
            arrays[name] = np.asarray(tree)
    np.savez(path, **arrays)


def _load_npz(path: str) -> dict[str, Any]:
    with np.load(path) as f:
        flat = {k: f[k] for k in f.files}
    out: dict[str, Any] = {}
    groups: dict[str, dict] = {}
    for k, v in flat.items():
        head, sep, rest = k.partition("/")
        if sep:
            groups.setdefault(head, {})[rest] = v
        else:
            out[k] = v
    out.update({k: _unflat(v) for k, v in groups.items()})
    return out


def check_output(out: str, inputs: Sequence[str]) -> None:
    """``OUT`` must be new or an empty directory, and not inside an input."""
    out = os.path.abspath(out)
    if os.path.lexists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        what = "is not empty" if os.path.isdir(out) else "exists and is not a directory"
        raise ComposeError(f"--workdir {out} {what}; compose never overwrites: give a new or empty directory")
    for src in inputs:
        src = os.path.abspath(src)
        if out == src or out.startswith(src + os.sep):
            raise ComposeError(f"--workdir {out} is inside the library workdir {src}; give a directory outside it")


def load_routers(workdir: str, library=None, log: Callable[[str], None] = print):
    """``(record, library, encoder, routers)`` of a train-router workdir: its ``compose.json``,
    the library (loaded again from the recorded workdirs unless given), the prompt encoder
    and ``{name: Router}``."""
    from routezoo import zoo
    from routezoo.training.workdir import read_workdir_config
    from routezoo.zoo import compose as C

    workdir = os.path.abspath(workdir)
    path = os.path.join(workdir, COMPOSE_JSON)
    if not os.path.isfile(path):
        raise ComposeError(f"{path} not found: --workdir is not a directory written by 'routezoo compose train-router'")
    try:
        with open(path) as f:
            record = json.load(f)
        enc_config = read_workdir_config(os.path.join(workdir, ENCODER_DIR))
        enc = _load_npz(os.path.join(workdir, ENCODER_DIR, "params.npz"))
    except (OSError, ValueError, KeyError) as e:
        raise ComposeError(f"{workdir}: {_line(e)}") from None
    if library is None:
        library, _ = load_library(record["library"], seq_len=record["seq_len"], log=log)
    encoder = C.PromptEncoder(zoo.build(enc_config.model), enc["variables"], int(record["prefix"]), int(record["pad_id"]))
    routers: dict[str, C.Router] = {}
    for name, hyper in record["routers"].items():
        if name not in C.ROUTERS:
            raise ComposeError(f"{path} names an unknown router {name!r}; allowed: {', '.join(C.ROUTERS)}")
        if name == C.Oracle.name:
            routers[name] = C.Oracle()
            continue
        try:
            saved = _load_npz(os.path.join(workdir, ROUTERS_DIR, f"{name}.npz"))
        except (OSError, ValueError) as e:
            raise ComposeError(f"{workdir}: router {name}: {_line(e)}") from None
        routers[name] = router_from_saved(name, hyper, saved, encoder)
    return record, library, encoder, routers


def router_from_saved(name: str, hyper: dict, saved: dict, encoder):
    import dataclasses

    from routezoo.zoo import compose as C
    if name == C.Retriever.name:
        return C.Retriever(encoder, saved["pilots"], saved["pilot_member"], hyper["pool"])
    tuned = dataclasses.replace(encoder, variables={**encoder.variables, "params": saved["trunk"]})
    if name == C.Tryage.name:
        return C.Tryage(tuned, saved["head"], float(saved["loss_mean"]), float(saved["loss_std"]),
                        np.asarray(saved["costs"], np.float64), float(hyper["cost_weight"]))
    return C.CoE(tuned, saved["head"], np.asarray(saved["table"]), tuple(hyper["categories"]), int(saved["fallback"]),
                 hyper.get("entropy_threshold"))


def _save_router(directory: str, router) -> None:
    from routezoo.zoo import compose as C
    path = os.path.join(directory, f"{router.name}.npz")
    if isinstance(router, C.Retriever):
        _save_npz(path, pilots=router.pilots, pilot_member=router.pilot_member)
    elif isinstance(router, C.Tryage):
        _save_npz(path, trunk=router.encoder.variables["params"], head=router.head, loss_mean=router.loss_mean,
                  loss_std=router.loss_std, costs=router.costs)
    elif isinstance(router, C.CoE):
        _save_npz(path, trunk=router.encoder.variables["params"], head=router.head, table=router.table,
                  fallback=router.fallback)


# --------------------------------------------------------------------------- the commands


def train_router(library_dirs: Sequence[str], out: str, *, routers: Sequence[str] = TRAINED_ROUTERS,
                 domains: Sequence[str] | None = None, rows: int = 64, seq_len: int | None = None,
                 prefix: int | None = None, steps: int = 200, batch: int = 32, lr: float = 1e-3,
                 encoder: str | None = None, encoder_steps: int = 300, encoder_size: str = "tiny",
                 cost_weight: float = 0.0, costs: Sequence[float] | None = None,
                 entropy_threshold: float | None = None, pool: str = "nearest", seed: int = 0,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """``routezoo compose train-router`` (module docstring); returns what ``compose.json`` holds."""
    from routezoo.training import data as data_lib
    from routezoo.zoo import compose as C

    try:
        names = C.check_router_names(list(routers))
    except ValueError as e:
        raise ComposeError(_line(e)) from None
    if pool not in C.POOLS:
        raise ComposeError(f"--pool {pool!r}; allowed: {', '.join(C.POOLS)}")
    if encoder_size not in ENCODER_SIZES:
        raise ComposeError(f"--encoder-size {encoder_size!r}; allowed: {', '.join(ENCODER_SIZES)}")
    for flag, value, low in (("--rows", rows, 4), ("--steps", steps, 1), ("--batch", batch, 1),
                             ("--encoder-steps", encoder_steps, 1)):
        if value < low:
            raise ComposeError(f"{flag} must be at least {low}, got {value}")
    out = os.path.abspath(out)
    check_output(out, library_dirs)
    if encoder and not os.path.isdir(encoder):
        raise ComposeError(f"--encoder {encoder} is not a directory; give a trained encoder workdir")
    t0 = time.perf_counter()
    configs = [_read_config(w) for w in _check_workdirs(library_dirs)]
    if costs is not None and len(costs) != len(configs):
        raise ComposeError(f"--costs gives {len(costs)} value(s) for {len(configs)} members")
    seq_len = int(seq_len or configs[0].data.seq_len)
    prefix = int(prefix or seq_len // 2)
    if not 1 <= prefix < seq_len:
        raise ComposeError(f"--prefix must be in [1, {seq_len - 1}] (the rest of the row is scored), got {prefix}")
    if domains is None:
        domains = []
        for c in configs:
            domains += [t.strip() for t in str(c.data.get("tasks", "")).split(",") if t.strip() and t.strip() not in domains]
    if not domains:
        raise ComposeError("no domains: the members have no data.tasks; name the router data's stdlib packages with "
                           "--domains D1,D2,...")
    check_domains(configs[0], domains)
    library, configs = load_library(library_dirs, seq_len=seq_len, log=log)
    fit, _ = domain_data(configs[0], domains, rows, seq_len, prefix)
    pad_id = int(data_lib.get_tokenizer(configs[0].data).pad_id)
    log(f"library: {len(library)} members in {len(library.engines)} engine(s); router data: {len(fit['inputs'])} "
        f"rows from {', '.join(domains)} (prompt {prefix} of {seq_len} tokens)")
    losses = member_scores(library, fit, batch)["loss"]

    if encoder:
        from routezoo.training.workdir import load_trained
        try:
            enc_config, enc_model, enc_state = load_trained(encoder, log=log)
        except Exception as e:  # noqa: BLE001 - a damaged run
            raise ComposeError(f"--encoder {encoder}: {_line(e)}") from None
        if int(enc_config.model.vocab_size) < library.vocab_size:
            raise ComposeError(f"--encoder {encoder} has vocab_size {enc_config.model.vocab_size}, below the library's "
                               f"{library.vocab_size}")
        import jax
        enc_vars = jax.device_get({"params": enc_state.params, **enc_state.model_state})
        enc_source = os.path.abspath(encoder)
    else:
        enc_config = encoder_config(configs[0].data, library.vocab_size, seq_len, encoder_size, steps=encoder_steps,
                                    seed=seed)
        try:
            data_lib.ensure_dataset(enc_config.data)
            it = data_lib.make_train_iterator(enc_config)
        except ValueError as e:
            raise ComposeError(f"encoder data: {_line(e)}") from None
        enc_vars = train_encoder(enc_config, lambda: next(it), log)
        enc_source = f"trained here: {encoder_steps} steps of masked-token prediction ({encoder_size})"
        from routezoo import zoo
        enc_model = zoo.build(enc_config.model)
    enc = C.PromptEncoder(enc_model, enc_vars, prefix, pad_id)

    trained, hyper, final = {}, {}, {}
    for name in names:
        if name == C.Tryage.name:
            trained[name], final[name] = fit_tryage(library, enc, fit, losses, costs=costs, cost_weight=cost_weight,
                                                    steps=steps, batch=batch, lr=lr, seed=seed, log=log)
            hyper[name] = {"cost_weight": cost_weight, "costs": trained[name].costs.tolist(), "steps": steps,
                           "batch": batch, "lr": lr}
        elif name == C.CoE.name:
            trained[name], final[name] = fit_coe(library, enc, fit, losses, domains,
                                                 entropy_threshold=entropy_threshold, steps=steps, batch=batch, lr=lr,
                                                 seed=seed, log=log)
            hyper[name] = {"categories": list(domains), "entropy_threshold": entropy_threshold,
                           "table": trained[name].table.tolist(), "steps": steps, "batch": batch, "lr": lr}
        elif name == C.Retriever.name:
            trained[name] = fit_retriever(enc, fit, losses, pool=pool, batch=batch)
            hyper[name] = {"pool": pool, "pilots": int(len(trained[name].pilots))}
        else:
            trained[name], hyper[name] = C.Oracle(), {}
    record = {"library": [m.name for m in library.members],
              "members": [{"name": m.name, "kind": m.kind, "domain": m.domain, "engine": m.engine, "slot": m.slot,
                           "flops_per_token": m.flops_per_token} for m in library.members],
              "domains": list(domains), "rows": rows, "seq_len": seq_len, "prefix": prefix, "pad_id": pad_id,
              "fit_rows": int(len(fit["inputs"])), "batch": batch, "seed": seed,
              "encoder": {"source": enc_source, "model": enc_config.model.to_dict()},
              "routers": hyper, "final_training_loss": final,
              "seconds": round(time.perf_counter() - t0, 1)}
    _write(out, record, enc_config, enc.variables, trained)
    log(f"routers {', '.join(names)} written to {out}; evaluate with: routezoo compose eval --workdir {out}")
    return record


def _write(out: str, record: dict, enc_config, enc_vars, routers: dict) -> None:
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(out)}.compose-{os.getpid()}")
    try:
        os.makedirs(os.path.join(staging, ENCODER_DIR))
        os.makedirs(os.path.join(staging, ROUTERS_DIR))
        with open(os.path.join(staging, ENCODER_DIR, "config.json"), "w") as f:
            f.write(enc_config.to_json_best_effort(indent=2, sort_keys=True))
        _save_npz(os.path.join(staging, ENCODER_DIR, "params.npz"), variables=enc_vars)
        for router in routers.values():
            _save_router(os.path.join(staging, ROUTERS_DIR), router)
        with open(os.path.join(staging, COMPOSE_JSON), "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        if os.path.isdir(out):
            os.rmdir(out)   # empty (checked)
        os.replace(staging, out)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise ComposeError(f"writing {out} failed: {e.strerror or e}; nothing was left there") from None


def eval_workdir(workdir: str, *, cost_weights: Sequence[float] = (), json_path: str | None = None,
                 batch: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``routezoo compose eval``: the second half of each domain's rows, scored (module
    docstring), in batches of ``batch`` rows (default: train-router's ``--batch``)."""
    record, library, _, routers = load_routers(workdir, log=log)
    batch = int(batch or record.get("batch", 32))
    configs_data = _read_config(record["library"][0])
    _, ev = domain_data(configs_data, record["domains"], int(record["rows"]), int(record["seq_len"]),
                        int(record["prefix"]))
    res = evaluate(library, routers, ev, batch=batch, domains=record["domains"], cost_weights=cost_weights)
    res["workdir"] = os.path.abspath(workdir)
    print_results(res, log)
    for path in {os.path.join(os.path.abspath(workdir), EVAL_JSON), *( [json_path] if json_path else [])}:
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    return res


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ComposeError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def main(argv: list[str]) -> int:
    """``routezoo compose`` flags -> exit code (2 with one line on stderr for any problem)."""
    import argparse

    def fail(message: str) -> int:
        print(f"routezoo: error: compose: {message}", file=sys.stderr)
        return 2

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in ("train-router", "eval"):
        return fail(f"unknown command {command!r}; allowed: train-router, eval")
    if any(a in ("-h", "--help") for a in rest):
        print(USAGE)
        return 0

    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise SystemExit(fail(message))

    p = _Parser(prog=f"routezoo compose {command}", add_help=False)
    p.add_argument("--workdir", required=True)
    if command == "train-router":
        p.add_argument("--library", required=True)
        p.add_argument("--routers", default=",".join(TRAINED_ROUTERS))
        p.add_argument("--domains", default=None)
        p.add_argument("--rows", type=int, default=64)
        p.add_argument("--seq-len", dest="seq_len", type=int, default=None)
        p.add_argument("--prefix", type=int, default=None)
        p.add_argument("--steps", type=int, default=200)
        p.add_argument("--batch", type=int, default=32)
        p.add_argument("--lr", type=float, default=1e-3)
        p.add_argument("--encoder", default=None)
        p.add_argument("--encoder-steps", dest="encoder_steps", type=int, default=300)
        p.add_argument("--encoder-size", dest="encoder_size", default="tiny")
        p.add_argument("--cost-weight", dest="cost_weight", type=float, default=0.0)
        p.add_argument("--costs", default=None)
        p.add_argument("--entropy-threshold", dest="entropy_threshold", type=float, default=None)
        p.add_argument("--pool", default="nearest")
        p.add_argument("--seed", type=int, default=0)
    else:
        p.add_argument("--cost-weights", dest="cost_weights", default="")
        p.add_argument("--json", default=None)
    try:
        a = p.parse_args(rest)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        if command == "eval":
            eval_workdir(a.workdir, cost_weights=_floats(a.cost_weights, "--cost-weights"), json_path=a.json)
            return 0
        library = [w.strip() for w in a.library.split(",") if w.strip()]
        domains = None if a.domains is None else [d.strip() for d in a.domains.split(",") if d.strip()]
        train_router(library, a.workdir, routers=a.routers.split(","), domains=domains, rows=a.rows,
                     seq_len=a.seq_len, prefix=a.prefix, steps=a.steps, batch=a.batch, lr=a.lr, encoder=a.encoder,
                     encoder_steps=a.encoder_steps, encoder_size=a.encoder_size, cost_weight=a.cost_weight,
                     costs=None if a.costs is None else _floats(a.costs, "--costs"),
                     entropy_threshold=a.entropy_threshold, pool=a.pool, seed=a.seed)
    except ComposeError as e:
        return fail(_line(e))
    return 0


__all__ = ["COMPOSE_JSON", "ComposeError", "ENCODER_SIZES", "EVAL_JSON", "chunks", "concat", "domain_data",
           "encoder_config", "eval_workdir", "evaluate", "fit_coe", "fit_head", "fit_retriever", "fit_tryage",
           "load_library", "load_routers", "main", "member_scores", "print_results", "rows_to_data", "take",
           "train_encoder", "train_router", "vocabulary_of"]
