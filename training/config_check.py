"""Validation of a run config before anything is built, compiled or written.

Every problem is a :class:`ConfigError` whose message is one line naming the key, the
problem and the allowed values. The CLI prints it and exits with code 2.
"""

from __future__ import annotations

import math
import os
from typing import Any

import ml_collections

from routezoo.configs import base
from routezoo.layers.mlp import MLP_TYPES
from routezoo.layers.norms import NORMS
from routezoo.layers.attention import RopeScaling
from routezoo.layers.sharding import MESH_AXES, resolve_mesh_shape


class ConfigError(ValueError):
    pass


def _is_adapter_dir(path: str) -> bool:
    import os
    return any(os.path.isfile(os.path.join(path, *sub, "adapter.json")) for sub in ((), ("adapter",)))


def _check_adapter_sources(config) -> None:
    """``init.adapter_from`` and ``adapter.library``: an adapter method that uses them,
    and directories that hold a trained adapter (``adapter.json``)."""
    a = config.adapter
    library = [p.strip() for p in str(a.library).split(",") if p.strip()]
    if (config.init.adapter_from or library) and not a.method:
        raise ConfigError("config keys 'init.adapter_from' / 'adapter.library' need adapter.method; it is empty")
    if library:
        from routezoo.layers import adapters
        users = sorted(n for n, cls in adapters.METHODS.items() if getattr(cls, "uses_library", False))
        if a.method not in users:
            raise ConfigError(f"config key 'adapter.library' is set but adapter.method={a.method!r} does not use "
                              f"a library of adapters; allowed: {', '.join(users) or 'none'}")
    for key, paths in (("init.adapter_from", [config.init.adapter_from] if config.init.adapter_from else []),
                       ("adapter.library", library)):
        for path in paths:
            if not _is_adapter_dir(path):
                raise ConfigError(f"config key {key!r}: {path!r} holds no trained adapter (no adapter.json in it "
                                  "or in its adapter/ folder); give the workdir of an adapter run")


def _tokenizer_ids(config) -> tuple[str, int]:
    """``(kind, ids)``: the run's tokenizer kind (``auto`` decided) and its vocabulary size;
    a Hugging Face tokenizer is loaded (one-line errors for a missing or unusable file)."""
    from routezoo.training import data as data_lib
    kind, path = data_lib.tokenizer_choice(config)
    if kind == "byte":
        return kind, 258
    if kind == "sentencepiece":
        return kind, int(config.data.spm_vocab_size)
    if not path:
        raise ConfigError("data.tokenizer='hf' needs data.tokenizer_path: a tokenizer.json file or a "
                          "directory holding one")
    if data_lib.hf_tokenizer_file(path) is None:
        raise ConfigError(f"data.tokenizer_path {path!r} is neither a tokenizer.json file nor a directory "
                          "holding one")
    try:
        return kind, int(data_lib.load_hf_tokenizer(path).vocab_size)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own types
        raise ConfigError(f"data.tokenizer_path {path!r}: not a usable Hugging Face tokenizer: "
                          f"{' '.join(str(e).split())[:300]}") from None


def _check_schema(cfg: Any, schema: Any, prefix: str) -> None:
    for key in cfg.keys():
        path = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(f"unknown config key {path!r}; allowed under "
                              f"{prefix.rstrip('.') or 'config'}: {', '.join(sorted(schema.keys()))}")
        want, got = schema[key], cfg[key]
        if isinstance(want, ml_collections.ConfigDict):
            if not isinstance(got, ml_collections.ConfigDict):
                raise ConfigError(f"config key {path!r} must be a group of keys, got {type(got).__name__}")
            _check_schema(got, want, path + ".")
        elif isinstance(want, bool) or isinstance(got, bool):
            if type(got) is not type(want):
                raise ConfigError(f"config key {path!r} must be {type(want).__name__}, got {got!r}")
        elif isinstance(want, float) and isinstance(got, (int, float)):
            if not math.isfinite(got):   # e.g. optimizer.learning_rate=nan would train to NaN
                raise ConfigError(f"config key {path!r} must be a finite number, got {got!r}")
        elif type(got) is not type(want):
            raise ConfigError(f"config key {path!r} must be {type(want).__name__}, got {got!r}")


def _check_init_sources(config) -> None:
    """``init.from_workdir`` and ``init.from_hf`` point at something that loads: a trained
    run's workdir (a readable config.json and a checkpoint), a checkpoint directory whose
    config.json parses and whose safetensors files open (headers only, nothing read)."""
    i = config.init
    if i.from_workdir:
        key, path = "init.from_workdir (--config.init.from)", i.from_workdir
        if not os.path.isdir(path):
            raise ConfigError(f"config key {key}: {path!r} is not a directory; give the workdir of a trained run "
                              "(its config.json and checkpoints/)")
        from routezoo.training.workdir import read_workdir_config
        try:
            src = read_workdir_config(path)
        except (OSError, ValueError) as e:
            hint = ("; it holds safetensors files: for a Hugging Face checkpoint use init.from_hf"
                    if any(n.endswith(".safetensors") for n in os.listdir(path)) else "")
            raise ConfigError(f"config key {key}: {' '.join(str(e).split())}{hint}") from None
        mine, theirs = str(config.model.moe.get("expert_map", "")), str(src.model.moe.get("expert_map", ""))
        if mine != theirs:   # equal shapes, another meaning: which stacked expert serves which router output
            raise ConfigError(f"config key {key}: {path!r} has model.moe.expert_map={theirs!r}, this config "
                              f"{mine!r}; set the source's map (from its config.json)")
        ckpt = os.path.join(path, "checkpoints")
        if not (os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt))):
            raise ConfigError(f"config key {key}: {path!r} holds no checkpoint (nothing in {ckpt}); "
                              "give the workdir of a run that saved one")
    if i.from_hf:
        from routezoo.zoo import hf
        try:
            hf.open_source(i.from_hf).reader().close()
        except (OSError, ValueError) as e:
            raise ConfigError(f"config key 'init.from_hf': {' '.join(str(e).split())}") from None


def _check_peft_source(config) -> None:
    """``init.from_peft``: a peft LoRA directory that loads on the ``init.from_hf`` base, and
    ``config.adapter`` as the adapter is (the CLI sets it from the directory)."""
    path = str(config.init.get("from_peft", "") or "")
    if not path:
        return
    if not config.init.from_hf:
        raise ConfigError("config key 'init.from_peft' needs init.from_hf: the Hugging Face base the peft adapter "
                          "was trained on")
    if config.init.adapter_from:
        raise ConfigError("config keys 'init.from_peft' and 'init.adapter_from' are both set; allowed: one of them")
    from routezoo.zoo.hf import peft
    try:
        problems = peft.config_mismatches(config.adapter, peft.read(path, config.init.from_hf))
    except (OSError, ValueError) as e:
        raise ConfigError(f"config key 'init.from_peft': {' '.join(str(e).split())}") from None
    if problems:
        raise ConfigError(f"config key 'init.from_peft': {path} does not match the config: {'; '.join(problems)}")


def _one_of(value: Any, allowed, key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {key} {value!r}; allowed: {', '.join(map(str, allowed))}")


def _positive(cfg: Any, *keys: str) -> None:
    for key in keys:
        node = cfg
        for part in key.split("."):
            node = node[part]
        if node <= 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {node}")


def _encoder_decoder_kinds(m: Any) -> tuple[str, ...]:
    """FFN kinds of both stacks of ``model.name='encoder_decoder'``, after its own checks."""
    from routezoo.zoo.encoder_decoder import SEQ2SEQ_OBJECTIVES, stack_kinds
    for key in ("num_decoder_layers", "encoder_sparse_step", "decoder_sparse_step", "expert_capacity"):
        if m[key] < 0:
            raise ConfigError(f"config key 'model.{key}' must be >= 0, got {m[key]}")
    n, dist = m.relative_attention_num_buckets, m.relative_attention_max_distance
    if n < 4 or dist <= n // 2:
        raise ConfigError(f"model.relative_attention_num_buckets={n} / relative_attention_max_distance={dist}: "
                          "allowed: buckets >= 4 and max_distance > buckets // 2")
    if not 0 < m.seq2seq_split < 1:
        raise ConfigError(f"config key 'model.seq2seq_split' must be in (0, 1), got {m.seq2seq_split}")
    _one_of(m.seq2seq_objective, SEQ2SEQ_OBJECTIVES, "model.seq2seq_objective")
    if m.seq2seq_objective == "span_corruption":
        if not 0 < m.span_noise_density < 1 or m.span_mean_length < 1:
            raise ConfigError(f"model.span_noise_density={m.span_noise_density} / span_mean_length="
                              f"{m.span_mean_length}: allowed: density in (0, 1), mean length >= 1")
    kinds = stack_kinds(m)
    return kinds["encoder"] + kinds["decoder"]


def validate(config: Any, *, num_devices: int | None = None, process_count: int | None = None) -> None:
    """Raises :class:`ConfigError` for the first problem found in ``config``."""
    import jax

    from routezoo import zoo
    from routezoo.training import data as data_lib
    from routezoo.training.optim import DECAY_MASKS, OPTIMIZERS, SCHEDULES

    _check_schema(config, base.get_config(), "")
    m, t, o, d = config.model, config.train, config.optimizer, config.data
    _one_of(m.name, sorted(zoo.MODELS), "model.name")
    _one_of(m.mlp_type, MLP_TYPES, "model.mlp_type")
    _one_of(m.norm, NORMS, "model.norm")
    _one_of(m.dtype, ("auto", "bfloat16", "float32"), "model.dtype")
    _one_of(m.param_dtype, ("float32", "bfloat16"), "model.param_dtype")
    _one_of(m.attention_impl, ("auto", "xla", "cudnn"), "model.attention_impl")
    _one_of(m.attention, ("mha", "mla"), "model.attention")
    try:
        RopeScaling.from_config(m.get("rope_scaling", None))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _one_of(o.name, OPTIMIZERS, "optimizer.name")
    _one_of(o.schedule, SCHEDULES, "optimizer.schedule")
    _one_of(o.weight_decay_mask, DECAY_MASKS, "optimizer.weight_decay_mask")
    _one_of(d.tokenizer, data_lib.TOKENIZERS, "data.tokenizer")
    _one_of(d.process_sharding, data_lib.PROCESS_SHARDING, "data.process_sharding")
    if not data_lib.known_dataset(d.name):
        raise ConfigError(f"unknown data.name {d.name!r}; allowed: stdlib, shakespeare, files (your own files in "
                          "data.files), or a TFDS dataset name (e.g. lm1b, wikipedia/20230601.en) prepared in "
                          "array_record format")
    _one_of(d.packing, data_lib.PACKINGS, "data.packing")
    _one_of(d.format, data_lib.FORMATS, "data.format")
    if d.format == "chat" and d.name in data_lib.BUILT_IN:
        raise ConfigError("data.format='chat' needs records with prompt/completion or messages fields; "
                          f"data.name={d.name!r} holds plain text; allowed: data.name='files' (.jsonl/.parquet) "
                          "or a TFDS dataset with those fields")
    if d.tasks:   # the corpus has tasks at all; names are checked against the built dataset later
        try:
            data_lib.check_task_corpus(d)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if d.name == data_lib.SHAKESPEARE:
        try:   # built already, or its archive is in the data dir (nothing is written here)
            data_lib.check_shakespeare(data_lib.resolve_data_dir(d))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if d.name == data_lib.FILES:
        try:
            data_lib.check_files(d)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _positive(config, "model.num_layers", "model.d_model", "model.num_heads", "model.num_kv_heads",
              "model.head_dim", "model.mlp_dim", "model.vocab_size", "data.seq_len", "train.steps",
              "train.batch_size", "train.grad_accum", "train.eval_every", "train.eval_steps",
              "train.log_every", "checkpoint.every", "checkpoint.keep", "optimizer.learning_rate",
              "train.max_consecutive_skips")
    from routezoo.training.checkpoint import ON_CORRUPT
    from routezoo.training.step import NONFINITE_POLICIES
    _one_of(t.on_nonfinite, NONFINITE_POLICIES, "train.on_nonfinite")
    _one_of(config.checkpoint.on_corrupt, ON_CORRUPT, "checkpoint.on_corrupt")
    from routezoo.zoo.stack import REMAT_POLICIES
    _one_of(m.remat, REMAT_POLICIES, "model.remat")
    if t.spike_factor != 0 and not t.spike_factor > 1:
        raise ConfigError(f"config key 'train.spike_factor' must be 0 (off) or > 1, got {t.spike_factor}")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(f"model.num_heads ({m.num_heads}) must be divisible by model.num_kv_heads "
                          f"({m.num_kv_heads})")
    if m.head_dim % 2 and m.name != "encoder_decoder":   # the encoder-decoder has no rotary embeddings
        raise ConfigError(f"model.head_dim must be even for rotary embeddings, got {m.head_dim}")
    tok_kind, tok_ids = _tokenizer_ids(config)
    if tok_kind == "byte" and m.vocab_size < 258:
        raise ConfigError(f"model.vocab_size {m.vocab_size} is smaller than the byte tokenizer's 258")
    if tok_kind == "sentencepiece" and m.vocab_size < d.spm_vocab_size:
        raise ConfigError(f"model.vocab_size {m.vocab_size} is smaller than data.spm_vocab_size "
                          f"{d.spm_vocab_size}")
    if tok_kind == "hf" and m.vocab_size < tok_ids:
        raise ConfigError(f"model.vocab_size {m.vocab_size} is smaller than the Hugging Face tokenizer's "
                          f"vocabulary of {tok_ids} ids ({data_lib.tokenizer_choice(config)[1]}); "
                          f"allowed: model.vocab_size >= {tok_ids}")

    if m.mtp_depth < 0 or m.mtp_weight < 0:
        raise ConfigError(f"model.mtp_depth={m.mtp_depth} / model.mtp_weight={m.mtp_weight}: allowed: >= 0")
    if m.mtp_depth > 0 and m.name != "decoder_lm":
        raise ConfigError(f"model.mtp_depth={m.mtp_depth} (multi-token prediction) needs "
                          f"model.name='decoder_lm', got {m.name!r}")

    model = zoo.build(m)   # only constructed: its class says whether it is causal and its objective
    causal = bool(getattr(model, "causal", True))
    if getattr(model, "objective", "causal_lm") == "masked_lm":
        need = tok_ids + 1
        if m.vocab_size < need:
            raise ConfigError(f"model.vocab_size {m.vocab_size} leaves no id for the mask token of "
                              f"model.name={m.name!r} (id vocab_size - 1, above the {tok_kind} tokenizer's "
                              f"{need - 1} ids); allowed: >= {need}")
        if not 0 < m.mask_rate <= 1:
            raise ConfigError(f"config key 'model.mask_rate' must be in (0, 1], got {m.mask_rate}")

    try:
        kinds = zoo.ffn_kinds(m)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if m.mtp_depth > 0 and "moe" in kinds:
        from routezoo.layers.routers import ROUTERS, Router
        if not ROUTERS.get(m.moe.router, Router).supports_mtp:
            raise ConfigError(f"model.mtp_depth={m.mtp_depth} does not work with moe.router="
                              f"{m.moe.router!r} (its state lives outside the layers); allowed: any other router")
    if str(m.get("skip_layers", "")).strip():   # model.skip_layers: indices of this model's layers
        if m.name == "encoder_decoder":
            raise ConfigError("model.skip_layers is for model.name='decoder_lm' or 'encoder_mlm'; the "
                              "encoder-decoder does not skip layers")
        from routezoo.zoo.lm import skip_layers_of
        try:
            skip_layers_of(m)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if m.name == "encoder_decoder":
        kinds = _encoder_decoder_kinds(m)
        if m.seq2seq_objective == "span_corruption":
            from routezoo.zoo.encoder_decoder import span_lengths
            spans = span_lengths(d.seq_len, m.span_noise_density, m.span_mean_length)[1]
            ids = tok_ids
            if m.vocab_size < ids + spans:
                raise ConfigError(f"model.vocab_size {m.vocab_size} leaves no room for the {spans} span "
                                  f"sentinels of model.seq2seq_objective='span_corruption' (ids vocab_size - 1 "
                                  f"down, above the {tok_kind} tokenizer's {ids} ids); allowed: >= {ids + spans}")

    num_devices = jax.device_count() if num_devices is None else num_devices
    process_count = jax.process_count() if process_count is None else process_count
    try:
        sizes = dict(zip(MESH_AXES, resolve_mesh_shape({a: config.mesh[a] for a in MESH_AXES}, num_devices)))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dp = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if t.batch_size % dp:
        raise ConfigError(f"train.batch_size {t.batch_size} is not divisible by the data-parallel size "
                          f"{dp} (mesh data*fsdp*expert = {sizes['data']}*{sizes['fsdp']}*{sizes['expert']}); "
                          f"allowed: multiples of {dp}")
    if t.batch_size % (dp * t.grad_accum):
        raise ConfigError(f"train.batch_size {t.batch_size} is not divisible by data-parallel size {dp} "
                          f"times train.grad_accum {t.grad_accum}")
    if t.batch_size % process_count:
        raise ConfigError(f"train.batch_size {t.batch_size} is not divisible by the {process_count} processes")
    if m.num_heads % sizes["tensor"] or m.mlp_dim % sizes["tensor"]:
        raise ConfigError(f"model.num_heads ({m.num_heads}) and model.mlp_dim ({m.mlp_dim}) must be "
                          f"divisible by mesh.tensor ({sizes['tensor']})")
    a = config.adapter
    if a.method:
        from routezoo.layers import adapters
        _one_of(a.method, sorted(adapters.METHODS), "adapter.method")
        if not a.targets:
            raise ConfigError("config key 'adapter.targets' is empty but adapter.method is "
                              f"{a.method!r}; give a pattern over parameter paths, e.g. 'attn/(q|v)' or 'mlp/.*'")
        _positive(config, "adapter.rank", "adapter.alpha")
        try:   # the method's own hyper-parameter checks (one line each)
            from routezoo.training.train import adapter_config
            adapters.from_config(adapter_config(config))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _check_adapter_sources(config)
    if config.init.from_workdir and config.init.from_hf:
        raise ConfigError("config keys 'init.from_workdir' and 'init.from_hf' are both set; allowed: one of them")
    _check_init_sources(config)
    _check_peft_source(config)
    from routezoo.training import distill
    try:   # distill.*: a teacher run of the same vocabulary and objective, weight >= 0, temperature > 0
        distill.check_config(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if "moe" in kinds:
        from routezoo.layers.moe import validate_moe_config
        from routezoo.layers.routers import ROUTERS
        try:
            validate_moe_config(m.moe, causal=causal, mesh_shape=sizes)
            ROUTERS[m.moe.router].check_model_config(m)   # routers that also change the model (uoe)
            _check_expert_maps(m, kinds)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _check_expert_maps(m: Any, kinds) -> None:
    """Per-layer ``moe.expert_map`` (``;``): one map per MoE layer of a decoder or encoder
    stack without multi-token prediction modules (whose MoE blocks are no stack layer)."""
    from routezoo.layers.moe.block import has_per_layer_maps, validate_expert_map
    validate_expert_map(m.moe)
    if has_per_layer_maps(m.moe):
        if m.name == "encoder_decoder":
            raise ValueError("moe.expert_map with per-layer maps (';') is for model.name='decoder_lm' or "
                             "'encoder_mlm'; give the encoder-decoder one map for every layer")
        if int(m.get("mtp_depth", 0) or 0):
            raise ValueError(f"moe.expert_map with per-layer maps (';') and model.mtp_depth={m.mtp_depth}: the "
                             "multi-token prediction blocks have no map of their own; give one map for every layer")
        validate_expert_map(m.moe, num_moe_layers=sum(k == "moe" for k in kinds))
