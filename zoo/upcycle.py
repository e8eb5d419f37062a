"""Dense to MoE on parameter trees: sparse upcycling and Read-ME's refactorization.

Einsum letters: ``D`` embed, ``F`` the dense MLP's width, ``E`` experts, ``G`` an expert's
width (``F`` for upcycling, ``(F - S)/E`` for carving), ``S`` shared neurons, ``N``
calibration tokens, ``y`` the pre-gate's width.

Both work on the **unscanned** parameter tree of a decoder LM (``layer{i}/...``; move a
scanned tree with :func:`routezoo.zoo.stack.to_unscanned` first, and back with
:func:`~routezoo.zoo.stack.to_layout`). A dense layer holds ``mlp/wi`` ``[D, F]``,
``mlp/wg`` ``[D, F]`` (gated MLPs) and ``mlp/wo`` ``[F, D]``; an MoE layer
``moe/experts/wi`` ``[E, D, G]``, ``moe/experts/wi_gate`` ``[E, D, G]`` (SwiGLU) and
``moe/experts/wo`` ``[E, G, D]``, its router under ``moe/router`` (or the model-level
``pregate``) and, with shared experts, a dense ``moe/shared_experts/{wi, wg, wo}``.

* **Sparse upcycling** (Komatsuzaki et al. 2023, "Sparse Upcycling: Training
  Mixture-of-Experts from Dense Checkpoints"): every expert of an MoE layer is a copy of
  that layer's dense MLP (:func:`upcycle_params`), the router is new (the MoE config's
  initialisation, ``moe.router_init_scale``: small logits, near-uniform routing), every
  other parameter is copied. Optional noise ``σ``: expert ``e``'s copy of a weight ``W`` is
  ``W + σ · std(W) · ε_e`` (``ε`` standard normal, drawn per expert), which breaks the
  experts' symmetry. Without noise each MoE layer computes ``(Σ_k w_k) · MLP(x)``: with
  renormalised top-k weights (``moe.renormalize``, ``k >= 2``) that is the dense MLP, so the
  upcycled model equals the dense one at initialisation; with raw top-k probabilities the
  layer's output is the dense one scaled by the routed probability mass.
* **Read-ME refactorization** (Cai et al. 2024, "Read-ME: Refactorizing LLMs as
  Router-Decoupled Mixture of Experts with System Co-Design"): the experts are carved out
  of the dense MLP's hidden units (:func:`carve_params`): each expert is a disjoint subset
  of the ``F`` neurons (the columns of ``wi``/``wg`` and the rows of ``wo``), optionally with
  ``S`` shared neurons every token uses (a shared expert). Because the activation acts on
  every neuron separately, the dense MLP is the sum of its parts: with all experts active
  at weight 1 the carved MoE layer equals the dense MLP exactly. Which neurons go together
  is decided by :func:`cluster_neurons` from their activations on calibration data.

Neuron clustering (:func:`cluster_neurons`): neuron ``j``'s activation pattern is the
vector ``a_j = (|h_j(x_1)|, ..., |h_j(x_N)|)`` of its absolute activation (the input of
``wo``) over ``N`` calibration tokens, scaled to unit length, so that neurons that fire on
the same tokens are close whatever their magnitude. Shared neurons (``S > 0``) are the ``S``
with the largest mean ``|h_j|`` (Read-ME's shared set is the neurons important to every
domain). The rest are grouped by **balanced spherical k-means** into ``E`` groups of exactly
``(F - S)/E`` neurons: centroids start from ``E`` neurons drawn at random; each round
assigns neurons to centroids by cosine similarity under the capacity constraint (pairs
taken greedily in order of decreasing similarity, a neuron to the best centroid that still
has room) and moves every centroid to the normalised mean of its group; it stops when the
assignment no longer changes (or after ``iters`` rounds). Read-ME itself builds one
neuron mask per data domain from the mean activation on that domain (its ``top ρ``
neurons); clustering activation patterns finds such groups without domain labels.
"""

from __future__ import annotations

from typing import Any, Sequence

import ml_collections
import numpy as np

Tree = dict[str, Any]

# dense MLP type -> expert type of the MoE block (the experts have no GeGLU)
EXPERT_TYPE_OF_MLP = {"swiglu": "swiglu", "gelu": "gelu", "relu": "relu"}
# dense MLP names -> stacked expert names (layers/mlp.py MLP, layers/moe/block.py Experts)
EXPERT_NAME_OF_MLP = {"wi": "wi", "wg": "wi_gate", "wo": "wo"}


def _copy_cfg(model_cfg: Any) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg))


def check_dense(model_cfg: Any) -> None:
    """One-line ``ValueError`` unless ``model_cfg`` is a decoder LM whose every layer is a
    dense MLP of a type the experts have."""
    from routezoo.zoo.lm import ffn_kinds
    if str(model_cfg.name) != "decoder_lm":
        raise ValueError(f"needs a dense decoder LM (model.name='decoder_lm'), got model.name={model_cfg.name!r}")
    kinds = ffn_kinds(model_cfg)
    if any(k != "mlp" for k in kinds):
        raise ValueError(f"needs a dense model (every layer's model.ffn 'mlp'), got model.ffn={model_cfg.ffn!r}")
    if str(model_cfg.mlp_type) not in EXPERT_TYPE_OF_MLP:
        raise ValueError(f"model.mlp_type={model_cfg.mlp_type!r} has no expert form; allowed: "
                         f"{', '.join(EXPERT_TYPE_OF_MLP)}")


def moe_config(model_cfg: Any, *, num_experts: int, k: int, every: int, expert_dim: int,
               router: str = "top_k", renormalize: bool = True, router_init_scale: float | None = None,
               shared_dim: int = 0) -> ml_collections.ConfigDict:
    """The MoE model of a dense ``model_cfg``: ``model.ffn='moe'`` every ``every``-th layer
    (layers ``every-1, 2·every-1, ...``, :func:`routezoo.zoo.lm.ffn_kinds`), ``num_experts``
    experts of width ``expert_dim`` and the dense MLP's type, ``k`` per token by ``router``,
    ``shared_dim > 0``: one shared expert of that width. Every other key as it was."""
    check_dense(model_cfg)
    if num_experts < 1 or not 1 <= k <= num_experts or every < 1 or expert_dim < 1 or shared_dim < 0:
        raise ValueError(f"num_experts={num_experts}, k={k}, every={every}, expert_dim={expert_dim}, "
                         f"shared_dim={shared_dim}: allowed: num_experts >= 1, 1 <= k <= num_experts, every >= 1, "
                         "expert_dim >= 1, shared_dim >= 0")
    if every > int(model_cfg.num_layers):
        raise ValueError(f"every={every} is more than the model's {model_cfg.num_layers} layers: no layer would "
                         "become an MoE")
    cfg = _copy_cfg(model_cfg)
    cfg.ffn = "moe"
    m = cfg.moe
    m.every, m.num_experts, m.k, m.expert_dim = int(every), int(num_experts), int(k), int(expert_dim)
    m.router, m.renormalize = str(router), bool(renormalize)
    m.expert_type = EXPERT_TYPE_OF_MLP[str(model_cfg.mlp_type)]
    m.num_shared_experts, m.shared_expert_dim = (1, int(shared_dim)) if shared_dim else (0, 0)
    m.shared_expert_gate, m.residual_mlp = False, False
    if router_init_scale is not None:
        m.router_init_scale = float(router_init_scale)
    return cfg


def moe_layer_indices(model_cfg: Any) -> list[int]:
    from routezoo.zoo.lm import ffn_kinds
    return [i for i, kind in enumerate(ffn_kinds(model_cfg)) if kind == "moe"]


def _leaves(tree: Tree, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for key, v in tree.items():
        if isinstance(v, dict) or type(v).__name__ == "FrozenDict":
            out.update(_leaves(dict(v), prefix + (str(key),)))
        else:
            out[prefix + (str(key),)] = v
    return out


def _unflatten(flat: dict[tuple[str, ...], Any]) -> Tree:
    out: Tree = {}
    for path, v in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = v
    return out


def _dense_mlp(src: Tree, layer: int) -> dict[str, np.ndarray]:
    mlp = src.get(f"layer{layer}", {}).get("mlp")
    if mlp is None:
        raise ValueError(f"the source has no dense MLP at layer{layer}/mlp (an unscanned dense decoder expected)")
    return {k: np.asarray(v) for k, v in mlp.items()}


def _assemble(src: Tree, init: Tree, moe_layers: Sequence[int], made: dict[tuple[str, ...], Any],
              fresh: Sequence[tuple[str, ...]]) -> tuple[Tree, dict[str, int]]:
    """``init``'s structure: leaves in ``made`` from there, the prefixes in ``fresh`` from
    ``init`` (new parameters), every other leaf copied from ``src`` (its shape checked)."""
    s, t = _leaves(src), _leaves(init)
    out, counts = {}, {"copied": 0, "made": 0, "fresh": 0}
    for path, leaf in t.items():
        if path in made:
            value, kind = made[path], "made"
        elif any(path[:len(f)] == tuple(f) for f in fresh):
            value, kind = leaf, "fresh"
        elif path in s:
            value, kind = s[path], "copied"
            if tuple(np.shape(value)) != tuple(np.shape(leaf)):
                raise ValueError(f"{'/'.join(path)}: the source's shape {np.shape(value)} differs from the "
                                 f"target's {np.shape(leaf)}")
        else:
            raise ValueError(f"{'/'.join(path)}: a parameter of the target model that neither the source nor the "
                             "transform provides")
        out[path] = np.asarray(value, dtype=np.asarray(leaf).dtype) if kind != "fresh" else leaf
        counts[kind] += int(np.size(leaf))
    dropped = sorted("/".join(p) for p in s if p not in t and not (
        len(p) >= 2 and p[0].startswith("layer") and int(p[0][5:]) in moe_layers and p[1] == "mlp"))
    if dropped:
        raise ValueError(f"source parameters with no place in the target: {', '.join(dropped[:4])}")
    return _unflatten(out), counts


def upcycle_params(src: Tree, init: Tree, moe_layers: Sequence[int], *, noise: float = 0.0,
                   seed: int = 0) -> tuple[Tree, dict[str, int]]:
    """Sparse upcycling: ``init`` (the MoE model's freshly initialised unscanned params)
    with every expert of MoE layer ``i`` a copy of ``src``'s ``layer{i}/mlp`` (plus
    ``noise · std(W) · ε``), the routers as initialised, all else copied from ``src``.

    Returns:
      ``(params, counts)``: numpy leaves of ``init``'s dtypes; counts of parameters copied,
      made (the experts) and fresh (the routers).
    """
    rng = np.random.default_rng(seed)
    made = {}
    for i in moe_layers:
        dense = _dense_mlp(src, i)
        experts = init[f"layer{i}"]["moe"]["experts"]
        for name, w in dense.items():
            target = EXPERT_NAME_OF_MLP[name]
            e = np.shape(experts[target])[0]
            stacked = np.broadcast_to(w, (e, *w.shape)).astype(np.float64)
            if noise > 0:
                stacked = stacked + noise * float(np.std(w)) * rng.standard_normal(stacked.shape)
            made[(f"layer{i}", "moe", "experts", target)] = stacked
    fresh = [(f"layer{i}", "moe", "router") for i in moe_layers]
    return _assemble(src, init, moe_layers, made, fresh)


# --------------------------------------------------------------------------- Read-ME


def cluster_neurons(acts: np.ndarray, num_experts: int, shared: int = 0, *, iters: int = 50,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Shared neurons and ``E`` balanced groups of a layer's ``F`` neurons from their
    activations (module docstring).

    Args:
      acts: ``[N, F]`` activations (the input of ``wo``) on ``N`` calibration tokens.
      num_experts: ``E``; ``F - shared`` must be divisible by it.
      shared: ``S``, neurons every token uses.
      iters: k-means rounds at most.
      seed: the initial centroids' draw.

    Returns:
      ``(shared [S], groups [E, (F-S)/E])``: neuron indices, each sorted ascending; every
      neuron is in exactly one of them.
    """
    n, f = acts.shape
    if not 0 <= shared < f or (f - shared) % num_experts:
        raise ValueError(f"{f} neurons with {shared} shared do not split into {num_experts} equal experts; "
                         f"allowed: F - shared divisible by num_experts")
    mag = np.abs(np.asarray(acts, np.float64))
    order = np.argsort(-mag.mean(0), kind="stable")
    shared_idx = np.sort(order[:shared])
    rest = np.sort(order[shared:])
    g = (f - shared) // num_experts
    feats = mag[:, rest].T                                                       # [F-S, N]
    feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    cent = feats[rng.choice(len(rest), num_experts, replace=False)]             # [E, N]
    assign = None
    for _ in range(max(int(iters), 1)):
        sim = feats @ cent.T                                                     # [F-S, E]
        new = _balanced_assign(sim, g)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for e in range(num_experts):
            c = feats[assign == e].sum(0)
            cent[e] = c / max(np.linalg.norm(c), 1e-12)
    groups = np.stack([np.sort(rest[assign == e]) for e in range(num_experts)])
    return shared_idx, groups


def _balanced_assign(sim: np.ndarray, capacity: int) -> np.ndarray:
    """Each row to one column, at most ``capacity`` rows per column: pairs in order of
    decreasing similarity, a row to the first column with room."""
    rows, cols = sim.shape
    order = np.argsort(-sim, axis=None, kind="stable")
    assign = np.full(rows, -1)
    room = np.full(cols, capacity)
    left = rows
    for flat in order:
        r, c = divmod(int(flat), cols)
        if assign[r] < 0 and room[c] > 0:
            assign[r], room[c], left = c, room[c] - 1, left - 1
            if not left:
                break
    return assign


def carve_mlp(mlp: dict[str, np.ndarray], groups: np.ndarray,
              shared: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """A dense MLP's neurons as stacked experts (and a shared expert).

    Args:
      mlp: ``{'wi' [D, F], 'wg' [D, F] (gated), 'wo' [F, D]}``.
      groups: int ``[E, G]``, expert ``e``'s neurons.
      shared: int ``[S]`` or ``None``.

    Returns:
      ``({'wi' [E, D, G], 'wi_gate' [E, D, G] (gated), 'wo' [E, G, D]}, {'wi' [D, S], 'wg',
      'wo' [S, D]} or None)``: the :class:`~routezoo.layers.moe.block.Experts` layout and
      the shared expert's :class:`~routezoo.layers.mlp.MLP` layout.
    """
    experts = {"wi": np.transpose(mlp["wi"][:, groups], (1, 0, 2)),   # [D, E, G] -> [E, D, G]
               "wo": mlp["wo"][groups]}                                # [E, G, D]
    if "wg" in mlp:
        experts["wi_gate"] = np.transpose(mlp["wg"][:, groups], (1, 0, 2))
    shared_mlp = None
    if shared is not None and len(shared):
        shared_mlp = {"wi": mlp["wi"][:, shared], "wo": mlp["wo"][shared]}
        if "wg" in mlp:
            shared_mlp["wg"] = mlp["wg"][:, shared]
    return experts, shared_mlp


def carve_params(src: Tree, init: Tree, moe_layers: Sequence[int], groups: dict[int, np.ndarray],
                 shared: dict[int, np.ndarray] | None = None, *,
                 pregate_embed_from_model: bool = True) -> tuple[Tree, dict[str, int]]:
    """Read-ME's refactorization: ``init`` (the MoE model's fresh unscanned params) with
    MoE layer ``i``'s experts carved from ``src``'s ``layer{i}/mlp`` by ``groups[i]``
    (and ``shared[i]``), every router new, all else copied. With a pre-gate
    (``moe.router='pregate'``) and ``pregate_embed_from_model``, its token embedding
    ``[V, y]`` starts as the first ``y`` columns of the model's embedding (Read-ME's
    initialisation; needs ``y <= D``).

    Returns:
      ``(params, counts)`` as :func:`upcycle_params`.
    """
    made = {}
    for i in moe_layers:
        experts, shared_mlp = carve_mlp(_dense_mlp(src, i), groups[i], None if shared is None else shared.get(i))
        for name, w in experts.items():
            made[(f"layer{i}", "moe", "experts", name)] = w
        for name, w in (shared_mlp or {}).items():
            made[(f"layer{i}", "moe", "shared_experts", name)] = w
    fresh = [(f"layer{i}", "moe", "router") for i in moe_layers] + [("pregate",)]
    if "pregate" in init and pregate_embed_from_model:
        y = np.shape(init["pregate"]["embed"]["embedding"])[1]
        emb = np.asarray(src["embed"]["embedding"])
        if y <= emb.shape[1]:
            made[("pregate", "embed", "embedding")] = emb[:, :y]
    return _assemble(src, init, moe_layers, made, fresh)


__all__ = ["EXPERT_NAME_OF_MLP", "EXPERT_TYPE_OF_MLP", "carve_mlp", "carve_params", "check_dense",
           "cluster_neurons", "moe_config", "moe_layer_indices", "upcycle_params"]
