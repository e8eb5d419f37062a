"""Hugging Face import/export (routezoo.zoo.hf).

Parity tests build tiny randomly initialised models with ``transformers`` (PyTorch, CPU,
float32), save them, import them and compare logits and router top-k choices on a padded
batch (one full row, one right-padded, one left-padded): both sides get the attention
mask and the positions ``cumsum(mask) - 1``, and logits are compared at real tokens. They skip when torch/transformers are not
installed (``pip install routezoo[hf]``); the error, sharding and round-trip-on-disk
tests need only ``safetensors``.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from routezoo.layers import sharding as shd
from routezoo.layers.routers import TopKRouter
from routezoo.zoo import hf
from routezoo.zoo import stack
from routezoo.zoo.hf import safetensors_io
from routezoo.zoo.lm import ffn_kinds, positions_from_mask

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# family -> (config class, extra config); each tiny, 2 layers.
FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True, head_dim=16)),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", dict()),                       # q/k/v bias
    "qwen3": ("Qwen3Config", dict(head_dim=16)),            # per-head QK norm
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    # layer 0 dense (mlp_only_layers), norm_topk_prob False, shared expert with its gate, qkv bias
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=24, mlp_only_layers=[0],
                                         norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                         head_dim=16, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)),
    # latent attention with q latent, interleaved rope; 8 experts in 4 groups (2 kept), random correction
    # bias, 2 shared experts, layer 0 dense, renormalised weights times 2.5
    "deepseek_v3": ("DeepseekV3Config", dict(num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                                             moe_intermediate_size=16, n_shared_experts=2, n_group=4, topk_group=2,
                                             first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
                                             qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,
                                             routed_scaling_factor=2.5, norm_topk_prob=True)),
    # plain q projection, half-split rope, one group, raw sigmoid weights, every layer MoE
    "deepseek_v3_plain": ("DeepseekV3Config", dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                                                   moe_intermediate_size=16, n_shared_experts=1, n_group=1,
                                                   topk_group=1, first_k_dense_replace=0, q_lora_rank=None,
                                                   kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                                   v_head_dim=16, rope_interleave=False, norm_topk_prob=False)),
}
ARCH = {"llama": "LlamaForCausalLM", "llama_tied": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
        "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
        "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
        "deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v3_plain": "DeepseekV3ForCausalLM"}
LENGTHS = (12, 7, 9)  # row 1 right-padded, row 2 left-padded
RTOL = 1e-4


def _tokens():
    rng = np.random.RandomState(0)
    toks = rng.randint(3, COMMON["vocab_size"], (len(LENGTHS), max(LENGTHS)))
    mask = np.arange(max(LENGTHS))[None, :] < np.asarray(LENGTHS)[:, None]
    mask[2] = mask[2][::-1]                                       # left padding
    return np.where(mask, toks, 0).astype(np.int32), mask


def _rel_err(a, b, mask):
    a, b = np.asarray(a)[mask], np.asarray(b)[mask]
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _randomize(model, torch, seed=0):
    """Random values everywhere (HF inits biases to 0 and norms to 1, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise * p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():   # DeepSeek-V3's selection-only bias (zeros at init)
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g))


def tiny_causal_lm_factory(tmp_path_factory, specs: dict, seed: int = 0):
    """``name -> (directory, torch model)``: the tiny random transformers causal LM
    ``specs[name] = (config class name, config overrides over COMMON)``, saved once."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cache: dict = {}

    def make(name):
        if name not in cache:
            cls_name, extra = specs[name]
            cfg = getattr(transformers, cls_name)(**{**COMMON, **extra})
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
            _randomize(model, torch, seed=seed)
            path = str(tmp_path_factory.mktemp(name))
            model.save_pretrained(path)
            cache[name] = (path, model)
        return cache[name]
    return make


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """family -> (directory, torch model) of a saved tiny random HF model (made once)."""
    return tiny_causal_lm_factory(tmp_path_factory, FAMILIES)


def _hf_forward(model, tokens, mask, chosen=None):
    """(logits, router logits per MoE layer); ``chosen`` (a list) gets the experts each
    router chose where the router returns them (DeepSeek-V3: its top-k is not the top-k
    of its logits)."""
    import torch
    positions = np.asarray(positions_from_mask(mask))
    hooks = []
    if chosen is not None:
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                hooks.append(module.register_forward_hook(lambda mod, inp, out: chosen.append(out[2].numpy())))
    with torch.no_grad():
        out = model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(positions, dtype=torch.long),
                    output_router_logits=getattr(model.config, "num_experts_per_tok", None) is not None)
    for hook in hooks:
        hook.remove()
    logits = out.logits.float().numpy()
    routers = [r.float().numpy() for r in (getattr(out, "router_logits", None) or ())]
    return logits, routers


def _rz_forward(model, params, tokens, mask):
    """(logits, each MoE layer's Routing) of the model as imported (scanned or not), jitted
    (one compile; run eagerly, every op compiles on its own); the routings are read per
    layer from the unscanned layout of the captured intermediates."""
    def forward(params, tokens, mask):
        return model.apply({"params": params}, tokens, attention_mask=mask, positions=positions_from_mask(mask),
                           mutable=["intermediates"],
                           capture_intermediates=lambda mdl, method: isinstance(mdl, TopKRouter))
    (logits, _), state = jax.jit(forward)(params, jnp.asarray(tokens), jnp.asarray(mask))
    inter = stack.to_unscanned(dict(state.get("intermediates", {})), model.cfg)
    routers = [inter.get(f"layer{i}", {}).get("moe", {}).get("router", {}) for i in range(model.cfg.num_layers)]
    return np.asarray(logits), [r["__call__"][0] for r in routers if "__call__" in r]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_matches_transformers(family, hf_dir):
    path, ref_model = hf_dir(family)
    model, params = hf.from_hf(path)
    tokens, mask = _tokens()
    chosen = []
    ref_logits, ref_routers = _hf_forward(ref_model, tokens, mask, chosen)
    logits, routings = _rz_forward(model, params, tokens, mask)
    assert logits.shape == ref_logits.shape
    assert _rel_err(logits, ref_logits, mask) <= RTOL
    assert len(routings) == len(ref_routers) == sum(k == "moe" for k in ffn_kinds(model.cfg))
    k = model.cfg.moe.k
    flat_mask = mask.reshape(-1)
    for i, (routing, ref) in enumerate(zip(routings, ref_routers)):
        ref_idx = np.sort(chosen[i] if chosen else np.argsort(-ref, axis=-1, kind="stable")[:, :k], axis=-1)
        got_idx = np.sort(np.asarray(routing.indices), axis=-1)
        np.testing.assert_array_equal(got_idx[flat_mask], ref_idx[flat_mask])


def assert_export_round_trip(path: str, out: str) -> dict:
    """Imports the checkpoint ``path``, exports it to ``out`` and checks the export holds
    the same tensors, names and bits and imports to bit-identical parameters; returns the
    exported ``config.json``."""
    from safetensors.numpy import load_file
    model, params = hf.from_hf(path)
    hf.to_hf(model.cfg, params, out)
    original, exported = (load_file(os.path.join(d, "model.safetensors")) for d in (path, out))
    assert sorted(exported) == sorted(original)
    for name, value in original.items():
        assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name
    _, params2 = hf.from_hf(out)
    for (p1, a), (p2, b) in zip(jax.tree_util.tree_leaves_with_path(params),
                                jax.tree_util.tree_leaves_with_path(params2)):
        assert p1 == p2 and np.array_equal(np.asarray(a), np.asarray(b)), p1
    return json.load(open(os.path.join(out, "config.json")))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_is_bit_identical_and_loads_in_transformers(family, hf_dir, tmp_path):
    import torch
    import transformers

    path, ref_model = hf_dir(family)
    out = str(tmp_path / "export")
    assert assert_export_round_trip(path, out)["architectures"] == [ARCH[family]]
    # transformers loads the export and computes the same logits.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(ref_model)
    tokens, mask = _tokens()
    np.testing.assert_array_equal(_hf_forward(reloaded, tokens, mask)[0], _hf_forward(ref_model, tokens, mask)[0])


def test_bfloat16_checkpoint(hf_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    path, ref_model = hf_dir("mixtral")
    bf = str(tmp_path / "bf16")
    ref_model.to(torch.bfloat16).save_pretrained(bf)
    ref_model.to(torch.float32)
    model, params = hf.from_hf(bf)
    want = load_file(os.path.join(bf, "model.safetensors"))["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    got = np.asarray(stack.to_unscanned(params, model.cfg)["layer1"]["moe"]["experts"]["wo"][3])   # [F, D]
    np.testing.assert_array_equal(got, want.float().numpy().T)
    out = str(tmp_path / "bf16_export")
    hf.to_hf(model.cfg, params, out, dtype="bfloat16")
    _, params2 = hf.from_hf(out)
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)))


# ----------------------------------------------------------------------------- no torch needed


def _random_checkpoint(directory, hf_config, seed=0, max_shard_bytes=hf.DEFAULT_MAX_SHARD_BYTES):
    """An HF checkpoint written by routezoo itself (needs no torch) from random parameters
    of the model's shapes, drawn with numpy: norm scales ``1 + 0.2 N(0, 1)``, every other
    value ``0.2 N(0, 1)`` (an eager init would compile every op)."""
    m = hf.model_config_from_hf(hf_config)
    from routezoo import zoo
    model = zoo.build(m)
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))))
    rng = np.random.default_rng(seed)
    params = jax.device_put(jax.tree_util.tree_map_with_path(
        lambda path, x: (("norm" in jax.tree_util.keystr(path)) + 0.2 * rng.standard_normal(x.shape)).astype(x.dtype),
        shapes["params"]))
    hf.to_hf(m, params, directory, max_shard_bytes=max_shard_bytes)
    return model, params


MIXTRAL_CFG = dict(COMMON, architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=4,
                   num_experts_per_tok=2, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
QWEN2_MOE_CFG = dict(COMMON, architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                     mlp_only_layers=[1], tie_word_embeddings=True)
OLMOE_CFG = dict(COMMON, architectures=["OlmoeForCausalLM"], model_type="olmoe", num_experts=4,
                 num_experts_per_tok=2)


@pytest.mark.parametrize("hf_config", [QWEN2_MOE_CFG, OLMOE_CFG], ids=["qwen2_moe", "olmoe"])
def test_sharded_import_matches_unsharded(hf_config, tmp_path):
    path = str(tmp_path / "ckpt")
    _, ref_params = _random_checkpoint(path, hf_config)
    mesh = shd.make_mesh({"data": 2, "fsdp": 1, "expert": 2, "tensor": 2})
    model, params = hf.from_hf(path, mesh=mesh)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens, mask = _tokens()
    tokens = np.concatenate([tokens, tokens[:1]])          # batch 4: divisible by data*expert
    ref_logits, _ = jax.jit(model.apply)({"params": ref_params}, tokens)
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
        logits, _ = jax.jit(model.apply)({"params": params}, tokens)
    assert _rel_err(logits, ref_logits, np.ones(tokens.shape, bool)) <= RTOL


def test_sharded_import_reads_only_each_devices_slice(tmp_path, monkeypatch):
    path = str(tmp_path / "mixtral")
    _, ref_params = _random_checkpoint(path, MIXTRAL_CFG)
    mesh = shd.make_mesh({"data": 1, "fsdp": 2, "expert": 2, "tensor": 2})
    reads = []
    original_get = safetensors_io.Reader.get

    def recording_get(self, name, index):
        out = original_get(self, name, index)
        reads.append((name, out.shape))
        return out
    monkeypatch.setattr(safetensors_io.Reader, "get", recording_get)
    model, params = hf.from_hf(path, mesh=mesh)

    # Both layers are scanned: each leaf [R, ...] holds every layer of its device's slice.
    assert stack.is_scanned(model.cfg)
    stacked = params["layers"]["block0"]["moe"]["experts"]["wi"]           # [R, E, D, F] = [2, 4, 32, 48]
    assert stacked.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
    assert {s.data.shape for s in stacked.addressable_shards} == {(2, 2, 16, 24)}
    layers = stack.to_unscanned(params, model.cfg)
    wi = layers["layer0"]["moe"]["experts"]["wi"]                          # [E, D, F] = [4, 32, 48]
    assert {s.data.shape for s in wi.addressable_shards} == {(2, 16, 24)}
    q = layers["layer1"]["attn"]["q"]                                       # [D, H, K] = [32, 4, 8]
    assert {s.data.shape for s in q.addressable_shards} == {(16, 2, 8)}
    # No read of an expert or q tensor covers more than one device's slice.
    assert all(shape == (24, 16) for name, shape in reads if name.endswith("experts.0.w3.weight"))
    assert all(shape == (16, 16) for name, shape in reads if name == "model.layers.1.self_attn.q_proj.weight")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens, mask = _tokens()
    ref_logits, _ = jax.jit(model.apply)({"params": ref_params}, tokens)
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
        logits, _ = jax.jit(model.apply)({"params": params}, tokens)
    assert _rel_err(logits, ref_logits, mask) <= RTOL


def test_unsupported_architecture_lists_supported(tmp_path):
    path = tmp_path / "gpt2"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(hf.HFError) as e:
        hf.from_hf(str(path))
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg
    for arch in ("LlamaForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM", "OlmoeForCausalLM"):
        assert arch in msg


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    path = str(tmp_path / "mixtral")
    _random_checkpoint(path, MIXTRAL_CFG)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["intermediate_size"] = 40
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(hf.HFError) as e:
        hf.from_hf(path)
    msg = str(e.value)
    assert "model.layers.0.block_sparse_moe.experts.0.w" in msg and "[48, 32]" in msg and "[40, 32]" in msg


def test_missing_shard_file_is_named(tmp_path):
    path = str(tmp_path / "sharded")
    _random_checkpoint(path, MIXTRAL_CFG, max_shard_bytes=20_000)
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2
    model, params = hf.from_hf(path)   # sharded checkpoints load
    os.remove(os.path.join(path, files[1]))
    with pytest.raises(FileNotFoundError, match=files[1]):
        hf.from_hf(path)


def test_imported_config_passes_validation():
    from routezoo.configs import base
    from routezoo.training import config_check

    mixtral = dict(MIXTRAL_CFG, vocab_size=300)   # >= the byte tokenizer's 258
    for cfg in (mixtral, dict(mixtral, architectures=["LlamaForCausalLM"], model_type="llama")):
        config = base.get_config()
        config.model = hf.model_config_from_hf(cfg)
        config_check.validate(config, num_devices=1, process_count=1)


def test_convert_cli_and_training_init(tmp_path):
    """`routezoo convert` both ways; init.from_hf onto the training state's shardings."""
    from routezoo.configs import base
    from routezoo.training import cli
    from routezoo.training.optim import make_optimizer
    from routezoo.training.train import mesh_and_rules, state_shardings
    from routezoo import zoo

    src = str(tmp_path / "hf")
    _, ref_params = _random_checkpoint(src, MIXTRAL_CFG)
    out = str(tmp_path / "converted")
    assert cli.main(["convert", "--from-hf", src, "--workdir", out]) == 0
    _, params = hf.from_hf(out)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    back = str(tmp_path / "back")
    assert cli.main(["convert", "--workdir", out, "--to-hf", back]) == 0
    _, params2 = hf.from_hf(back)
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    for from_dir in (src, out):
        config = base.get_config()
        config.mesh.data, config.mesh.expert = 4, 2
        config.init.from_hf = from_dir
        changes = hf.update_config_from_hf(config)
        assert "model.moe.num_experts=4" in changes and config.model.d_model == 32
        mesh, rules = mesh_and_rules(config)
        model = zoo.build(config.model)
        tx, _ = make_optimizer(config.optimizer, config.train.steps)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            _, shardings, _ = state_shardings(model, tx, config, mesh, rules)
            loaded = hf.load_params_for_config(config, mesh, shardings)
        # every parameter (the scanned stack's [R, ...] leaves included) on the state's sharding
        assert jax.tree.structure(loaded) == jax.tree.structure(shardings.params)
        assert all(a.sharding == s for a, s in zip(jax.tree.leaves(loaded), jax.tree.leaves(shardings.params)))
        wi = stack.to_unscanned(loaded, config.model)["layer0"]["moe"]["experts"]["wi"]
        assert wi.sharding.spec[0] == "expert" and not wi.sharding.is_fully_replicated
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(ref_params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    config = base.get_config()
    config.init.from_hf = src
    with pytest.raises(hf.HFError, match="does not match the checkpoint"):
        hf.load_params_for_config(config, None, None)
    assert cli.main(["convert", "--from-hf", str(tmp_path / "nowhere"), "--workdir", out]) == 2


def test_train_from_hf_starts_from_the_checkpoint(tmp_path, data_dir):
    """`routezoo train --config.init.from_hf=DIR`: the step-0 eval loss is the imported
    model's loss on the same eval batches."""
    from routezoo.training import cli, data
    from routezoo.training.metrics import read_metrics

    src = str(tmp_path / "hf")
    _random_checkpoint(src, dict(MIXTRAL_CFG, vocab_size=300))   # >= the byte tokenizer's 258
    wd = str(tmp_path / "run")
    flags = [f"--config.init.from_hf={src}", f"--config.data.data_dir={data_dir}", "--config.data.seq_len=32",
             "--config.train.steps=1", "--config.train.eval_steps=2", "--config.train.progress=false"]
    assert cli.main(["train", "--workdir", wd, *flags]) == 0
    e0 = read_metrics(wd)[0]["eval_loss"]

    config, _, _ = cli.parse_train_flags(["--workdir", wd, *flags])
    model, params = hf.from_hf(src)
    apply = jax.jit(model.apply)
    nll = count = 0.0
    for b in data.eval_batches(config):
        logits = apply({"params": params}, jnp.asarray(b["inputs"]))[0]
        logp = jax.nn.log_softmax(logits, -1)
        tok = -jnp.take_along_axis(logp, jnp.asarray(b["targets"])[..., None], -1)[..., 0]
        nll += float((tok * b["weights"]).sum())
        count += float(b["weights"].sum())
    assert e0 == pytest.approx(nll / count, rel=1e-5)


DEEPSEEK_CFG = dict(COMMON, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=300,
                    num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                    n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=24,
                    kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,
                    routed_scaling_factor=2.5, norm_topk_prob=True)


def test_deepseek_v3_config_validation_and_refusals():
    """The imported DeepSeek-V3 config passes validation and round-trips through
    hf_config_from_model; unsupported settings give one-line errors naming the key."""
    from routezoo.configs import base
    from routezoo.layers.moe import validate_moe_config
    from routezoo.training import config_check

    config = base.get_config()
    config.model = hf.model_config_from_hf(DEEPSEEK_CFG)
    config_check.validate(config, num_devices=1, process_count=1)
    back = hf.hf_config_from_model(config.model)
    for key in ("n_routed_experts", "n_group", "topk_group", "routed_scaling_factor", "q_lora_rank", "kv_lora_rank",
                "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "first_k_dense_replace", "n_shared_experts",
                "moe_intermediate_size", "norm_topk_prob"):
        assert back[key] == DEEPSEEK_CFG[key], key
    assert hf.model_config_from_hf(back).to_dict() == config.model.to_dict()

    for bad, match in ((dict(n_group=3), "deepseek_v3_n_group=3"), (dict(topk_group=5), "deepseek_v3_topk_group=5"),
                       (dict(num_key_value_heads=2), "num_key_value_heads=2"),
                       (dict(rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}), "dynamic")):
        with pytest.raises(hf.HFError, match=match) as e:
            hf.model_config_from_hf(dict(DEEPSEEK_CFG, **bad))
        assert "\n" not in str(e.value)
    moe = hf.model_config_from_hf(DEEPSEEK_CFG).moe
    moe.bias_update_rate = 1e-3
    with pytest.raises(ValueError, match="bias_update_rate"):
        validate_moe_config(moe, causal=True, mesh_shape={})


# ----------------------------------------------------------------------------- scanned stacks

# 4 layers each, so that a stack scans: every layer MoE (Mixtral); a dense first layer left
# outside the scan (DeepSeek-V3's first_k_dense_replace); a dense last layer outside it (Qwen2-MoE).
SCANNED_FAMILIES = {
    "mixtral_4": ("MixtralConfig", dict(num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=2)),
    "deepseek_v3_4": ("DeepseekV3Config", dict(FAMILIES["deepseek_v3"][1], num_hidden_layers=4)),
    "qwen2_moe_4": ("Qwen2MoeConfig", dict(FAMILIES["qwen2_moe"][1], num_hidden_layers=4, mlp_only_layers=[3])),
}


@pytest.fixture(scope="module")
def hf_dir_4(tmp_path_factory):
    return tiny_causal_lm_factory(tmp_path_factory, SCANNED_FAMILIES)


@pytest.mark.parametrize("family", sorted(SCANNED_FAMILIES))
def test_scanned_import_and_export_equal_the_unscanned_path(family, hf_dir_4, tmp_path):
    """HF import into a scanned model holds the unscanned import's parameters layer by
    layer, computes its logits, and exports the same tensors, byte for byte."""
    from safetensors.numpy import load_file

    path, _ = hf_dir_4(family)
    model_s, params_s = hf.from_hf(path)
    model_u, params_u = hf.from_hf(path, scan_layers=False)
    layout = stack.stack_layouts(model_s.cfg)[()]
    assert stack.is_scanned(model_s.cfg) and not stack.is_scanned(model_u.cfg)
    assert layout.repeats >= 2 and (layout.prefix or layout.suffix or family == "mixtral_4"), layout.describe()
    assert "layers" in params_s and "layer0" in params_u and "layers" not in params_u
    per_layer = stack.to_unscanned(params_s, model_s.cfg)
    assert jax.tree.structure(per_layer) == jax.tree.structure(params_u)
    for (p1, a), (p2, b) in zip(jax.tree_util.tree_leaves_with_path(per_layer),
                                jax.tree_util.tree_leaves_with_path(params_u)):
        assert p1 == p2 and a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), p1

    tokens, mask = _tokens()
    kw = dict(attention_mask=mask, positions=positions_from_mask(mask))
    # both compiled (run eagerly, the unscanned layers go op by op and round differently)
    logits_s = jax.jit(lambda p: model_s.apply({"params": p}, jnp.asarray(tokens), **kw)[0])(params_s)
    logits_u = jax.jit(lambda p: model_u.apply({"params": p}, jnp.asarray(tokens), **kw)[0])(params_u)
    np.testing.assert_array_equal(np.asarray(logits_s)[mask], np.asarray(logits_u)[mask])

    out_s, out_u = str(tmp_path / "scanned"), str(tmp_path / "unscanned")
    hf.to_hf(model_s.cfg, params_s, out_s)
    hf.to_hf(model_u.cfg, params_u, out_u)
    original, exported_s, exported_u = (load_file(os.path.join(d, "model.safetensors")) for d in (path, out_s, out_u))
    assert sorted(exported_s) == sorted(exported_u) == sorted(original)
    for name, value in exported_u.items():
        assert exported_s[name].dtype == value.dtype and exported_s[name].shape == value.shape, name
        assert exported_s[name].tobytes() == value.tobytes() == original[name].tobytes(), name
    assert json.load(open(os.path.join(out_s, "config.json"))) == json.load(open(os.path.join(out_u, "config.json")))
    # and the export of the scanned model imports back, scanned, to the same parameters
    _, params_back = hf.from_hf(out_s)
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(params_back), jax.tree.leaves(params_s)))


def test_scanned_import_places_each_parameter_once_in_its_layout(tmp_path, monkeypatch):
    """A scanned model's import places every parameter once, at its stacked [R, ...] shape
    and final sharding (never per layer first and then stacked: that held the model twice
    on the devices), and each read still covers one device's slice of one layer."""
    path = str(tmp_path / "mixtral")
    _, ref_params = _random_checkpoint(path, MIXTRAL_CFG)
    mesh = shd.make_mesh({"data": 1, "fsdp": 2, "expert": 2, "tensor": 2})
    placed, reads = [], []
    make_array = jax.make_array_from_callback
    original_get = safetensors_io.Reader.get

    def recording_make(shape, sharding, callback, *args, **kwargs):
        placed.append((tuple(shape), sharding))
        return make_array(shape, sharding, callback, *args, **kwargs)

    def recording_get(self, name, index):
        out = original_get(self, name, index)
        reads.append((name, out.shape))
        return out
    monkeypatch.setattr(jax, "make_array_from_callback", recording_make)
    monkeypatch.setattr(safetensors_io.Reader, "get", recording_get)
    model, params = hf.from_hf(path, mesh=mesh)
    assert stack.is_scanned(model.cfg)
    leaves = jax.tree.leaves(params)
    assert sorted(map(repr, placed)) == sorted(repr((a.shape, a.sharding)) for a in leaves)
    assert all(any(a is b for b in jax.live_arrays()) for a in leaves)
    assert all(shape == (24, 16) for name, shape in reads if name.endswith("experts.0.w3.weight"))
    assert {name for name, _ in reads if name.endswith("experts.0.w3.weight")} == {
        f"model.layers.{i}.block_sparse_moe.experts.0.w3.weight" for i in range(2)}
    for a, b in zip(leaves, jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_scanned_export_slices_one_layer_at_a_time(tmp_path, monkeypatch):
    """Exporting a scanned model slices one layer's tensor out of a stacked leaf at a
    time: device memory never holds a per-layer copy of the whole model."""
    from routezoo.zoo.hf import export as export_lib

    model, params = _random_checkpoint(str(tmp_path / "src"), dict(MIXTRAL_CFG, num_hidden_layers=4))
    assert stack.is_scanned(model.cfg)
    params = jax.device_put(params)
    model_bytes = sum(a.nbytes for a in jax.tree.leaves(params))
    shapes = stack.to_unscanned(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params), model.cfg)
    largest = max(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(shapes))   # one layer's tensor
    assert largest < model_bytes / 8
    live = lambda: sum(a.nbytes for a in jax.live_arrays())
    base = live()
    extra = []
    host_value = export_lib._host_value

    def recording(x):
        extra.append(live() - base)
        return host_value(x)
    monkeypatch.setattr(export_lib, "_host_value", recording)
    out = str(tmp_path / "out")
    hf.to_hf(model.cfg, params, out)
    assert extra and max(extra) <= largest, (max(extra), largest, model_bytes)
    _, back = hf.from_hf(out)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
