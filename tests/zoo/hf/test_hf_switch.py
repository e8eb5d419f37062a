"""Switch Transformers (encoder-decoder MoE): Hugging Face import/export parity.

Tiny randomly initialised ``SwitchTransformersForConditionalGeneration`` models (PyTorch,
CPU, float32) are saved, imported with :func:`routezoo.zoo.hf.from_hf` and compared on a
batch with padding in both the encoder input (right- and left-padded rows) and the
decoder input: logits at real decoder tokens, and every sparse layer's top-1 expert at
real tokens. One model has room for every token; the other has an expert capacity of 2
per sequence, so tokens are dropped (in sequence order, the same ones on both sides).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from routezoo.layers.adapters import hooks as adapter_hooks
from routezoo.layers import sharding as shd
from routezoo.layers.routers import TopKRouter
from routezoo.layers.t5 import relative_position_bucket
from routezoo.zoo import hf
from test_hf import assert_export_round_trip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ARCH = "SwitchTransformersForConditionalGeneration"
COMMON = dict(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_heads=4, num_experts=4, num_layers=2,
              relative_attention_num_buckets=8, relative_attention_max_distance=12, router_jitter_noise=0.01)
CASES = {
    # 2 + 2 layers, layer 1 of each stack sparse, room for every token, tied logits
    "roomy": dict(num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, expert_capacity=64),
    # 3 decoder layers (step 3: layer 1 sparse), 2 slots per expert and sequence (tokens dropped)
    "drops": dict(num_decoder_layers=3, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, expert_capacity=2),
}
RTOL = 1e-4


def _batch():
    rng = np.random.RandomState(0)
    enc = rng.randint(2, COMMON["vocab_size"], (3, 11))
    dec = rng.randint(2, COMMON["vocab_size"], (3, 9))
    em = np.ones_like(enc)
    em[1, 7:] = 0          # right padding
    em[2, :4] = 0          # left padding
    dm = np.ones_like(dec)
    dm[1, 6:] = 0          # right padding
    dm[2, :1] = 0          # the start token masked out (a fully masked first query, as HF allows)
    return enc * em, dec * dm, em, dm


_CACHE: dict = {}


@pytest.fixture(scope="module")
def switch_dir(tmp_path_factory):
    """case -> (directory, torch model) of a saved tiny random Switch model (made once)."""
    def make(case):
        if case not in _CACHE:
            cfg = transformers.SwitchTransformersConfig(**COMMON, **CASES[case])
            model = transformers.SwitchTransformersForConditionalGeneration(cfg).eval()
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():   # random everywhere (HF inits norms to 1)
                for name, p in model.named_parameters():
                    noise = torch.randn(p.shape, generator=g)
                    p.copy_(1.0 + 0.2 * noise if "layer_norm" in name else noise * p.shape[-1] ** -0.5)
            path = str(tmp_path_factory.mktemp(case))
            model.save_pretrained(path)
            _CACHE[case] = (path, model)
        return _CACHE[case]
    return make


def _hf_forward(model, enc, dec, em, dm):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(em), decoder_input_ids=torch.tensor(dec),
                    decoder_attention_mask=torch.tensor(dm), output_router_logits=True)
    routers = {"encoder": [r.numpy() for r in out.encoder_router_logits],
               "decoder": [r.numpy() for r in out.decoder_router_logits]}
    return out.logits.numpy(), routers


class _Recorder:
    """An activation-space adapter that adds nothing and records the projections it sees."""

    name = "recorder"
    acts_on_activations = True   # it defines hook_delta
    needs_task_ids = False

    def __init__(self, paths):
        self.paths, self.seen = paths, []

    def hook_targets(self, base, adapter_params):
        return {p: None for p in self.paths}

    def hook_delta(self, path, x, y, ctx):
        self.seen.append(path)
        return np.zeros(y.shape, np.float32)


def _rz_forward(model, params, enc, dec, em, dm, adapter=None):
    """(logits, aux, each stack's Routings), jitted (one compile; run eagerly, every op
    compiles on its own); ``adapter``'s hooks are bound while it traces."""
    def forward(params, enc, dec, em, dm):
        return model.apply({"params": params}, enc, dec, encoder_mask=em, decoder_mask=dm, mutable=["intermediates"],
                           capture_intermediates=lambda mdl, method: isinstance(mdl, TopKRouter))
    with adapter_hooks.bind(adapter, params, {}):
        (logits, aux), state = jax.jit(forward)(params, enc, dec, em, dm)
    inter = state["intermediates"]
    routings = {s: [inter[s][k]["moe"]["router"]["__call__"][0] for k in sorted(inter.get(s, {}))]
                for s in ("encoder", "decoder")}
    return np.asarray(logits), aux, routings


def _rel_err(a, b, mask):
    a, b = np.asarray(a)[mask], np.asarray(b)[mask]
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_relative_position_buckets_match_transformers():
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersAttention
    rel = np.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for n, dist in ((32, 128), (8, 12)):
            ref = SwitchTransformersAttention._relative_position_bucket(
                torch.tensor(rel), bidirectional=bidirectional, num_buckets=n, max_distance=dist).numpy()
            got = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=n, max_distance=dist)
            np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_transformers(case, switch_dir):
    path, ref_model = switch_dir(case)
    model, params = hf.from_hf(path)
    assert type(model).__name__ == "EncoderDecoderLM" and model.cfg.expert_capacity == CASES[case]["expert_capacity"]
    enc, dec, em, dm = _batch()
    ref_logits, ref_routers = _hf_forward(ref_model, enc, dec, em, dm)
    # Every projection reaches the adapter hook (self- and cross-attention, dense MLPs).
    recorder = _Recorder(["encoder/layer0/attn/q", "encoder/layer1/attn/o", "decoder/layer0/cross/k",
                          "decoder/layer1/cross/o", "encoder/layer0/mlp/wi", "decoder/layer0/mlp/wo"])
    logits, aux, routings = _rz_forward(model, params, enc, dec, em, dm, recorder)
    assert sorted(set(recorder.seen)) == sorted(recorder.paths)
    assert logits.shape == ref_logits.shape
    err = _rel_err(logits, ref_logits, dm.astype(bool))
    print(f"{case}: max relative logit error {err:.2e}")
    assert err <= RTOL, err
    masks = {"encoder": em.astype(bool).reshape(-1), "decoder": dm.astype(bool).reshape(-1)}
    for stack in ("encoder", "decoder"):
        assert len(routings[stack]) == len(ref_routers[stack]) == 1
        for routing, ref in zip(routings[stack], ref_routers[stack]):
            ref_idx = np.argmax(ref.reshape(-1, ref.shape[-1]), axis=-1)
            got_idx = np.asarray(routing.indices)[:, 0]
            np.testing.assert_array_equal(got_idx[masks[stack]], ref_idx[masks[stack]])
    dropped = [float(v) for k, v in aux["stats"].items() if k.endswith("dropped_fraction")]
    assert (max(dropped) > 0) == (case == "drops")
    # Router losses are routezoo's (per layer, summed), with the checkpoint's coefficients.
    assert model.cfg.moe.z_loss_coef == ref_model.config.router_z_loss_coef
    assert set(aux["losses"]) == {"load_balance", "z_loss"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_is_bit_identical_and_loads_in_transformers(case, switch_dir, tmp_path):
    path, ref_model = switch_dir(case)
    out = str(tmp_path / "export")
    assert assert_export_round_trip(path, out)["architectures"] == [ARCH]
    reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(ref_model)
    for key in ("encoder_sparse_step", "decoder_sparse_step", "expert_capacity", "num_decoder_layers"):
        assert getattr(reloaded.config, key) == getattr(ref_model.config, key), key
    batch = _batch()
    np.testing.assert_array_equal(_hf_forward(reloaded, *batch)[0], _hf_forward(ref_model, *batch)[0])


def test_sharded_import_places_each_parameter_by_its_logical_names(switch_dir):
    path, _ = switch_dir("roomy")
    _, ref_params = hf.from_hf(path)
    mesh = shd.make_mesh({"data": 2, "fsdp": 1, "expert": 2, "tensor": 2})
    _, params = hf.from_hf(path, mesh=mesh)
    wi = params["encoder"]["layer1"]["moe"]["experts"]["wi"]                      # [E, D, F] = [4, 16, 24]
    assert wi.sharding.spec == jax.sharding.PartitionSpec("expert", "fsdp", "tensor")
    assert {s.data.shape for s in wi.addressable_shards} == {(2, 16, 12)}
    cross_q = params["decoder"]["layer0"]["cross"]["q"]                           # [D, H, K] = [16, 4, 4]
    assert {s.data.shape for s in cross_q.addressable_shards} == {(16, 2, 4)}
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_errors_are_one_line(switch_dir, tmp_path):
    path = tmp_path / "gpt2"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(hf.HFError) as e:
        hf.from_hf(str(path))
    assert ARCH in str(e.value) and "GPT2LMHeadModel" in str(e.value) and "\n" not in str(e.value)

    src, _ = switch_dir("roomy")
    bad = tmp_path / "bad"
    bad.mkdir()
    os.symlink(os.path.join(src, "model.safetensors"), bad / "model.safetensors")
    cfg = json.load(open(os.path.join(src, "config.json")))
    (bad / "config.json").write_text(json.dumps(dict(cfg, d_ff=20)))
    with pytest.raises(hf.HFError) as e:
        hf.from_hf(str(bad))
    msg = str(e.value)
    assert "encoder.block.0.layer.1.mlp.wi.weight" in msg and "[24, 16]" in msg and "[20, 16]" in msg
    assert "\n" not in msg
    for key, value in (("router_bias", True), ("dense_act_fn", "gelu"), ("router_dtype", "bfloat16"),
                       ("tie_word_embeddings", False)):
        with pytest.raises(hf.HFError, match=key) as e:
            hf.model_config_from_hf(dict(cfg, **{key: value}))
        assert "\n" not in str(e.value)
    m = hf.model_config_from_hf(cfg)
    m.expert_capacity = 0
    with pytest.raises(hf.HFError, match="expert_capacity") as e:
        hf.hf_config_from_model(m)
    assert "\n" not in str(e.value)


def test_seq2seq_training_two_steps(tmp_path, data_dir):
    """The one train loop trains the encoder-decoder (prefix-LM split of packed rows)
    with Switch MoE layers in both stacks; the imported config passes validation."""
    from conftest import tiny_config
    from routezoo.training import config_check
    from routezoo.training.metrics import read_metrics
    from routezoo.training.train import train_and_evaluate

    c = tiny_config(data_dir, **{"model.name": "encoder_decoder", "model.mlp_type": "relu",
                                 "model.encoder_sparse_step": 2, "model.decoder_sparse_step": 2,
                                 "model.expert_capacity": 8, "model.moe.num_experts": 4, "model.moe.k": 1,
                                 "model.moe.dispatch": "capacity", "model.moe.expert_type": "relu",
                                 "model.moe.jitter": 0.01, "model.num_kv_heads": 2,
                                 "train.steps": 2, "train.eval_every": 2, "checkpoint.every": 2})
    config_check.validate(c, num_devices=8, process_count=1)
    train_and_evaluate(c, str(tmp_path / "run"))
    rows = read_metrics(str(tmp_path / "run"))
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(train) == 2 and evals and np.isfinite(evals[-1]["eval_loss"])
    assert any(k.startswith("moe/decoder/layer1/") for k in train[0])


@pytest.mark.parametrize("eos_id", [None, 1])
def test_span_corruption_loses_no_token_and_matches_t5_counts(eos_id):
    """T5 span corruption: the encoder input and decoder targets give back every row
    exactly (each sentinel in the input stands for the span after it in the targets),
    with T5's counts (15% noise, mean span 3); padding gets weight / mask 0; the decoder
    reads the targets shifted right; different keys draw different spans. With an EOS id
    both end with it (mask and weight 1), as in T5."""
    from routezoo.zoo.encoder_decoder import span_corruption_batch, span_lengths

    vocab, length = 300, 40
    rows = np.random.default_rng(0).integers(2, 258, (4, length)).astype(np.int32)
    rows[3, 30:] = 0                                    # a padded row
    # jitted, as the train step runs it (eagerly, every op compiles on its own)
    corrupt = jax.jit(span_corruption_batch, static_argnames=("vocab_size", "eos_id"))
    inputs, targets, weights = corrupt({"inputs": jnp.asarray(rows)}, jax.random.PRNGKey(1),
                                       vocab_size=vocab, eos_id=eos_id)
    noise, spans, enc_len, dec_len = span_lengths(length, 0.15, 3.0)
    assert (noise, spans, enc_len, dec_len) == (6, 2, 36, 8)
    enc, tgt, w = np.asarray(inputs["encoder_tokens"]), np.asarray(targets), np.asarray(weights)
    dec_in, enc_mask = np.asarray(inputs["decoder_tokens"]), np.asarray(inputs["encoder_mask"])
    np.testing.assert_array_equal(dec_in[:, 1:], tgt[:, :-1])
    if eos_id is not None:
        assert enc.shape == (4, enc_len + 1) and tgt.shape == (4, dec_len + 1)
        assert np.all(enc[:, -1] == eos_id) and np.all(tgt[:, -1] == eos_id)
        assert np.all(enc_mask[:, -1] == 1) and np.all(w[:, -1] == 1)
        enc, tgt, w, enc_mask = enc[:, :-1], tgt[:, :-1], w[:, :-1], enc_mask[:, :-1]
    assert enc.shape == (4, enc_len) and tgt.shape == (4, dec_len)
    sentinels = set(range(vocab - spans, vocab))
    for r in range(4):
        assert [t for t in tgt[r] if t in sentinels] == [vocab - 1 - i for i in range(spans)]
        assert [t for t in enc[r] if t in sentinels] == [vocab - 1 - i for i in range(spans)]
        parts, cur = {}, None
        for t in tgt[r]:
            cur = t if t in sentinels else cur
            parts.setdefault(cur, []).extend([] if t in sentinels else [t])
        rebuilt = [x for t in enc[r] for x in (parts[t] if t in sentinels else [t])]
        np.testing.assert_array_equal(rebuilt, rows[r])
        assert sum(len(v) for v in parts.values()) == noise
    assert np.all(dec_in[:, 0] == 0)
    pads = (tgt == 0) & ~np.isin(tgt, list(sentinels))
    assert np.all(w[pads] == 0) and np.all(w[~pads] == 1)
    enc_pad = (enc == 0)
    assert np.all(enc_mask[enc_pad] == 0) and enc_pad[3].any()
    other, _, _ = corrupt({"inputs": jnp.asarray(rows)}, jax.random.PRNGKey(2), vocab_size=vocab, eos_id=eos_id)
    assert not np.array_equal(np.asarray(other["encoder_tokens"]), np.asarray(inputs["encoder_tokens"]))


def test_span_corruption_training_and_config_errors(tmp_path, data_dir):
    """The train loop runs the encoder-decoder on span corruption; a vocabulary without
    room for the sentinels, or an unknown objective, is refused in one line."""
    from conftest import tiny_config
    from routezoo.training import config_check
    from routezoo.training.metrics import read_metrics
    from routezoo.training.train import train_and_evaluate

    over = {"model.name": "encoder_decoder", "model.mlp_type": "relu", "model.num_kv_heads": 2,
            "model.seq2seq_objective": "span_corruption", "train.steps": 2, "train.eval_every": 2,
            "checkpoint.every": 2}
    c = tiny_config(data_dir, **over)
    with pytest.raises(config_check.ConfigError, match=r"no room for the 2 span sentinels .* allowed: >= 260"):
        config_check.validate(c, num_devices=8, process_count=1)
    c.model.vocab_size = 272
    config_check.validate(c, num_devices=8, process_count=1)
    train_and_evaluate(c, str(tmp_path / "run"))
    rows = read_metrics(str(tmp_path / "run"))
    assert [r for r in rows if "loss" in r] and np.isfinite([r for r in rows if "eval_loss" in r][-1]["eval_loss"])
    c.model.seq2seq_objective = "bart"
    with pytest.raises(config_check.ConfigError, match="unknown model.seq2seq_objective 'bart'; allowed: prefix_lm, span_corruption"):
        config_check.validate(c, num_devices=8, process_count=1)
