"""DeepSeek-V3 multi-token prediction (``model.mtp_depth``): the modules' wiring against a
step-by-step reference built from the same parameters, the loss's shifts, training with
it, and Hugging Face import/export of the MTP layers the released checkpoints carry."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from routezoo.configs import base
from routezoo.layers.embed import Embed
from routezoo.layers.norms import make_norm
from routezoo.zoo import lm


def _cfg(depth=2):
    m = base.get_config().model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 2, 32, 2, 1, 16, 48
    m.vocab_size, m.ffn = 64, "mlp,moe"
    m.moe.num_experts, m.moe.k, m.moe.expert_dim, m.moe.jitter = 4, 2, 16, 0.0
    m.mtp_depth = depth
    return m


def test_mtp_logits_match_step_by_step_reference():
    """Module k reads the embedding of t[i+k] (enorm half first) and the previous depth's
    state (the trunk's final-normed output for k = 1, the previous block's output after),
    runs a block of the last layer's kind, its own norm and the shared head; the trunk's
    logits are those of the same model without MTP."""
    c = _cfg(depth=2)
    model = lm.DecoderLM(c)
    tokens = jax.random.randint(jax.random.key(0), (2, 10), 1, c.vocab_size)
    variables = nn.meta.unbox(model.init(jax.random.key(1), tokens))
    params = variables["params"]
    (logits, aux), inter = model.apply(variables, tokens, capture_intermediates=True,
                                       mutable=["intermediates"])
    assert len(aux["mtp_logits"]) == 2 and aux["mtp_logits"][0].shape == logits.shape

    c0 = _cfg(depth=0)
    trunk = {k: v for k, v in params.items() if not k.startswith("mtp")}
    logits0, aux0 = lm.DecoderLM(c0).apply({**variables, "params": trunk}, tokens)
    np.testing.assert_array_equal(logits0, logits)
    assert "mtp_logits" not in aux0

    f32 = jnp.float32
    embed = Embed(c.vocab_size, c.d_model, dtype=f32, param_dtype=f32,
                        scale_attend=bool(c.scale_tied_logits))
    norm = make_norm(c.norm, c.norm_eps, f32, f32)
    h = inter["intermediates"]["final_norm"]["__call__"][0]          # trunk, final-normed
    positions = jnp.broadcast_to(jnp.arange(10), tokens.shape)
    for k in (1, 2):
        p = params[f"mtp{k}"]
        ahead = jnp.concatenate([tokens[:, k:], jnp.zeros((2, k), tokens.dtype)], axis=1)
        e = embed.apply({"params": params["embed"]}, ahead)
        x = jnp.concatenate([norm.apply({"params": p["enorm"]}, e), norm.apply({"params": p["hnorm"]}, h)], -1)
        x = x @ p["eh_proj"]
        h, _ = lm.Block(c, "moe", f32, f32).apply({"params": p["block"]}, x, positions, True, ahead)
        want = embed.apply({"params": params["embed"]}, norm.apply({"params": p["norm"]}, h),
                           method=Embed.attend)
        np.testing.assert_allclose(aux["mtp_logits"][k - 1], want, rtol=1e-5, atol=1e-5)


def test_mtp_loss_shifts_targets_by_depth():
    from routezoo.zoo.lm import cross_entropy, mtp_loss
    rng = np.random.default_rng(0)
    targets = jnp.asarray(rng.integers(0, 7, (2, 6)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, (2, 6)), jnp.float32).at[:, :2].set(1.0)
    logits = [jnp.asarray(rng.normal(size=(2, 6, 7)), jnp.float32) for _ in range(2)]
    want = []
    for k, lg in enumerate(logits, 1):   # position i predicts targets[i + k]
        nll = [float(cross_entropy(lg[b, i], targets[b, i + k], weights[b, i + k])[0])
               for b in range(2) for i in range(6 - k)]
        want.append(sum(nll) / float(weights[:, k:].sum()))
    np.testing.assert_allclose(mtp_loss(logits, targets, weights), np.mean(want), rtol=1e-6)
    # confident, correct predictions at the right shift give ~0; at the wrong shift, not
    exact = [jax.nn.one_hot(jnp.pad(targets[:, k:], ((0, 0), (0, k))), 7) * 50.0 for k in (1, 2)]
    assert float(mtp_loss(exact, targets, weights)) < 1e-6
    assert float(mtp_loss([exact[1], exact[0]], targets, weights)) > 1.0


def test_model_returns_the_mtp_loss_term_given_targets():
    """With the batch's targets and loss weights the model returns ``losses['mtp'] =
    model.mtp_weight * mtp_ce`` and ``metrics['mtp_ce']`` (:func:`lm.mtp_loss` of its own
    MTP logits); without them, no MTP term (evaluation, sampling)."""
    c = _cfg(depth=2)
    model = lm.DecoderLM(c)
    row = jax.random.randint(jax.random.key(0), (2, 11), 1, c.vocab_size)
    inputs, targets = row[:, :-1], row[:, 1:]
    weights = jnp.ones(targets.shape, jnp.float32).at[1, 6:].set(0.0)
    variables = nn.meta.unbox(model.init(jax.random.key(1), inputs))
    _, plain = model.apply(variables, inputs)
    assert "mtp" not in plain["losses"] and "metrics" not in plain
    _, aux = model.apply(variables, inputs, targets=targets, loss_weights=weights)
    want = lm.mtp_loss(aux["mtp_logits"], targets, weights)
    np.testing.assert_allclose(aux["metrics"]["mtp_ce"], want, rtol=1e-6)
    np.testing.assert_allclose(aux["losses"]["mtp"], c.mtp_weight * want, rtol=1e-6)


def test_mtp_trains_and_its_gradient_reaches_the_trunk(tmp_path, data_dir):
    from conftest import tiny_config
    from routezoo.training import config_check
    from routezoo.training.metrics import read_metrics
    from routezoo.training.train import train_and_evaluate
    from routezoo.zoo.lm import mtp_loss

    c = _cfg(depth=1)
    model = lm.DecoderLM(c)
    tokens = jax.random.randint(jax.random.key(0), (2, 10), 1, c.vocab_size)
    variables = nn.meta.unbox(model.init(jax.random.key(1), tokens))

    def only_mtp(params):
        _, aux = model.apply({**variables, "params": params}, tokens[:, :-1])
        return mtp_loss(aux["mtp_logits"], tokens[:, 1:], jnp.ones((2, 9)))
    grads = jax.jit(jax.grad(only_mtp))(variables["params"])
    assert float(jnp.abs(grads["layer0"]["attn"]["q"]).max()) > 0     # the trunk learns from it
    assert float(jnp.abs(grads["mtp1"]["eh_proj"]).max()) > 0

    cfg = tiny_config(data_dir, **{"model.mtp_depth": 1, "model.ffn": "mlp,moe", "train.steps": 2,
                                   "train.eval_every": 2, "checkpoint.every": 2})
    config_check.validate(cfg, num_devices=8, process_count=1)
    train_and_evaluate(cfg, str(tmp_path / "run"))
    rows = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert rows and all(np.isfinite(r["mtp_ce"]) for r in rows)
    np.testing.assert_allclose(rows[-1]["mtp"], 0.3 * rows[-1]["mtp_ce"], rtol=1e-5)

    for key, value, match in (("model.mtp_depth", -1, "allowed: >= 0"),
                              ("model.name", "encoder_mlm", "needs model.name='decoder_lm'"),
                              ("model.moe.router", "recurrent", "does not work with moe.router='recurrent'")):
        bad = tiny_config(data_dir, **{"model.mtp_depth": 1, "model.ffn": "mlp,moe", key: value})
        with pytest.raises(config_check.ConfigError, match=match):
            config_check.validate(bad, num_devices=8, process_count=1)


@pytest.fixture(scope="module")
def v3_with_mtp(tmp_path_factory):
    """(checkpoint without MTP saved by transformers, the same with one MTP layer added as
    the released DeepSeek-V3 weights store it)."""
    from safetensors.numpy import load_file, save_file
    from test_hf import FAMILIES, tiny_causal_lm_factory

    path, _ = tiny_causal_lm_factory(tmp_path_factory, {"deepseek_v3": FAMILIES["deepseek_v3"]})("deepseek_v3")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    cfg = json.load(open(os.path.join(path, "config.json")))
    n, d = cfg["num_hidden_layers"], cfg["hidden_size"]
    rng = np.random.default_rng(3)
    last = f"model.layers.{n - 1}."
    for name, value in list(tensors.items()):   # an MoE layer like the last one, other values
        if name.startswith(last):
            noise = rng.normal(size=value.shape).astype(value.dtype)
            tensors[f"model.layers.{n}." + name[len(last):]] = value + 0.1 * noise
    L = f"model.layers.{n}"
    tensors.update({f"{L}.enorm.weight": (1 + 0.2 * rng.normal(size=d)).astype(np.float32),
                    f"{L}.hnorm.weight": (1 + 0.2 * rng.normal(size=d)).astype(np.float32),
                    f"{L}.eh_proj.weight": (rng.normal(size=(d, 2 * d)) / np.sqrt(2 * d)).astype(np.float32),
                    f"{L}.shared_head.norm.weight": (1 + 0.2 * rng.normal(size=d)).astype(np.float32),
                    f"{L}.embed_tokens.weight": tensors["model.embed_tokens.weight"].copy(),
                    f"{L}.shared_head.head.weight": tensors["lm_head.weight"].copy()})
    out = str(tmp_path_factory.mktemp("v3_mtp"))
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    json.dump({**cfg, "num_nextn_predict_layers": 1}, open(os.path.join(out, "config.json"), "w"))
    return path, out, tensors


def test_hf_import_export_of_mtp_layers(v3_with_mtp, tmp_path):
    """A DeepSeek-V3 checkpoint with its MTP layer imports to ``mtp1`` (block, norms,
    ``eh_proj``), keeps the trunk's logits, and exports bit-identically (the layer's copies
    of the embedding and head included); one saved by transformers (no MTP tensors, though
    its config declares one layer) imports without MTP."""
    from test_hf import assert_export_round_trip
    from routezoo.zoo import hf

    plain, with_mtp, tensors = v3_with_mtp
    assert hf.open_source(plain).model_config.mtp_depth == 0
    model0, params0 = hf.from_hf(plain)
    model, params = hf.from_hf(with_mtp)
    assert model.cfg.mtp_depth == 1
    n = model.cfg.num_layers
    np.testing.assert_array_equal(params["mtp1"]["eh_proj"], tensors[f"model.layers.{n}.eh_proj.weight"].T)
    np.testing.assert_array_equal(params["mtp1"]["norm"]["scale"], tensors[f"model.layers.{n}.shared_head.norm.weight"])
    np.testing.assert_array_equal(params["mtp1"]["block"]["moe"]["router"]["kernel"],
                                  tensors[f"model.layers.{n}.mlp.gate.weight"].T)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 96, (2, 9)), jnp.int32)
    logits0, _ = model0.apply({"params": params0}, tokens)
    logits, aux = model.apply({"params": params}, tokens)
    np.testing.assert_array_equal(logits, logits0)
    assert aux["mtp_logits"][0].shape == logits.shape
    exported = assert_export_round_trip(with_mtp, str(tmp_path / "export"))
    assert exported["num_nextn_predict_layers"] == 1


def test_mtp_flops_per_token_match_xla_cost_analysis():
    """What one MTP module adds to the logged FLOPs per token (its parameters' matmuls, one
    more attention layer and one more output head) is what XLA counts it adding, within 10%."""
    from routezoo import zoo

    length, counted, xla = 32, [], []
    for depth in (0, 1):
        m = _cfg(depth)
        m.ffn = "mlp"
        model = zoo.build(m)
        tokens = jnp.ones((1, length), jnp.int32)
        variables = jax.jit(lambda: model.init(jax.random.key(0), tokens))()
        _, active = zoo.count_params(variables["params"], m, length)
        counted.append(zoo.flops_per_token(m, length, active)["forward"] * length)
        cost = jax.jit(lambda v: model.apply(v, tokens)).lower(variables).compile().cost_analysis()
        xla.append((cost[0] if isinstance(cost, list) else cost)["flops"])
    added, added_xla = counted[1] - counted[0], xla[1] - xla[0]
    assert abs(added / added_xla - 1) < 0.1, (added, added_xla)
