"""DeepSeek-V2 import/export and YaRN rope scaling (routezoo.zoo.hf, layers/dense.RopeScaling).

Tiny random DeepSeek-V2 / V3 models built with ``transformers`` (PyTorch, CPU, float32) are
saved, imported and compared on the padded batch of ``test_hf.py`` (logits at real tokens,
relative error <= 1e-4; the experts each router chose); exports must be bit-identical and
load back in transformers with the same logits. YaRN inverse frequencies and attention
factors are compared with transformers' own ``_compute_yarn_parameters``.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from routezoo.layers.attention import RopeScaling
from routezoo.zoo import hf
from routezoo.zoo.lm import positions_from_mask
from test_hf import (COMMON, RTOL, _randomize, _rel_err, _rz_forward, _tokens, assert_export_round_trip,
                     tiny_causal_lm_factory)

MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, moe_intermediate_size=16)
YARN_V2 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
           "beta_fast": 16.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.5}
YARN_V3 = {"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0, "original_max_position_embeddings": 16}

# name -> (config class, extra config, HF architecture); 2 layers each, layer 0 dense.
MODELS = {
    # V2-Lite-like: plain q projection, greedy top-2 of 4 softmax experts, 2 shared experts, weights x 2
    "v2_greedy": ("DeepseekV2Config", dict(MLA, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=2,
                                           first_k_dense_replace=1, q_lora_rank=None, qk_nope_head_dim=8,
                                           v_head_dim=16, topk_method="greedy", routed_scaling_factor=2.0)),
    # V2-like: q latent, 8 experts in 4 groups (2 kept by their best score), 1 shared expert, weights x 2.5
    "v2_grouped": ("DeepseekV2Config", dict(MLA, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
                                            first_k_dense_replace=1, q_lora_rank=24, qk_nope_head_dim=12,
                                            v_head_dim=10, topk_method="group_limited_greedy", n_group=4,
                                            topk_group=2, routed_scaling_factor=2.5)),
    # V2 with YaRN: mscale != mscale_all_dim, so both the cos/sin factor and the softmax factor are not 1
    "v2_yarn": ("DeepseekV2Config", dict(MLA, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                                         first_k_dense_replace=1, q_lora_rank=None, qk_nope_head_dim=8,
                                         v_head_dim=16, max_position_embeddings=32, rope_parameters=YARN_V2)),
    # V3 with YaRN (no mscale: cos/sin times 0.1 ln 4 + 1), group-limited sigmoid routing with a bias
    "v3_yarn": ("DeepseekV3Config", dict(MLA, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                         n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=24,
                                         qk_nope_head_dim=12, v_head_dim=10, routed_scaling_factor=2.5,
                                         norm_topk_prob=True, max_position_embeddings=64,
                                         rope_parameters=YARN_V3)),
}
ARCH = {"DeepseekV2Config": "DeepseekV2ForCausalLM", "DeepseekV3Config": "DeepseekV3ForCausalLM"}

@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """name -> (directory, torch model) of a saved tiny random HF model (made once)."""
    return tiny_causal_lm_factory(tmp_path_factory, MODELS, seed=1)


def _hf_forward(model, tokens, mask):
    """(logits, experts chosen by each MoE layer's router [T, K]) of a transformers DeepSeek model."""
    import torch
    chosen, hooks = [], []
    for module in model.modules():
        if type(module).__name__.endswith("TopkRouter"):   # returns (logits, weights, indices)
            hooks.append(module.register_forward_hook(lambda mod, inp, out: chosen.append(out[2].numpy())))
    positions = np.asarray(positions_from_mask(mask))
    with torch.no_grad():
        out = model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    for hook in hooks:
        hook.remove()
    return out.logits.float().numpy(), chosen


@pytest.mark.parametrize("name", sorted(MODELS))
def test_import_matches_transformers(name, hf_model):
    path, ref_model = hf_model(name)
    model, params = hf.from_hf(path)
    cfg = model.cfg
    assert cfg.hf_architecture == ARCH[MODELS[name][0]]
    assert cfg.moe.router == ("deepseek_v2" if name.startswith("v2") else "deepseek_v3")
    assert cfg.rope_scaling.type == ("yarn" if name.endswith("yarn") else "none")
    tokens, mask = _tokens()
    ref_logits, chosen = _hf_forward(ref_model, tokens, mask)
    logits, routings = _rz_forward(model, params, tokens, mask)
    assert _rel_err(logits, ref_logits, mask) <= RTOL
    assert len(routings) == len(chosen) == 1          # layer 0 dense, layer 1 MoE
    flat = mask.reshape(-1)
    for routing, ref in zip(routings, chosen):
        np.testing.assert_array_equal(np.sort(np.asarray(routing.indices), -1)[flat], np.sort(ref, -1)[flat])


@pytest.mark.parametrize("name", ["v2_grouped", "v2_yarn"])
def test_export_is_bit_identical_and_loads_in_transformers(name, hf_model, tmp_path):
    import torch
    import transformers

    path, ref_model = hf_model(name)
    out = str(tmp_path / "export")
    written = assert_export_round_trip(path, out)
    original_cfg = json.load(open(os.path.join(path, "config.json")))
    assert written["architectures"] == ["DeepseekV2ForCausalLM"]
    for key in ("topk_method", "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "q_lora_rank",
                "first_k_dense_replace", "routed_scaling_factor", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
        assert written[key] == original_cfg[key], key
    if name == "v2_yarn":
        assert {k: written["rope_parameters"][k] for k in YARN_V2} == YARN_V2
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(ref_model)
    tokens, mask = _tokens()
    np.testing.assert_array_equal(_hf_forward(reloaded, tokens, mask)[0], _hf_forward(ref_model, tokens, mask)[0])


@pytest.mark.parametrize("rope", [
    dict(factor=4.0, original_max_position_embeddings=16),
    dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=0.707,
         mscale_all_dim=0.707),                                   # DeepSeek-V2's released setting
    dict(factor=8.0, original_max_position_embeddings=2048, mscale=1.0, mscale_all_dim=0.5, truncate=False),
    dict(factor=3.0, original_max_position_embeddings=512, beta_fast=8, beta_slow=2, attention_factor=1.3),
], ids=["plain", "deepseek_v2", "mscale_no_truncate", "attention_factor"])
def test_yarn_frequencies_match_transformers(rope):
    """Inverse frequencies, cos/sin factor and DeepSeek's softmax factor against transformers."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import _compute_yarn_parameters
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import yarn_apply_mscale

    dim, theta = 64, 10000.0
    params = {"rope_type": "yarn", "rope_theta": theta, **rope}
    cfg = transformers.DeepseekV2Config(hidden_size=64, num_attention_heads=4, qk_rope_head_dim=dim,
                                        max_position_embeddings=4 * rope["original_max_position_embeddings"],
                                        rope_parameters=dict(params))
    ref_freq, ref_factor = _compute_yarn_parameters(cfg)
    ours = RopeScaling(type="yarn", **{k: v for k, v in rope.items()})
    np.testing.assert_allclose(ours.inv_freq(dim, theta), ref_freq.numpy(), rtol=1e-6)
    assert ours.cos_sin_factor() == pytest.approx(ref_factor, rel=1e-12)
    assert ours.softmax_factor() == pytest.approx(yarn_apply_mscale(params, 1.0), rel=1e-12)
    # Interpolated (slow) dims are divided by the factor, extrapolated (fast) ones are not.
    plain = RopeScaling().inv_freq(dim, theta)
    np.testing.assert_allclose(ours.inv_freq(dim, theta)[0], plain[0], rtol=1e-6)
    np.testing.assert_allclose(ours.inv_freq(dim, theta)[-1], plain[-1] / rope["factor"], rtol=1e-6)


V2_CFG = dict(COMMON, architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=300,
              num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
              n_shared_experts=2, topk_method="group_limited_greedy", n_group=4, topk_group=2,
              first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12,
              v_head_dim=10, routed_scaling_factor=16.0, norm_topk_prob=False,
              rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                            "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}, rope_theta=10000)


def test_deepseek_v2_config_validation_round_trip_and_refusals():
    """The imported config (old-style ``rope_scaling`` with ``type``) validates and
    round-trips through hf_config_from_model; unsupported settings give one-line errors."""
    from routezoo.configs import base
    from routezoo.training import config_check

    config = base.get_config()
    config.model = hf.model_config_from_hf(V2_CFG)
    config_check.validate(config, num_devices=1, process_count=1)
    m = config.model
    assert (m.moe.router, m.moe.deepseek_v3_n_group, m.moe.deepseek_v3_topk_group) == ("deepseek_v2", 4, 2)
    assert (m.rope_scaling.type, m.rope_scaling.factor, m.rope_scaling.mscale_all_dim) == ("yarn", 40.0, 0.707)
    back = hf.hf_config_from_model(m)
    assert back["rope_parameters"]["rope_type"] == "yarn" and back["topk_method"] == "group_limited_greedy"
    assert hf.model_config_from_hf(back).to_dict() == m.to_dict()
    greedy = hf.model_config_from_hf(dict(V2_CFG, topk_method="greedy"))
    assert greedy.moe.deepseek_v3_n_group == 1 and hf.hf_config_from_model(greedy)["n_group"] is None
    assert hf.infer_architecture(m) == "DeepseekV2ForCausalLM"

    for bad, match in ((dict(norm_topk_prob=True), "norm_topk_prob"), (dict(topk_method="noaux_tc"), "noaux_tc"),
                       (dict(moe_layer_freq=2), "moe_layer_freq=2"), (dict(n_shared_experts=0), "n_shared_experts"),
                       (dict(n_group=3), "deepseek_v3_n_group=3"),
                       (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "dynamic")):
        with pytest.raises(hf.HFError, match=match) as e:
            hf.model_config_from_hf(dict(V2_CFG, **bad))
        assert "\n" not in str(e.value)
    llama = dict(COMMON, architectures=["LlamaForCausalLM"], model_type="llama",
                 rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(hf.HFError, match="rope type 'dynamic' is not supported; supported: 'default', 'yarn'"):
        hf.model_config_from_hf(llama)

    for key, value, match in (("type", "ntk", "rope_scaling.type='ntk'"),
                              ("original_max_position_embeddings", 0, "original_max_position_embeddings")):
        config = base.get_config()
        config.model = hf.model_config_from_hf(V2_CFG)
        config.model.rope_scaling[key] = value
        with pytest.raises(config_check.ConfigError, match=match):
            config_check.validate(config, num_devices=1, process_count=1)
    config = base.get_config()   # YaRN on standard attention validates too
    config.model.rope_scaling.type = "yarn"
    config.model.rope_scaling.original_max_position_embeddings = 64
    config_check.validate(config, num_devices=1, process_count=1)



def test_training_config_from_a_yarn_checkpoint(hf_model):
    """``init.from_hf``: update_config_from_hf carries rope_scaling and the DeepSeek-V2 router
    into config.model, which then matches the checkpoint and loads its parameters."""
    from routezoo.configs import base

    path, _ = hf_model("v2_yarn")
    config = base.get_config()
    config.init.from_hf = path
    changes = hf.update_config_from_hf(config)
    assert any(c.startswith("model.rope_scaling={") for c in changes), changes
    assert config.model.rope_scaling.type == "yarn" and config.model.moe.router == "deepseek_v2"
    model, ref = hf.from_hf(path)
    loaded = hf.load_params_for_config(config, None, hf.param_shardings(model, None))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(ref)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    config.model.rope_scaling.factor = 2.0
    with pytest.raises(hf.HFError, match="rope_scaling"):
        hf.load_params_for_config(config, None, None)


def test_yarn_on_standard_attention_matches_transformers(tmp_path):
    """A Qwen2 model with YaRN (rope_type 'yarn': rescaled frequencies, cos and sin times
    0.1 ln(factor) + 1, softmax scale unchanged) imports with transformers' logits and
    exports its rope parameters back."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    yarn = {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0, "original_max_position_embeddings": 16}
    cfg = transformers.Qwen2Config(**{**COMMON, "rope_parameters": yarn})
    ref = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    _randomize(ref, torch, seed=2)
    path = str(tmp_path / "qwen2_yarn")
    ref.save_pretrained(path)
    model, params = hf.from_hf(path)
    assert model.cfg.rope_scaling.type == "yarn" and model.cfg.rope_scaling.factor == 4.0
    tokens, mask = _tokens()
    ref_logits, _ = _hf_forward(ref, tokens, mask)
    logits, _ = _rz_forward(model, params, tokens, mask)
    assert _rel_err(logits, ref_logits, mask) <= RTOL
    plain = dict(model.cfg.to_dict())
    plain["rope_scaling"] = dict(plain["rope_scaling"], type="none")
    from ml_collections import ConfigDict
    from routezoo import zoo
    unscaled, _ = _rz_forward(zoo.build(ConfigDict(plain)), params, tokens, mask)
    assert _rel_err(unscaled, ref_logits, mask) > 10 * RTOL      # the scaling matters at these positions
    out = str(tmp_path / "export")
    hf.to_hf(model.cfg, params, out)
    written = json.load(open(os.path.join(out, "config.json")))["rope_parameters"]
    assert {k: written[k] for k in yarn} == yarn
