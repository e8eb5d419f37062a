"""LoRA and DoRA adapters in Hugging Face ``peft``'s format, in and out, on an imported HF base.

A peft LoRA directory (``PeftModel.save_pretrained``) holds ``adapter_config.json``
(``peft_type`` LORA, ``r``, ``lora_alpha``, ``use_rslora``, ``target_modules``, ...) and
``adapter_model.safetensors``: for every adapted ``nn.Linear`` module ``M`` of the
transformers model, ``base_model.model.M.lora_A.weight`` ``[R, in]`` and
``base_model.model.M.lora_B.weight`` ``[out, R]``. The module computes
``y = x W^T + s·(x A^T) B^T`` with ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA),
the scale of :class:`routezoo.layers.adapters.lora.LoRA`, which keeps ``A [I.., R]`` and
``B [R, O..]`` for a weight ``W [I.., O..]``. A DoRA (peft ``use_dora``; routezoo
``adapter.method=dora``, :class:`routezoo.layers.adapters.dora.DoRA`) adds
``base_model.model.M.lora_magnitude_vector`` ``[out]``, one magnitude per output unit:
routezoo's ``lora_magnitude [O..]`` (the weight's output axes), flattened.

Which module a routezoo weight is comes from the family tables the checkpoint import
uses (:meth:`~routezoo.zoo.hf.registry.Family.tensor_maps`): ``layer3/attn/q`` reads
``model.layers.3.self_attn.q_proj.weight``, so its module is
``model.layers.3.self_attn.q_proj``. A map that reshapes one torch Linear weight
``[out, in]`` into a weight whose input axes (the split of ``in``) come first and output
axes (the split of ``out``) last, as LoRA splits the weight (by its logical axis names),
is a peft module: ``A = A_peft^T`` reshaped to the input axes, ``B = B_peft^T`` reshaped to
the output axes. Weights with no such module are refused, each with its reason:

- stacked experts: transformers holds a block's experts as fused 3-D parameters, with no
  per-expert Linear module for peft's ``target_modules``;
- MoE routers: transformers computes them in router modules that are not ``nn.Linear``;
- embeddings and any weight not laid out as a Linear's ``[out, in]``.

Adapters address layers one by one, so parameters are in the per-layer layout (an
adapter run executes its base unscanned); the tables are per layer whatever
``model.scan_layers`` says.

Einsum letters: ``I`` a weight's flattened input axes, ``O`` its output axes, ``R`` rank.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Iterable, Mapping

import numpy as np

from routezoo.layers.adapters.dora import MAGNITUDE
from routezoo.zoo.hf import safetensors_io
from routezoo.zoo.hf.registry import Family, HFError, family_named, family_of
from routezoo.zoo.hf.tensor_map import TensorMap, flatten

PREFIX = "base_model.model."           # peft's prefix of every tensor name (PeftModel.base_model.model)
METHODS = ("lora", "dora")            # routezoo adapter.method values with a peft form (dora: use_dora)
_TENSOR = re.compile(r"(?P<module>.+)\.(?P<factor>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")
# peft also saves the base weight of a targeted output head or embedding (``save_embedding_layers``)
_BASE_COPY = re.compile(r"(?P<module>.+)\.base_layer\.weight")
# adapter_config.json keys that change what a LoRA computes, which routezoo's LoRA has no
# counterpart of: each must be unset (None, False, empty) to be read.
_UNSUPPORTED = ("rank_pattern", "alpha_pattern", "target_parameters", "modules_to_save", "lora_bias",
                "fan_in_fan_out", "layer_replication", "trainable_token_indices",
                "alora_invocation_tokens", "use_qalora", "use_bdlora", "velora_config", "kasa_config",
                "arrow_config")


# ------------------------------------------------------------------ the module table of a base

@dataclasses.dataclass(frozen=True)
class Module:
    """One peft-targetable module of an HF layout and the routezoo weight it is.

    Attributes:
      name: the HF module (``model.layers.3.self_attn.q_proj``).
      path: the routezoo weight, per-layer layout (``layer3/attn/q``).
      in_shape: the weight's input axes (``A [I.., R]``).
      out_shape: its output axes (``B [R, O..]``).
    """

    name: str
    path: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def d_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def d_out(self) -> int:
        return math.prod(self.out_shape)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The peft view of a base: its modules, and why the other adaptable weights have none.

    Attributes:
      architecture: the HF class.
      modules: peft-targetable modules by HF module name.
      refused: ``{HF module name or routezoo path: why peft cannot adapt it}``.
      every: every HF module name of the checkpoint layout (targetable or not).
      boxed: boxed abstract parameters of the per-layer model (what adapters select from).
      maps: the tensor map of each of ``modules``.
    """

    architecture: str
    modules: dict[str, Module]
    refused: dict[str, str]
    every: frozenset[str]
    boxed: Any
    maps: dict[str, TensorMap]

    @property
    def by_path(self) -> dict[str, Module]:
        return {mod.path: mod for mod in self.modules.values()}

    def allowed(self) -> str:
        """The module names ``target_modules`` may hold (last components), comma-separated."""
        return ", ".join(sorted({name.rsplit(".", 1)[-1] for name in self.modules}))


def _module_of(hf_name: str) -> str:
    return hf_name[:-len(".weight")] if hf_name.endswith(".weight") else hf_name


def _why_not(tm: TensorMap, num_in: int, experts: int) -> str | None:
    """Why the weight of ``tm`` (LoRA's split: ``num_in`` input axes) has no peft module; ``None`` if it has."""
    if tm.stacked or experts:
        return ("stacked experts: transformers holds a block's experts as fused 3-D parameters, with no "
                "per-expert Linear module for peft's target_modules")
    if "router" in tm.path[:-1]:
        return "a MoE router: transformers computes it in a router module that is not an nn.Linear"
    n_out = len(tm.split[0]) if len(tm.split) == 2 else -1
    linear = (tuple(range(n_out, len(tm.split_dims))) + tuple(range(n_out))) if n_out > 0 else None
    if len(tm.hf) != 1 or not tm.hf[0].endswith(".weight") or tm.perm != linear \
            or num_in != len(tm.split_dims) - n_out:
        return "not a Linear weight [out, in] in transformers (peft's LoRA layers for it are not mapped)"
    return None


def _abstract_per_layer(m: Any) -> Any:
    from routezoo import zoo
    from routezoo.zoo import stack
    from routezoo.zoo.hf.loading import abstract_params
    return abstract_params(zoo.build(stack.with_scan(m, False)))


def layout(m: Any, family: Family | None = None) -> Layout:
    """The peft modules of the zoo model of ``config.model`` ``m`` in ``family``'s HF layout.

    Args:
      m: the model config.
      family: the HF family (default: ``m.hf_architecture``'s, else the one inferred, as export picks).

    Returns:
      The :class:`Layout`.
    """
    from routezoo.zoo.hf.config_map import infer_architecture
    if family is None:
        family = family_named(str(m.get("hf_architecture", "") or "") or infer_architecture(m))
    text = m.to_json_best_effort(sort_keys=True) if hasattr(m, "to_json_best_effort") else \
        json.dumps(dict(m), sort_keys=True, default=str)
    key = (family.architecture, text)
    if key not in _LAYOUTS:   # one model trace per base and config (a run reads its adapter several times)
        while len(_LAYOUTS) >= 8:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        _LAYOUTS[key] = _build_layout(m, family)
    return _LAYOUTS[key]


_LAYOUTS: dict[tuple[str, str], Layout] = {}


def _build_layout(m: Any, family: Family) -> Layout:
    from routezoo.layers.adapters.base import adaptable
    boxed = _abstract_per_layer(m)
    targets = adaptable(boxed)
    modules, refused, every, maps = {}, {}, set(), {}
    for tm in family.tensor_maps(m):
        every.update(_module_of(n) for n in tm.hf)
        path = "/".join(tm.path)
        t = targets.get(path)
        if t is None:           # norms, biases, vectors: never adapted
            continue
        why = _why_not(tm, t.num_in, t.experts)
        if why is not None:
            refused[path] = why
            refused.update({_module_of(n): why for n in tm.hf})
            continue
        name = _module_of(tm.hf[0])
        modules[name] = Module(name, path, tuple(t.in_shape), tuple(t.out_shape))
        maps[name] = tm
    return Layout(family.architecture, modules, refused, frozenset(every), boxed, maps)


def _collapse(paths: Iterable[str]) -> str:
    return ", ".join(sorted({re.sub(r"(?<![^/.])(layer|layers\.)\d+(?=[/.])", r"\g<1>*", p) for p in paths}))


# ------------------------------------------------------------------ routezoo targets of a set of weights

def targets_pattern(paths: set[str], lay: Layout) -> str:
    """An ``adapter.targets`` regex that selects exactly ``paths`` in the base of ``lay``.

    Per projection (``attn/(q|v)``) when every layer's copy is adapted, else path by path.
    """
    from routezoo.layers.adapters.base import select_targets
    groups: dict[str, set[str]] = {}
    for p in paths:
        parent, _, leaf = re.sub(r"^layer\d+/", "", p).rpartition("/")
        groups.setdefault(parent, set()).add(leaf)
    parts = []
    for parent, leaves in sorted(groups.items()):
        alt = "|".join(re.escape(x) for x in sorted(leaves))
        alt = alt if len(leaves) == 1 else f"({alt})"
        parts.append(f"{re.escape(parent)}/{alt}" if parent else alt)
    pattern = "|".join(parts)
    if set(select_targets(lay.boxed, pattern)) != set(paths):
        pattern = "|".join(re.escape(p) for p in sorted(paths))
    return pattern


def _selected(pattern: str, lay: Layout) -> set[str]:
    from routezoo.layers.adapters.base import select_targets
    return set(select_targets(lay.boxed, pattern))


# ------------------------------------------------------------------ import

@dataclasses.dataclass(frozen=True)
class PeftLoRA:
    """A peft LoRA (or DoRA) directory, checked against a base (names, shapes, settings; no tensor read).

    Attributes:
      directory: the adapter directory.
      base: the base directory it was checked against (``init.from_hf``).
      rank: ``r``.
      alpha: ``lora_alpha``.
      rslora: ``use_rslora``.
      dropout: ``lora_dropout``.
      targets: an ``adapter.targets`` regex selecting exactly the adapted weights.
      modules: the adapted modules.
      dora: ``use_dora`` (each module has a ``lora_magnitude_vector``).
    """

    directory: str
    base: str
    rank: int
    alpha: float
    rslora: bool
    dropout: float
    targets: str
    modules: tuple[Module, ...]
    dora: bool = False

    @property
    def method(self) -> str:
        """The routezoo ``adapter.method`` it is."""
        return "dora" if self.dora else "lora"

    def settings(self) -> dict[str, Any]:
        """``{adapter key: value}`` this adapter sets."""
        return {"method": self.method, "rank": self.rank, "alpha": self.alpha, "rslora": self.rslora,
                "targets": self.targets, "lora_dropout": self.dropout}


def _base_layout(base: str) -> Layout:
    from routezoo.zoo.hf.loading import open_source
    source = open_source(base)
    return layout(source.model_config, source.family or family_of(source.hf_config))


def _base_weight(base: str, tm: TensorMap) -> np.ndarray:
    """The HF-layout tensor of ``tm`` in the base directory (an HF checkpoint or a converted one)."""
    from routezoo.zoo.hf.loading import open_source
    source = open_source(base)
    with source.reader() as reader:
        if source.kind == "hf":
            return reader.get(tm.hf[0], (slice(None),) * len(tm.hf_shape))
        value = reader.get("/".join(tm.path), (slice(None),) * len(tm.shape))
        return dict(tm.to_hf(value))[tm.hf[0]]


def _number(cfg: Mapping[str, Any], key: str, where: str, kind=float) -> Any:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise HFError(f"{where}: {key}={value!r} is not {'an integer' if kind is int else 'a number'}")
    return kind(value)


def _check_settings(cfg: Mapping[str, Any], where: str) -> tuple[int, float, bool, float, bool]:
    """``(r, lora_alpha, use_rslora, lora_dropout, use_dora)`` of a peft config; refuses what
    routezoo's LoRA and DoRA cannot be."""
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise HFError(f"{where}: peft_type {kind!r} is not supported; allowed: 'LORA'")
    rank, alpha = _number(cfg, "r", where, int), _number(cfg, "lora_alpha", where)
    if rank < 1:
        raise HFError(f"{where}: r={rank}; allowed: >= 1")
    for key in _UNSUPPORTED:
        if cfg.get(key):
            raise HFError(f"{where}: {key}={cfg[key]!r} is not supported (routezoo's LoRA has one rank and alpha "
                          "for every module and no such option); allowed: unset")
    if cfg.get("bias", "none") != "none":
        raise HFError(f"{where}: bias={cfg['bias']!r} is not supported (the base's biases stay frozen); "
                      "allowed: 'none'")
    dropout = float(cfg.get("lora_dropout") or 0.0)
    if not 0.0 <= dropout < 1.0:
        raise HFError(f"{where}: lora_dropout={dropout}; allowed: [0, 1)")
    return rank, alpha, bool(cfg.get("use_rslora", False)), dropout, bool(cfg.get("use_dora", False))


def _check_target_modules(cfg: Mapping[str, Any], lay: Layout, where: str) -> None:
    """Every ``target_modules`` entry names modules of the base that routezoo maps."""
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        try:
            hits = {n for n in lay.every | set(lay.modules) if re.fullmatch(targets, n)}
        except re.error as e:
            raise HFError(f"{where}: target_modules {targets!r} is not a regular expression ({e})") from None
        if not hits & set(lay.modules):
            raise HFError(f"{where}: target_modules {targets!r} selects no module of the base ({lay.architecture}) "
                          f"that routezoo maps; allowed modules: {lay.allowed()}")
        return
    if not isinstance(targets, list) or not targets or not all(isinstance(k, str) for k in targets):
        raise HFError(f"{where}: target_modules={targets!r}; allowed: a list of module names "
                      f"({lay.allowed()}) or a regular expression")
    for key in targets:
        hits = {n for n in lay.every if n == key or n.endswith("." + key)}
        if not hits:
            raise HFError(f"{where}: unknown target module {key!r}: the base ({lay.architecture}) has no such "
                          f"module; allowed: {lay.allowed()}")
        if not hits & set(lay.modules):
            why = lay.refused.get(sorted(hits)[0], "not mapped")
            raise HFError(f"{where}: target module {key!r} is {why}; allowed: {lay.allowed()}")


def read(directory: str, base: str) -> PeftLoRA:
    """Reads and checks the peft LoRA (or DoRA) in ``directory`` against the HF base ``base``.

    Reads ``adapter_config.json`` and the safetensors header only: every tensor must be a
    ``lora_A``/``lora_B`` factor (and with ``use_dora`` a ``lora_magnitude_vector``) of a
    module of the base that routezoo maps, with the base's shapes and rank ``r``.

    Args:
      directory: the peft adapter directory.
      base: the HF checkpoint (or converted) directory of the base (``init.from_hf``).

    Returns:
      The :class:`PeftLoRA`; :class:`HFError` (or ``FileNotFoundError``) in one line naming
      the problem and what is allowed.
    """
    directory = os.fspath(directory)
    where = f"peft adapter {directory}"
    cfg = safetensors_io.read_peft_config(directory)
    rank, alpha, rslora, dropout, dora = _check_settings(cfg, where)
    lay = _base_layout(base)
    _check_target_modules(cfg, lay, where)
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    with safetensors_io.peft_reader(directory) as reader:
        for name in sorted(reader.names()):
            copy = _BASE_COPY.fullmatch(name[len(PREFIX):]) if name.startswith(PREFIX) else None
            if copy is not None and copy["module"] in lay.modules:
                # the base's own weight, saved beside the LoRA of a head: it must be the base's
                tm = lay.maps[copy["module"]]
                value = reader.get(name, (slice(None),) * len(reader.shape(name)))
                if value.shape != tm.hf_shape or not np.array_equal(value, _base_weight(base, tm)):
                    raise HFError(f"{where}: tensor {name!r} is a copy of the base weight {tm.hf[0]} that differs "
                                  f"from the base {base}'s (a resized or trained {copy['module']}); allowed: an "
                                  "adapter whose saved base weights equal the base's")
                continue
            hit = _TENSOR.fullmatch(name[len(PREFIX):]) if name.startswith(PREFIX) else None
            if hit is None:
                raise HFError(f"{where}: tensor {name!r} is not a LoRA factor of a Linear module; allowed: "
                              f"{PREFIX}<module>.lora_A.weight, .lora_B.weight"
                              + (" and .lora_magnitude_vector (use_dora)" if dora else ""))
            module = hit["module"]
            if module not in lay.modules:
                if module in lay.refused:
                    raise HFError(f"{where}: tensor {name!r} adapts {module}, {lay.refused[module]}")
                raise HFError(f"{where}: tensor {name!r} adapts module {module!r}, which the base {base} "
                              f"({lay.architecture}) does not have: the adapter belongs to another base; the base "
                              f"has {_collapse(lay.modules)}")
            factors.setdefault(module, {})[hit["factor"]] = reader.shape(name)
    if not factors:
        raise HFError(f"{where}: {safetensors_io.PEFT_WEIGHTS} holds no LoRA tensors")
    modules = []
    for module, shapes in sorted(factors.items()):
        mod = lay.modules[module]
        want = {"lora_A.weight": (rank, mod.d_in), "lora_B.weight": (mod.d_out, rank)}
        if dora:
            want["lora_magnitude_vector"] = (mod.d_out,)
        elif "lora_magnitude_vector" in shapes:
            raise HFError(f"{where}: {PREFIX}{module}.lora_magnitude_vector is a DoRA magnitude, but "
                          "adapter_config.json has use_dora=false; allowed: use_dora=true with magnitudes, "
                          "or no magnitudes")
        for factor, shape in want.items():
            if factor not in shapes:
                raise HFError(f"{where}: {PREFIX}{module}.{factor} is missing (the module has "
                              f"{', '.join(sorted(shapes))} only)")
            if tuple(shapes[factor]) != shape:
                raise HFError(f"{where}: {PREFIX}{module}.{factor} has shape {list(shapes[factor])}, but "
                              f"rank r={rank} on the base's {module} [{mod.d_out}, {mod.d_in}] needs {list(shape)}: "
                              f"the adapter belongs to another base (or another r)")
        modules.append(mod)
    targets = targets_pattern({mod.path for mod in modules}, lay)
    return PeftLoRA(directory, os.fspath(base), rank, alpha, rslora, dropout, targets, tuple(modules), dora)


def read_params(peft: PeftLoRA) -> dict:
    """The adapter's parameters in routezoo's layout (host float32 arrays):
    ``{layer3: {attn: {q: {lora_a: [I.., R], lora_b: [R, O..]}}}}`` (DoRA: and ``lora_magnitude [O..]``)."""
    out: dict = {}
    with safetensors_io.peft_reader(peft.directory) as reader:
        for mod in peft.modules:
            a = reader.get(f"{PREFIX}{mod.name}.lora_A.weight", (slice(None), slice(None))).astype(np.float32)
            b = reader.get(f"{PREFIX}{mod.name}.lora_B.weight", (slice(None), slice(None))).astype(np.float32)
            node = out
            for part in mod.path.split("/"):
                node = node.setdefault(part, {})
            node["lora_a"] = np.ascontiguousarray(a.T.reshape(*mod.in_shape, peft.rank))
            node["lora_b"] = np.ascontiguousarray(b.T.reshape(peft.rank, *mod.out_shape))
            if peft.dora:
                m = reader.get(f"{PREFIX}{mod.name}.lora_magnitude_vector", (slice(None),)).astype(np.float32)
                node[MAGNITUDE] = np.ascontiguousarray(m.reshape(mod.out_shape))
    return out


def config_mismatches(adapter_cfg: Any, peft: PeftLoRA) -> list[str]:
    """How ``config.adapter`` differs from what the peft adapter is (empty when it agrees).

    ``targets`` agree when they select the same weights of the base; ``lora_dropout``
    (training only) may differ.
    """
    out = []
    method = str(adapter_cfg.method)
    if method != peft.method:
        out.append(f"adapter.method={method!r} (the adapter is {peft.method!r})")
        return out
    if int(adapter_cfg.rank) != peft.rank:
        out.append(f"adapter.rank={adapter_cfg.rank} (r={peft.rank})")
    if float(adapter_cfg.alpha) != peft.alpha:
        out.append(f"adapter.alpha={adapter_cfg.alpha} (lora_alpha={peft.alpha:g})")
    if bool(adapter_cfg.rslora) != peft.rslora:
        out.append(f"adapter.rslora={adapter_cfg.rslora} (use_rslora={peft.rslora})")
    want = {mod.path for mod in peft.modules}
    try:
        got = _selected(str(adapter_cfg.targets), _base_layout(peft.base)) if str(adapter_cfg.targets) else set()
    except ValueError:
        got = set()
    if got != want:
        out.append(f"adapter.targets={str(adapter_cfg.targets)!r} (the adapter's modules are {peft.targets!r})")
    return out


def update_config_from_peft(config: Any) -> list[str]:
    """Sets ``config.adapter`` (method, rank, alpha, rslora, targets, dropout) from
    ``config.init.from_peft`` (in place), checked against the base ``config.init.from_hf``.

    Args:
      config: the run config.

    Returns:
      The ``adapter.KEY=value`` changes; :class:`HFError` in one line when the adapter
      cannot be loaded on that base or ``adapter.method`` is another method.
    """
    path = str(config.init.get("from_peft", "") or "")
    if not path:
        return []
    if not config.init.from_hf:
        raise HFError("init.from_peft needs init.from_hf: the Hugging Face base the peft adapter was trained on")
    peft = read(path, config.init.from_hf)
    a = config.adapter
    if str(a.method) not in ("", peft.method):
        raise HFError(f"init.from_peft {path} is a peft {peft.method} adapter; adapter.method={a.method!r} cannot "
                      f"load it; allowed: {peft.method!r} (or leave adapter.method empty)")
    changes = []
    for key, value in peft.settings().items():
        if a[key] != value:
            changes.append(f"adapter.{key}={value!r}")
            a[key] = value
    return changes


# ------------------------------------------------------------------ export

def _peft_target_modules(names: set[str], lay: Layout) -> list[str]:
    """``target_modules`` selecting exactly the modules ``names``: their last components
    when those select nothing else, else the full module names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    hit = {n for n in lay.modules if any(n == k or n.endswith("." + k) for k in leaves)}
    return leaves if hit == names else sorted(names)


def _task_type(architecture: str) -> str | None:
    if architecture.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if architecture.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM"
    return None


def to_peft(model_cfg: Any, adapter_cfg: Mapping[str, Any], adapter_params: Mapping[str, Any], out_dir: str, *,
            base: str | None = None, dtype: str | None = None) -> str:
    """Writes a routezoo LoRA (or DoRA) as a peft directory (``adapter_config.json`` and
    ``adapter_model.safetensors``; DoRA with ``use_dora`` and ``lora_magnitude_vector``) for
    the HF form of its base.

    Everything is checked before anything is written: on an error ``out_dir`` is neither
    created nor changed.

    Args:
      model_cfg: the base's ``config.model`` (an imported HF architecture, either layer layout).
      adapter_cfg: the adapter's settings (``config.adapter`` or ``adapter.json``'s ``adapter``):
        ``method``, ``rank``, ``alpha``, ``rslora``, ``lora_dropout``.
      adapter_params: the adapter's parameters (per-layer paths, ``lora_a``/``lora_b``, DoRA's ``lora_magnitude``).
      out_dir: the directory to write.
      base: ``base_model_name_or_path`` to record (the HF base's directory or hub id).
      dtype: tensor dtype on disk (default: float32).

    Returns:
      ``out_dir``; :class:`HFError` in one line for a method or target peft has no form for.
    """
    import jax
    import jax.numpy as jnp
    from routezoo.zoo.hf.config_map import hf_config_from_model

    method = str(adapter_cfg.get("method", ""))
    if method not in METHODS:
        raise HFError(f"adapter.method={method!r} has no peft form; allowed: {', '.join(METHODS)}")
    hf_cfg = hf_config_from_model(model_cfg)          # the base must export as an HF architecture
    arch = hf_cfg["architectures"][0]
    lay = layout(model_cfg, family_named(arch))
    by_path = lay.by_path
    rank = int(adapter_cfg["rank"])
    disk = np.dtype(jnp.dtype(dtype or "float32"))
    flat = {"/".join(p): np.asarray(jax.device_get(v)) for p, v in flatten(dict(adapter_params)).items()}
    paths = sorted({p.rsplit("/", 1)[0] for p in flat})
    tensors: dict[str, np.ndarray] = {}
    for path in paths:
        if path not in by_path:
            why = lay.refused.get(path, "not a weight of the base")
            raise HFError(f"adapter target {path} has no peft module: {why}; allowed targets: "
                          f"{_collapse(by_path)}")
        mod = by_path[path]
        a, b = flat.get(f"{path}/lora_a"), flat.get(f"{path}/lora_b")
        if a is None or b is None or a.shape != (*mod.in_shape, rank) or b.shape != (rank, *mod.out_shape):
            raise HFError(f"adapter target {path}: factors {None if a is None else list(a.shape)} / "
                          f"{None if b is None else list(b.shape)} are not LoRA factors of rank {rank} of the base's "
                          f"weight (A {[*mod.in_shape, rank]}, B {[rank, *mod.out_shape]})")
        tensors[f"{PREFIX}{mod.name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(mod.d_in, rank).T.astype(disk))
        tensors[f"{PREFIX}{mod.name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, mod.d_out).T.astype(disk))
        if method == "dora":
            m = flat.get(f"{path}/{MAGNITUDE}")
            if m is None or m.shape != mod.out_shape:
                raise HFError(f"adapter target {path}: magnitude {None if m is None else list(m.shape)} is not one "
                              f"value per output unit of the base's weight ({list(mod.out_shape)})")
            tensors[f"{PREFIX}{mod.name}.lora_magnitude_vector"] = np.ascontiguousarray(m.reshape(-1).astype(disk))
    names = {by_path[p].name for p in paths}
    config = {
        "peft_type": "LORA", "task_type": _task_type(arch), "base_model_name_or_path": base,
        "r": rank, "lora_alpha": float(adapter_cfg["alpha"]), "use_rslora": bool(adapter_cfg.get("rslora", False)),
        "lora_dropout": float(adapter_cfg.get("lora_dropout", 0.0) or 0.0),
        "target_modules": _peft_target_modules(names, lay), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "use_dora": method == "dora", "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    }
    safetensors_io.write_peft_dir(out_dir, config, tensors)
    return out_dir
