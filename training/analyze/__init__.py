"""Routing analytics of a trained MoE LM: ``routezoo analyze --workdir DIR [--steps N]``.

Loads the run's newest intact checkpoint (:func:`~routezoo.training.train.load_trained`), runs
the model in evaluation mode (``deterministic=True``) over ``N`` validation batches
(:func:`~routezoo.training.data.eval_batches`, default ``train.eval_steps``) and records
every MoE layer's routing decision per token. It writes to ``DIR/analysis/``:

=================================  =========================================================
``load.csv``, ``load_counts.csv``  rows = MoE layers, one column per expert: fraction /
                                   number of routed token copies (``-1`` slots not counted,
                                   before any capacity drop; the ``load`` statistic the
                                   model logs). ``load.png``: heatmap layers x experts.
``experts_per_token.csv``          tokens using ``n = 0..K`` experts, per layer; ``routed``
                                   (the router's decision) and, with capacity dispatch,
                                   ``kept@eval`` / ``kept@train`` (after capacity drops).
                                   ``experts_per_token.png``.
``token_specialisation.csv``       per token id seen: count, entropy (nats) of its expert
                                   distribution at each layer (over its routed copies), its
                                   most frequent expert and that expert's share.
``token_specialisation_top.csv``   the ``--top`` most / least specialised token ids (lowest /
                                   highest entropy averaged over layers) among those seen at
                                   least ``--min-count`` times, decoded. ``token_entropy.png``.
``expert_top_tokens.csv``          per layer and expert, its ``--top`` most frequent token ids
                                   (decoded), their share of the expert's copies and the
                                   share of the token's copies that go to this expert.
``drop_by_position.csv``           drop rate of token copies per position in the sequence,
                                   per layer, for each setting: capacity dispatch: ``eval``
                                   (``eval_capacity_factor``, what this forward pass did)
                                   and ``train`` (``capacity_factor``), dropless: one
                                   ``dropless`` setting (0 everywhere). ``drop_by_position.png``.
``affinity.csv``                   P(top-1 expert j at the next MoE layer | top-1 expert i
                                   at this one) per adjacent pair of MoE layers; top-1 = the
                                   token's valid slot with the largest combine weight, before
                                   capacity drops. Rows of unused source experts are empty.
                                   ``affinity_layer{a}_layer{b}.png``: one heatmap per pair.
``summary.json``                   key numbers per layer (load imbalance, experts per token,
                                   drop rates overall / first half / second half of the
                                   sequence, mutual information between token id and expert)
                                   and per layer pair (affinity mutual information).
=================================  =========================================================

Only non-padding tokens (input id != pad id) are counted; padding still takes capacity in
the forward pass, as it does in the model. Dropped copies are recomputed from the captured
routing with the dispatcher's own rule (:func:`routezoo.layers.moe.capacity.capacity_slots`)
and capacity (:func:`routezoo.layers.routers.base.expert_capacity`).

Routing decisions are read without changing the model: Flax's ``capture_intermediates``
records the output (a :class:`~routezoo.layers.routers.base.Routing`) of every router call.
Entropies are in nats; ``H(E|token)`` is a plug-in estimate (biased low for rare tokens).
Single-process only.

Modules: ``capture`` (the routers' outputs of a forward pass, capacity drops recomputed),
``accumulate`` (counts over batches), ``maths`` (entropies, mutual information, top-1
experts), ``plots``, ``report`` (tables and ``summary.json``) and ``command`` (the workdir
entry point, :func:`analyze` and :func:`main`).
"""

from __future__ import annotations

from routezoo.training.analyze.accumulate import RoutingAccumulator, _PairCounter  # noqa: F401
from routezoo.training.analyze.capture import (  # noqa: F401
    capture_routing, drop_settings, dropped_mask, find_routings, make_forward, moe_layer_indices)
from routezoo.training.analyze.command import USAGE, AnalyzeError, analyze, main, read_run_config  # noqa: F401
from routezoo.training.analyze.maths import _mutual_information, _token_tables, entropy, top1_expert  # noqa: F401
from routezoo.training.analyze.report import token_text, write_report  # noqa: F401

__all__ = ["USAGE", "AnalyzeError", "RoutingAccumulator", "analyze", "capture_routing", "drop_settings",
           "dropped_mask", "entropy", "find_routings", "main", "make_forward", "moe_layer_indices",
           "read_run_config", "token_text", "top1_expert", "write_report"]
