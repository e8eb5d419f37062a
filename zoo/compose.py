"""Composition of whole models: a library of trained models behind one ``score`` /
``generate`` interface, and routers that choose one member per sequence.

Einsum letters: ``B`` sequences, ``L`` length, ``P`` prompt (prefix) length, ``D`` embed,
``M`` library members, ``C`` categories, ``N`` pilot examples, ``V`` vocab, ``K`` a head's
outputs (``M`` for tryage, ``C`` for coe).

A :class:`Library` holds **engines** and **members**. An engine is one model with its
variables and, optionally, a frozen stack of LoRA adapters served through
:class:`~routezoo.layers.adapters.multi_lora.MultiLoRA` (slot 0 the engine's own weights,
slot ``n`` its ``n``-th LoRA). A member is one (engine, slot) pair: a full model is an
engine of its own at slot 0; the LoRA runs of one base share the base's engine, so a batch
whose sequences chose different LoRAs runs as one forward pass with a per-sequence adapter
id. Every member of a library must share one vocabulary (checked here by size; the
training-side loader also compares tokenizers).

``Library.score(batch, choice)`` is the chosen member's per-sequence loss; for each engine
that some sequence chose, one forward pass over the whole batch with each sequence's slot,
the rows of that engine kept. A row's computation does not depend on the other rows, so the
composed score equals the member's own score (:meth:`Library.member_scores`) bit for bit.
``Library.generate(prompt, choice, ...)`` continues each prompt with its member's sampler
(:func:`routezoo.zoo.sampling.sample`), again one call per engine.

Routers (:data:`ROUTERS`) read the first ``prefix`` tokens of each sequence (the prompt) and
return a member per sequence:

- ``oracle``: the member with the lowest true loss on the sequence. It reads the targets it
  is scored on, so it is a reference (an upper bound for routing), not a router one can
  deploy.
- ``tryage``: Hari & Thomson 2023, "Tryage: Real-time, intelligent Routing of User Prompts
  to Large Language Models". A small model (here a routezoo encoder with a regression head)
  predicts each member's loss on the prompt; the choice is
  ``argmin_m  predicted_loss_m + cost_weight · cost_m`` (:func:`tryage_select`), where
  ``cost_m`` is the member's relative cost (its FLOPs per token over the cheapest member's).
- ``coe``: Jain et al. 2024, "Composition of Experts: A Modular Compound AI System
  Leveraging Large Language Models". Two steps: a category classifier on the prompt, then a
  category-to-member table; the table holds, per category, the member with the lowest mean
  loss on that category's router data (:func:`coe_table`, :func:`coe_select`). With
  ``entropy_threshold`` set, a prompt whose category distribution has a higher entropy goes
  to a fallback member (the best over all categories) instead.
- ``retriever``: Lee et al. 2024, "RouterRetriever: Routing over a Mixture of Expert
  Embedding Models". Pilot examples are embedded by a routezoo encoder (the final norm's
  output mean-pooled over the prompt's tokens) and labelled with the member that has the
  lowest loss on them; a prompt goes to the member of its nearest pilot by cosine
  similarity (``pool='nearest'``), or of the nearest per-member mean of the pilots
  (``pool='mean'``) (:func:`retriever_select`).

The encoders are routezoo models (``encoder_mlm``, or any zoo model with a ``final_norm``):
:func:`pooled_features` reads the final norm's output with Flax's
``capture_intermediates``, which is differentiable, so the same function serves the frozen
retriever and the fine-tuned tryage and coe heads. Training the routers (and reading
workdirs) is :mod:`routezoo.training.compose`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from routezoo.layers.adapters import hooks as adapter_hooks
from routezoo.layers.adapters.multi_lora import MultiLoRA
from routezoo.zoo.lm import cross_entropy

Params = Any
Batch = dict[str, Any]


# --------------------------------------------------------------------------- engines and members


@dataclasses.dataclass(frozen=True)
class Member:
    """One member of a library: ``slot`` of ``engine`` (slot 0: the engine's own weights).

    Attributes:
      name: a label (a workdir path, a package name).
      engine: index into :attr:`Library.engines`.
      slot: the adapter slot in that engine's LoRA stack; 0 for the engine's own weights.
      flops_per_token: forward FLOPs per token of this member run on its own (a LoRA
        unmerged: its base plus ``2·r·(I + O)`` per adapted weight).
      kind: ``'full'`` or ``'lora'``.
      domain: what it was fine-tuned on (its ``data.tasks``), ``''`` if nothing in particular.
    """

    name: str
    engine: int
    slot: int
    flops_per_token: float
    kind: str = "full"
    domain: str = ""


@dataclasses.dataclass
class Engine:
    """One model and its variables, with an optional frozen LoRA stack.

    Attributes:
      model: the Flax module (hashable: a static argument of the jitted calls).
      variables: ``{'params': ..., **model_state}``.
      stacked: :meth:`MultiLoRA.stack` of its LoRA members, or ``None``.
      multi: the :class:`MultiLoRA` serving the stack, or ``None``.
    """

    model: nn.Module
    variables: dict
    stacked: Params = None
    multi: MultiLoRA | None = None

    @property
    def num_slots(self) -> int:
        if self.stacked is None:
            return 1
        return int(jax.tree.leaves(self.stacked)[0].shape[0])


def forward_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token of ``model`` (:func:`routezoo.zoo.flops_per_token`, active
    parameters counted from the model's own boxed shapes, so a MoE counts its top-k)."""
    from routezoo import zoo
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, seq_len), jnp.int32)))["params"]
    _, active = zoo.count_params(boxed, model.cfg, seq_len)
    return float(zoo.flops_per_token(model.cfg, seq_len, active)["forward"])


def lora_flops_per_token(lora_params: Params) -> float:
    """Extra forward FLOPs per token of a LoRA run unmerged: ``2·r·(I + O)`` per adapted
    weight, i.e. twice its number of factor entries."""
    return 2.0 * float(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(lora_params))))


def _packed(batch: Batch) -> dict:
    return {k: jnp.asarray(batch[k]) for k in ("segment_ids", "positions") if k in batch}


@functools.partial(jax.jit, static_argnames=("model", "multi"))
def _engine_nll(model, multi, variables, stacked, slots, inputs, targets, weights, packed):
    """Per-sequence summed NLL ``[B]`` of ``model`` with adapter slot ``slots[b]`` per row."""
    with adapter_hooks.bind(multi, variables["params"], stacked, task_ids=slots):
        logits, _ = model.apply(variables, inputs, deterministic=True, **packed)
    nll, _ = cross_entropy(logits, targets, weights)
    return nll.sum(-1)


@functools.partial(jax.jit, static_argnames=("model", "multi", "num_tokens", "top_k"))
def _engine_generate(model, multi, variables, stacked, slots, prompt, rng, temperature, *, num_tokens, top_k):
    from routezoo.zoo import sampling
    with adapter_hooks.bind(multi, variables["params"], stacked, task_ids=slots):
        # the unjitted body: a trace here sees the binding (multi_lora's module docstring)
        return sampling.sample.__wrapped__(model, variables, prompt, rng, num_tokens=num_tokens,
                                           temperature=temperature, top_k=top_k)


class Library:
    """Members (:class:`Member`) served by engines (:class:`Engine`); module docstring.

    Args:
      engines: the engines.
      members: the members, in the order their indices (``choice`` values) refer to.
      token_bytes: UTF-8 bytes per token id (for bits per byte), or ``None``.

    Raises:
      ValueError: no members, a member naming a missing engine or slot, or engines whose
        vocabularies differ (one line).
    """

    def __init__(self, engines: Sequence[Engine], members: Sequence[Member], token_bytes: Any = None):
        self.engines, self.members = list(engines), list(members)
        if not self.members:
            raise ValueError("a library needs at least one member")
        for i, m in enumerate(self.members):
            if not 0 <= m.engine < len(self.engines):
                raise ValueError(f"member {i} ({m.name}) names engine {m.engine}; the library has "
                                 f"{len(self.engines)}")
            if not 0 <= m.slot < self.engines[m.engine].num_slots:
                raise ValueError(f"member {i} ({m.name}) names slot {m.slot} of engine {m.engine}, which has "
                                 f"{self.engines[m.engine].num_slots}")
        vocab = [int(e.model.cfg.vocab_size) for e in self.engines]
        if len(set(vocab)) > 1:
            raise ValueError("library members disagree in vocabulary: vocab_size "
                             + ", ".join(f"{m.name}: {vocab[m.engine]}" for m in self.members))
        self.vocab_size = vocab[0]
        self.token_bytes = None if token_bytes is None else np.asarray(token_bytes, np.float64)

    def __len__(self) -> int:
        return len(self.members)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def flops(self) -> np.ndarray:
        """Forward FLOPs per token of each member ``[M]``."""
        return np.asarray([m.flops_per_token for m in self.members], np.float64)

    def relative_costs(self) -> np.ndarray:
        """Each member's FLOPs per token over the cheapest member's ``[M]`` (1 = cheapest)."""
        f = self.flops
        return f / f.min()

    # ----------------------------------------------------------------- scoring

    def _slots(self, choice: np.ndarray, engine: int) -> np.ndarray:
        slots = np.asarray([self.members[c].slot if self.members[c].engine == engine else 0 for c in choice],
                           np.int32)
        return slots

    def _nll(self, engine: int, slots: np.ndarray, batch: Batch) -> np.ndarray:
        e = self.engines[engine]
        out = _engine_nll(e.model, e.multi, e.variables, e.stacked, jnp.asarray(slots, jnp.int32),
                          jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"]),
                          jnp.asarray(batch["weights"], jnp.float32), _packed(batch))
        return np.asarray(jax.device_get(out))

    def _sums(self, batch: Batch, nll: np.ndarray) -> dict[str, np.ndarray]:
        w = np.asarray(batch["weights"], np.float64)
        out = {"nll": nll, "tokens": w.sum(-1)}
        tokens = np.maximum(out["tokens"], 1.0)
        out["loss"] = nll / (tokens if nll.ndim == 1 else tokens[:, None])
        if self.token_bytes is not None:
            out["bytes"] = (self.token_bytes[np.asarray(batch["targets"])] * w).sum(-1)
        return out

    def check_choice(self, choice: Any, batch_size: int) -> np.ndarray:
        choice = np.asarray(choice)
        if choice.shape != (batch_size,) or not np.issubdtype(choice.dtype, np.integer):
            raise ValueError(f"choice must be integer [{batch_size}] (one member per sequence), got "
                             f"{choice.dtype} {list(choice.shape)}")
        bad = choice[(choice < 0) | (choice >= len(self.members))]
        if bad.size:
            raise ValueError(f"choice {int(bad[0])} out of range; the library has members 0..{len(self.members) - 1}")
        return choice.astype(np.int64)

    def score(self, batch: Batch, choice: Any) -> dict[str, np.ndarray]:
        """The chosen member's per-sequence loss.

        Args:
          batch: ``{'inputs', 'targets', 'weights'}`` ``[B, L]`` (optionally
            ``'segment_ids'``, ``'positions'`` of packed rows).
          choice: int ``[B]``, a member index per sequence.

        Returns:
          numpy ``[B]`` arrays: ``nll`` (summed over the weighted tokens), ``tokens`` (the
          weights' sum), ``loss`` (``nll / tokens``) and, with ``token_bytes``, ``bytes``.
        """
        b = np.asarray(batch["inputs"]).shape[0]
        choice = self.check_choice(choice, b)
        nll = np.zeros(b, np.float32)
        engines = np.asarray([self.members[c].engine for c in choice])
        for engine in sorted(set(engines.tolist())):
            rows = engines == engine
            nll = np.where(rows, self._nll(engine, self._slots(choice, engine), batch), nll)
        return self._sums(batch, nll)

    def member_scores(self, batch: Batch, members: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Every member's per-sequence loss (each member on the whole batch).

        Returns:
          ``nll`` and ``loss`` ``[B, M]`` (columns in ``members`` order, default all),
          ``tokens`` and (with ``token_bytes``) ``bytes`` ``[B]``.
        """
        members = list(range(len(self.members))) if members is None else list(members)
        b = np.asarray(batch["inputs"]).shape[0]
        cols = [self._nll(self.members[m].engine, np.full(b, self.members[m].slot, np.int32), batch) for m in members]
        return self._sums(batch, np.stack(cols, axis=1))

    def generate(self, prompt: Any, choice: Any, rng: jax.Array, *, num_tokens: int, temperature: float = 0.0,
                 top_k: int = 0) -> np.ndarray:
        """Continues ``prompt`` int32 ``[B, P]`` by ``num_tokens`` tokens, each row with its
        chosen member's sampler; ``[B, P + num_tokens]`` (the rows of one member equal that
        member's own generation from the same ``rng``)."""
        prompt = np.asarray(prompt)
        choice = self.check_choice(choice, prompt.shape[0])
        out = np.zeros((prompt.shape[0], prompt.shape[1] + num_tokens), prompt.dtype)
        engines = np.asarray([self.members[c].engine for c in choice])
        for engine in sorted(set(engines.tolist())):
            e = self.engines[engine]
            got = _engine_generate(e.model, e.multi, e.variables, e.stacked,
                                   jnp.asarray(self._slots(choice, engine), jnp.int32), jnp.asarray(prompt), rng,
                                   jnp.float32(temperature), num_tokens=num_tokens, top_k=top_k)
            out = np.where((engines == engine)[:, None], np.asarray(jax.device_get(got)), out)
        return out

    @classmethod
    def from_lora(cls, model: nn.Module, variables: dict, loras: Sequence[tuple[str, Params, Any]], *,
                  base_name: str | None = None, seq_len: int = 128, domains: Sequence[str] | None = None,
                  token_bytes: Any = None) -> "Library":
        """One engine: the LoRA runs ``loras`` (``(name, lora params, LoRA or config.adapter
        dict)``) on ``variables['params']`` (unscanned), served by one multi-LoRA forward;
        with ``base_name`` the base itself is member 0 (slot 0)."""
        stacked = MultiLoRA.stack(variables["params"], [p for _, p, _ in loras], [c for _, _, c in loras])
        base_flops = forward_flops_per_token(model, seq_len)
        domains = list(domains) if domains is not None else [""] * len(loras)
        members = [] if base_name is None else [Member(base_name, 0, 0, base_flops, "full")]
        members += [Member(name, 0, n + 1, base_flops + lora_flops_per_token(p), "lora", domains[n])
                    for n, (name, p, _) in enumerate(loras)]
        return cls([Engine(model, variables, stacked, MultiLoRA(targets=".*"))], members, token_bytes)


# --------------------------------------------------------------------------- encoders


def prompt_of(batch: Batch, prefix: int, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """``(tokens [B, P], mask [B, P])``: the first ``prefix`` input tokens of each sequence
    and which of them are not padding (a row of padding only keeps its first position)."""
    tokens = jnp.asarray(np.asarray(batch["inputs"])[:, :prefix], jnp.int32)
    mask = tokens != pad_id
    mask = mask.at[:, 0].set(mask[:, 0] | ~mask.any(-1))
    return tokens, mask


def pooled_features(model: nn.Module, variables: dict, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over the unmasked positions of ``model``'s final-norm output: ``[B, P] -> [B, D]``
    float32 (differentiable in ``variables``). Padding keys are masked in attention."""
    (_, _), state = model.apply(
        variables, tokens, deterministic=True, attention_mask=mask,
        capture_intermediates=lambda mdl, method: mdl.name == "final_norm" and method == "__call__",
        mutable=["intermediates"])
    h = state["intermediates"]["final_norm"]["__call__"][0].astype(jnp.float32)     # [B, P, D]
    w = mask.astype(jnp.float32)[..., None]
    return (h * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


def head_apply(head: Params, x: jax.Array) -> jax.Array:
    """A linear head: ``x [B, D] @ w [D, K] + b [K]``."""
    return jnp.einsum("BD,DK->BK", x, head["w"]) + head["b"]


def init_head(rng: jax.Array, d: int, k: int) -> Params:
    """A linear head ``[D, K]`` drawn with standard deviation ``1/sqrt(D)``, zero bias."""
    return {"w": jax.random.normal(rng, (d, k), jnp.float32) / math.sqrt(d), "b": jnp.zeros((k,), jnp.float32)}


@dataclasses.dataclass
class PromptEncoder:
    """A routezoo model that embeds the prompt (the first ``prefix`` tokens of a sequence).

    Attributes:
      model: the Flax module (e.g. ``encoder_mlm``).
      variables: its variables.
      prefix: how many tokens of each sequence it reads.
      pad_id: the padding id (masked).
    """

    model: nn.Module
    variables: dict
    prefix: int
    pad_id: int = 0

    def features(self, batch: Batch) -> np.ndarray:
        """``[B, D]`` float32 pooled features of each sequence's prompt."""
        tokens, mask = prompt_of(batch, self.prefix, self.pad_id)
        return np.asarray(jax.device_get(_features(self.model, self.variables, tokens, mask)))

    def flops_per_prompt(self) -> float:
        """Forward FLOPs of one prompt through the trunk (the output projection, whose logits
        are never used, left out)."""
        c = self.model.cfg
        return self.prefix * (forward_flops_per_token(self.model, self.prefix) - 2.0 * c.d_model * c.vocab_size)


@functools.partial(jax.jit, static_argnames="model")
def _features(model, variables, tokens, mask):
    return pooled_features(model, variables, tokens, mask)


@functools.partial(jax.jit, static_argnames="model")
def _head_outputs(model, variables, head, tokens, mask):
    return head_apply(head, pooled_features(model, variables, tokens, mask))


# --------------------------------------------------------------------------- selection rules


def tryage_select(predicted: Any, costs: Any, cost_weight: float) -> np.ndarray:
    """Tryage's choice: ``argmin_m predicted[b, m] + cost_weight · costs[m]`` (``[B, M]``,
    ``[M]`` -> int ``[B]``; ties to the lower index)."""
    predicted, costs = np.asarray(predicted, np.float64), np.asarray(costs, np.float64)
    if predicted.ndim != 2 or costs.shape != (predicted.shape[1],):
        raise ValueError(f"tryage: predicted losses [B, M] and costs [M], got {list(predicted.shape)} and "
                         f"{list(costs.shape)}")
    return np.argmin(predicted + float(cost_weight) * costs[None, :], axis=1)


def coe_table(losses: Any, categories: Any, num_categories: int) -> tuple[np.ndarray, int]:
    """CoE's category-to-member table from router data.

    Args:
      losses: ``[N, M]`` per-sequence loss of every member.
      categories: int ``[N]``, each sequence's category.
      num_categories: ``C``.

    Returns:
      ``(table [C], fallback)``: per category the member with the lowest mean loss over its
      sequences (a category without sequences gets the fallback), and the fallback: the
      member with the lowest mean loss over all sequences.
    """
    losses, categories = np.asarray(losses, np.float64), np.asarray(categories)
    fallback = int(np.argmin(losses.mean(0)))
    table = np.full(num_categories, fallback, np.int64)
    for c in range(num_categories):
        rows = categories == c
        if rows.any():
            table[c] = int(np.argmin(losses[rows].mean(0)))
    return table, fallback


def coe_select(probs: Any, table: Any, fallback: int = -1, entropy_threshold: float | None = None) -> np.ndarray:
    """CoE's choice: ``table[argmax_c probs[b, c]]``; with ``entropy_threshold``, a row whose
    category entropy (nats) exceeds it goes to ``fallback`` instead."""
    probs, table = np.asarray(probs, np.float64), np.asarray(table)
    if probs.ndim != 2 or table.shape != (probs.shape[1],):
        raise ValueError(f"coe: category probabilities [B, C] and a table [C], got {list(probs.shape)} and "
                         f"{list(table.shape)}")
    choice = table[np.argmax(probs, axis=1)]
    if entropy_threshold is not None:
        if fallback < 0:
            raise ValueError("coe: an entropy threshold needs a fallback member")
        entropy = -(probs * np.log(np.clip(probs, 1e-30, None))).sum(1)
        choice = np.where(entropy > entropy_threshold, fallback, choice)
    return choice.astype(np.int64)


POOLS = ("nearest", "mean")


def retriever_select(queries: Any, pilots: Any, pilot_member: Any, pool: str = "nearest",
                     num_members: int | None = None) -> np.ndarray:
    """RouterRetriever's choice by cosine similarity.

    Args:
      queries: ``[B, D]`` prompt embeddings.
      pilots: ``[N, D]`` pilot embeddings.
      pilot_member: int ``[N]``, each pilot's member.
      pool: ``'nearest'``: the member of the most similar pilot; ``'mean'``: the member whose
        mean pilot embedding is most similar (members without pilots never chosen).
      num_members: ``M`` (``pool='mean'``; default ``max(pilot_member) + 1``).

    Returns:
      int ``[B]``.
    """
    if pool not in POOLS:
        raise ValueError(f"retriever pool {pool!r}; allowed: {', '.join(POOLS)}")
    q, p = np.asarray(queries, np.float64), np.asarray(pilots, np.float64)
    member = np.asarray(pilot_member, np.int64)
    if pool == "mean":
        m = int(num_members or member.max() + 1)
        sums = np.zeros((m, p.shape[1]))
        np.add.at(sums, member, p)
        counts = np.bincount(member, minlength=m)
        keep = np.nonzero(counts)[0]
        p, member = sums[keep] / counts[keep, None], keep
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    pn = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    return member[np.argmax(qn @ pn.T, axis=1)]


# --------------------------------------------------------------------------- routers


class Router:
    """A rule that picks one member per sequence: ``choose(library, batch) -> int [B]``.

    ``reads_targets``: the rule needs the sequence's targets (the oracle), so it cannot route
    a bare prompt.
    """

    name: ClassVar[str] = ""
    reads_targets: ClassVar[bool] = False

    def choose(self, library: Library, batch: Batch) -> np.ndarray:
        raise NotImplementedError

    def flops_per_prompt(self, library: Library, seq_len: int) -> float:
        """FLOPs the rule spends to route one sequence of ``seq_len`` tokens."""
        raise NotImplementedError


@dataclasses.dataclass
class Oracle(Router):
    """The member with the lowest true loss on each sequence (a reference)."""

    name: ClassVar[str] = "oracle"
    reads_targets: ClassVar[bool] = True

    def choose(self, library: Library, batch: Batch) -> np.ndarray:
        return np.argmin(library.member_scores(batch)["nll"], axis=1)

    def flops_per_prompt(self, library: Library, seq_len: int) -> float:
        return float(library.flops.sum() * seq_len)


@dataclasses.dataclass
class Tryage(Router):
    """Predicted loss per member from the prompt, plus a cost term (module docstring).

    Attributes:
      encoder: the fine-tuned encoder.
      head: its regression head ``[D, M]`` (on standardised losses).
      loss_mean, loss_std: the standardisation of the training targets (nats): the
        prediction is ``loss_mean + loss_std · head(features)``.
      costs: relative cost of each member ``[M]`` (:meth:`Library.relative_costs`).
      cost_weight: nats per unit of relative cost.
    """

    encoder: PromptEncoder
    head: Params
    loss_mean: float
    loss_std: float
    costs: np.ndarray
    cost_weight: float = 0.0

    name: ClassVar[str] = "tryage"

    def predicted_losses(self, batch: Batch) -> np.ndarray:
        tokens, mask = prompt_of(batch, self.encoder.prefix, self.encoder.pad_id)
        out = _head_outputs(self.encoder.model, self.encoder.variables, self.head, tokens, mask)
        return self.loss_mean + self.loss_std * np.asarray(jax.device_get(out), np.float64)

    def choose(self, library: Library, batch: Batch) -> np.ndarray:
        return tryage_select(self.predicted_losses(batch), self.costs, self.cost_weight)

    def flops_per_prompt(self, library: Library, seq_len: int) -> float:
        w = np.asarray(self.head["w"])
        return self.encoder.flops_per_prompt() + 2.0 * w.size


@dataclasses.dataclass
class CoE(Router):
    """A category classifier, then a category-to-member table (module docstring).

    Attributes:
      encoder: the fine-tuned encoder.
      head: its classification head ``[D, C]``.
      table: int ``[C]``, the member of each category.
      categories: the category names.
      fallback: the member for uncertain prompts (best over all categories).
      entropy_threshold: nats; ``None``: always the table.
    """

    encoder: PromptEncoder
    head: Params
    table: np.ndarray
    categories: tuple[str, ...]
    fallback: int = -1
    entropy_threshold: float | None = None

    name: ClassVar[str] = "coe"

    def category_probs(self, batch: Batch) -> np.ndarray:
        tokens, mask = prompt_of(batch, self.encoder.prefix, self.encoder.pad_id)
        logits = _head_outputs(self.encoder.model, self.encoder.variables, self.head, tokens, mask)
        return np.asarray(jax.device_get(jax.nn.softmax(logits, axis=-1)), np.float64)

    def choose(self, library: Library, batch: Batch) -> np.ndarray:
        return coe_select(self.category_probs(batch), self.table, self.fallback, self.entropy_threshold)

    def flops_per_prompt(self, library: Library, seq_len: int) -> float:
        return self.encoder.flops_per_prompt() + 2.0 * np.asarray(self.head["w"]).size


@dataclasses.dataclass
class Retriever(Router):
    """Nearest pilot example by cosine similarity of pooled encoder features (module docstring).

    Attributes:
      encoder: the (frozen) encoder.
      pilots: ``[N, D]`` pilot embeddings.
      pilot_member: int ``[N]``, the member of each pilot.
      pool: ``'nearest'`` or ``'mean'`` (:func:`retriever_select`).
    """

    encoder: PromptEncoder
    pilots: np.ndarray
    pilot_member: np.ndarray
    pool: str = "nearest"

    name: ClassVar[str] = "retriever"

    def choose(self, library: Library, batch: Batch) -> np.ndarray:
        return retriever_select(self.encoder.features(batch), self.pilots, self.pilot_member, self.pool, len(library))

    def flops_per_prompt(self, library: Library, seq_len: int) -> float:
        n = len(self.pilots) if self.pool == "nearest" else len(set(np.asarray(self.pilot_member).tolist()))
        return self.encoder.flops_per_prompt() + 2.0 * n * np.asarray(self.pilots).shape[1]


ROUTERS: dict[str, type[Router]] = {r.name: r for r in (Oracle, Tryage, CoE, Retriever)}


def check_router_names(names: Sequence[str]) -> list[str]:
    """The names, each a key of :data:`ROUTERS`; ``ValueError`` in one line otherwise."""
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in ROUTERS]
    if unknown:
        raise ValueError(f"unknown router {unknown[0]!r}; allowed: {', '.join(ROUTERS)}")
    if not names:
        raise ValueError(f"no router named; allowed: {', '.join(ROUTERS)}")
    return names


@dataclasses.dataclass
class Composed:
    """A library and a router: one model whose score and generation are the chosen member's.

    ``score(batch)`` adds the ``choice`` to :meth:`Library.score`'s arrays; ``generate``
    routes on the prompt and continues it with the chosen member (refused for a router that
    reads the targets).
    """

    library: Library
    router: Router

    def choose(self, batch: Batch) -> np.ndarray:
        return self.router.choose(self.library, batch)

    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        choice = self.choose(batch)
        return {**self.library.score(batch, choice), "choice": choice}

    def generate(self, prompt: Any, rng: jax.Array, *, num_tokens: int, temperature: float = 0.0,
                 top_k: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens [B, P + num_tokens], choice [B])``."""
        if self.router.reads_targets:
            raise ValueError(f"router {self.router.name!r} reads the sequence's targets; it cannot route a prompt")
        choice = self.choose({"inputs": np.asarray(prompt)})
        return self.library.generate(prompt, choice, rng, num_tokens=num_tokens, temperature=temperature,
                                     top_k=top_k), choice


__all__ = ["CoE", "Composed", "Engine", "Library", "Member", "Oracle", "POOLS", "PromptEncoder", "ROUTERS",
           "Retriever", "Router", "Tryage", "check_router_names", "coe_select", "coe_table",
           "forward_flops_per_token", "head_apply", "init_head", "lora_flops_per_token", "pooled_features",
           "prompt_of", "retriever_select", "tryage_select"]
