"""Soft MoE (``layers/moe/soft.py``) and the masked-token encoder (``zoo/encoder.py``).

Soft MoE against a dense numpy reference, its weights' normalisation, permutation
equivariance, no mixing across sequences, an ``expert=4`` mesh; the decoder refuses
``router='soft'``; the encoder is bidirectional, masks BERT-style and trains, resumes and
runs expert-parallel through the one training loop.

Shapes are small: B=4 (8 on the mesh), L=8, D=16, F=16, E=4. Parameters come from
``jax.eval_shape`` of the init filled with random numbers (no init compile); forward
passes are jitted (one compile each, cheaper than eager op-by-op here).
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import functools  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402

from conftest import tiny_config  # noqa: E402
from routezoo.configs import base  # noqa: E402
from routezoo.layers import moe as moe_lib  # noqa: E402
from routezoo.layers import sharding  # noqa: E402
from routezoo.layers.moe import soft as soft_moe  # noqa: E402

B, L, D, F, E = 4, 8, 16, 16, 4
TOL = dict(rtol=1e-5, atol=1e-5)


def make_cfg(**overrides):
    cfg = base.get_config().model.moe
    cfg.update(dict(router="soft", num_experts=E, expert_dim=F))
    cfg.update(overrides)
    return cfg


def make_x(seed=0, shape=(B, L, D)):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def random_params(abstract, seed=0, std=0.3):
    """Random float32 arrays shaped like ``abstract`` (unboxed ``eval_shape`` output)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, std, a.shape), jnp.float32), abstract)


def build(**overrides):
    """(model, boxed abstract variables, params) of a SoftMoE block; the router scale is
    2.5 (not its init 1, so the test sees where it enters)."""
    model = moe_lib.moe_from_config(make_cfg(**overrides), d_model=D, dtype=jnp.float32, param_dtype=jnp.float32)
    assert isinstance(model, soft_moe.SoftMoE)
    boxed = jax.eval_shape(functools.partial(model.init, deterministic=True), jax.random.PRNGKey(1), make_x())
    params = random_params(nn.unbox(boxed)["params"])
    if "scale" in params["router"]:
        params["router"]["scale"] = jnp.asarray(2.5, jnp.float32)
    return model, boxed, params


_JITTED = {}


def apply(model, params, x):
    """Jitted deterministic forward, compiled once per model (and input shape)."""
    if id(model) not in _JITTED:
        _JITTED[id(model)] = (model, jax.jit(functools.partial(model.apply, deterministic=True)))
    return _JITTED[id(model)][1]({"params": params}, x)


def reference(params, x, *, group_size, normalize, expert_type):
    """Soft MoE written out in float64 numpy: per group, logits X Phi, softmax over tokens
    (dispatch) and over slots (combine), slots = dispatch^T X, one expert MLP per expert
    on its slots, y = combine · slot outputs."""
    x = np.asarray(x, np.float64)
    b, l, d = x.shape
    m = group_size or l
    phi = np.asarray(params["router"]["phi"], np.float64)  # [D, E, S]
    e, s = phi.shape[1], phi.shape[2]
    w = {k: np.asarray(v, np.float64) for k, v in params["experts"].items()}
    groups = x.reshape(-1, m, d)
    out = np.zeros_like(groups)
    for gi, xg in enumerate(groups):                        # xg [M, D]
        xr, pr = xg, phi.reshape(d, e * s)
        if normalize:
            xr = xg / np.sqrt((xg ** 2).sum(-1, keepdims=True) + 1e-6)
            pr = pr / np.sqrt((pr ** 2).sum(0, keepdims=True) + 1e-6) * float(params["router"]["scale"])
        logits = xr @ pr                                     # [M, E·S]
        ex = np.exp(logits - logits.max())
        dispatch = ex / ex.sum(axis=0, keepdims=True)        # each slot: convex mix of tokens
        combine = ex / ex.sum(axis=1, keepdims=True)         # each token: convex mix of slots
        slots = dispatch.T @ xg                              # [E·S, D]
        slot_out = np.zeros_like(slots)
        for j in range(e):
            h = slots[j * s:(j + 1) * s]
            a = h @ w["wi"][j]
            if expert_type == "swiglu":
                gate = h @ w["wi_gate"][j]
                act = gate / (1 + np.exp(-gate)) * a
            else:
                act = np.asarray(jax.nn.gelu(jnp.asarray(a, jnp.float32)), np.float64)
            slot_out[j * s:(j + 1) * s] = act @ w["wo"][j]
        out[gi] = combine @ slot_out
    return out.reshape(b, l, d)


# ------------------------------------------------------------------ the layer


@pytest.mark.parametrize("group_size,normalize,expert_type,slots,want_s", [
    (0, True, "swiglu", 0, 2),     # one group per sequence, S = round(8 / 4) = 2
    (0, False, "gelu", 3, 3),      # plain X Phi logits, S given
    (16, True, "swiglu", 0, 4),    # two sequences per group: S = round(16 / 4) = 4
])
def test_soft_moe_matches_dense_reference(group_size, normalize, expert_type, slots, want_s):
    model, _, params = build(group_size=group_size, soft_normalize=normalize, expert_type=expert_type,
                             soft_slots_per_expert=slots)
    assert params["router"]["phi"].shape == (D, E, want_s)
    x = make_x()
    y, aux = apply(model, params, x)
    assert aux["losses"] == {}
    np.testing.assert_allclose(y, reference(params, x, group_size=group_size, normalize=normalize,
                                            expert_type=expert_type), **TOL)


def test_router_jitter_only_in_training():
    model, _, params = build(jitter=0.5)
    x = make_x()
    y, _ = apply(model, params, x)
    np.testing.assert_allclose(y, reference(params, x, group_size=0, normalize=True, expert_type="swiglu"), **TOL)
    y_train, _ = jax.jit(functools.partial(model.apply, deterministic=False))(
        {"params": params}, x, rngs={"dropout": jax.random.PRNGKey(3)})
    assert not np.allclose(y_train, y, atol=1e-4)           # jitter only in training


def test_dispatch_and_combine_weights_are_convex_and_stats():
    model, _, params = build()
    _, state = jax.jit(functools.partial(
        model.apply, deterministic=True, mutable=["intermediates"],
        capture_intermediates=lambda mdl, name: isinstance(mdl, soft_moe.SoftRouter)))({"params": params}, make_x())
    routing = state["intermediates"]["router"]["__call__"][0]
    dispatch, combine = np.asarray(routing.dispatch), np.asarray(routing.combine)
    assert dispatch.shape == combine.shape == (B, L, E, 2)  # [G, M, E, S]
    assert dispatch.min() > 0 and combine.min() > 0
    np.testing.assert_allclose(dispatch.sum(axis=1), 1.0, rtol=1e-5)        # each slot, over tokens
    np.testing.assert_allclose(combine.sum(axis=(2, 3)), 1.0, rtol=1e-5)    # each token, over slots
    st = routing.stats
    np.testing.assert_allclose(st["load"], combine.sum(axis=3).mean(axis=(0, 1)), rtol=1e-5)
    assert st["load"].shape == (E,) and float(st["load"].sum()) == pytest.approx(1.0, abs=1e-5)
    assert 0 < float(st["dispatch_entropy"]) <= np.log(L) + 1e-5
    assert 0 < float(st["combine_entropy"]) <= np.log(E * 2) + 1e-5
    assert float(st["dispatch_max"]) == pytest.approx(dispatch.max(axis=1).mean(), rel=1e-5)
    assert float(st["slot_load_max"]) == pytest.approx(combine.mean(axis=(0, 1)).max() * E * 2, rel=1e-5)
    assert float(st["slot_load_max"]) > 1.0


def test_permutation_equivariance_and_no_mixing_across_sequences():
    model, _, params = build()
    x = make_x()
    y, _ = apply(model, params, x)
    perms = np.stack([np.random.default_rng(i).permutation(L) for i in range(B)])   # one per sequence
    take = lambda a: jnp.take_along_axis(a, jnp.asarray(perms)[:, :, None], axis=1)
    y_perm, _ = apply(model, params, take(x))
    np.testing.assert_allclose(y_perm, take(y), **TOL)        # permuting tokens permutes outputs

    x2 = x.at[1].set(make_x(9)[1])                          # another sequence 1
    y2, _ = apply(model, params, x2)
    np.testing.assert_allclose(y2[0], y[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y2[2:], y[2:], rtol=1e-6, atol=1e-6)
    assert not np.allclose(y2[1], y[1], atol=1e-3)


def test_expert_mesh_matches_single_device():
    """Forward and gradients jitted on a data=2 x expert=4 mesh (each device holds one
    expert) equal the unsharded ones."""
    model, boxed, params = build()
    x, cot = make_x(0, (8, L, D)), make_x(7, (8, L, D))

    def loss_and_grads(p, x):
        def loss(p, x):
            y, _ = model.apply({"params": p}, x, deterministic=True)
            return jnp.sum(y * cot), y
        (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x)
        return y, grads

    y_ref, g_ref = jax.jit(loss_and_grads)(params, x)   # no mesh: one device
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    rules = sharding.DEFAULT_RULES
    shard = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    p_s = jax.device_put(params, shard["params"])
    x_s = jax.device_put(x, sharding.logical_sharding(mesh, ("batch", "length", "act_embed"), rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = jax.jit(loss_and_grads).lower(p_s, x_s).compile()
        y, g = compiled(p_s, x_s)
    assert p_s["experts"]["wi"].addressable_shards[0].data.shape[0] == E // 4
    hlo = compiled.as_text()     # slots move to their expert's device; expert weights stay put
    assert "all-to-all" in hlo and "all-gather" not in hlo
    assert float(jnp.abs(y_ref).max()) > 0
    np.testing.assert_allclose(y, y_ref, **TOL)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(g[0]["router"]["phi"]).max()) > 0 and float(jnp.abs(g[0]["router"]["scale"])) > 0


# ------------------------------------------------------------------ configs and the encoder


def _moe_model_config(data_dir, name, **overrides):
    return tiny_config(data_dir, **{"model.name": name, "model.vocab_size": 259, "model.ffn": "moe",
                                    "model.moe.router": "soft", "model.moe.num_experts": 8, **overrides})


def test_decoder_refuses_soft_encoder_accepts_it(data_dir, tmp_path, capsys):
    from routezoo.training import cli, config_check
    with pytest.raises(config_check.ConfigError) as e:
        config_check.validate(_moe_model_config(data_dir, "decoder_lm"))
    msg = str(e.value)
    assert "\n" not in msg and "moe.router='soft'" in msg and "causal" in msg and "top_k" in msg
    config_check.validate(_moe_model_config(data_dir, "encoder_mlm"))
    config_check.validate(_moe_model_config(data_dir, "encoder_mlm", **{"model.moe.router": "expert_choice"}))
    with pytest.raises(config_check.ConfigError, match=r"^model.vocab_size 258 .* mask token .* allowed: >= 259$"):
        config_check.validate(_moe_model_config(data_dir, "encoder_mlm", **{"model.vocab_size": 258}))
    with pytest.raises(config_check.ConfigError, match="moe.num_shared_experts=1 is not supported"):
        config_check.validate(_moe_model_config(data_dir, "encoder_mlm", **{"model.moe.num_shared_experts": 1}))

    wd = tmp_path / "wd"                                     # the CLI: one line, exit code 2
    with pytest.raises(SystemExit) as e:
        sys.exit(cli.main(["train", "--workdir", str(wd), "--config.model.ffn=moe", "--config.model.moe.router=soft"]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "causal" in err, err
    assert not wd.exists()


def test_encoder_is_bidirectional_decoder_is_not(data_dir):
    """Same parameters (the encoder is the decoder with bidirectional attention): changing
    the last token changes the first position's logits in the encoder only."""
    from routezoo import zoo
    tokens = jax.random.randint(jax.random.PRNGKey(0), (1, 16), 2, 258)
    both = jnp.concatenate([tokens, tokens.at[:, -1].set(5)])    # [2, L]: original, last token changed
    dec, enc = (zoo.build(tiny_config(data_dir, **{"model.name": n, "model.vocab_size": 259}).model)
                for n in ("decoder_lm", "encoder_mlm"))
    assert dec.causal and not enc.causal
    variables = random_params(nn.unbox(jax.eval_shape(dec.init, jax.random.PRNGKey(1), both)))
    dec_logits, enc_logits = jax.jit(lambda v, t: (dec.apply(v, t)[0], enc.apply(v, t)[0]))(variables, both)
    np.testing.assert_allclose(dec_logits[0, :-1], dec_logits[1, :-1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(enc_logits[0, 0], enc_logits[1, 0], atol=1e-5)   # the first position sees the last


def test_masked_lm_batch_masks_valid_positions_bert_style():
    from routezoo.zoo.encoder import masked_lm_batch
    b, l, mask_id = 128, 128, 258
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 258, (b, l)).astype(np.int32)
    lengths = rng.integers(l // 2, l + 1, b)
    tokens[np.arange(l)[None, :] >= lengths[:, None]] = 0          # right padding (pad id 0)
    valid = tokens != 0
    mlm = jax.jit(functools.partial(masked_lm_batch, mask_rate=0.15, mask_id=mask_id))
    inputs, targets, weights = jax.device_get(mlm({"inputs": jnp.asarray(tokens)}, jax.random.PRNGKey(3)))
    np.testing.assert_array_equal(targets, tokens)                   # targets are the originals
    sel = weights > 0
    assert weights.dtype == np.float32 and set(np.unique(weights)) <= {0.0, 1.0}
    assert not sel[~valid].any()                                     # never a padding position
    assert sel.sum() / valid.sum() == pytest.approx(0.15, abs=0.015)
    np.testing.assert_array_equal(inputs[~sel], tokens[~sel])        # only selected ones change
    masked, changed = inputs[sel] == mask_id, inputs[sel] != tokens[sel]
    assert masked.mean() == pytest.approx(0.8, abs=0.03)
    assert (changed & ~masked).mean() == pytest.approx(0.1, abs=0.02)    # random ids
    assert (~changed).mean() == pytest.approx(0.1 + 0.1 / 256, abs=0.02)  # kept (or redrawn equal)
    assert inputs[sel & (inputs != mask_id)].min() >= 2 and inputs.max() <= mask_id
    again = jax.device_get(mlm({"inputs": jnp.asarray(tokens)}, jax.random.PRNGKey(3)))
    np.testing.assert_array_equal(again[0], inputs)                  # same key, same masks
    other = jax.device_get(mlm({"inputs": jnp.asarray(tokens)}, jax.random.PRNGKey(4)))
    assert not np.array_equal(other[2], weights)


def test_soft_moe_active_params(data_dir):
    from routezoo import zoo
    c = _moe_model_config(data_dir, "encoder_mlm", **{"model.moe.soft_slots_per_expert": 2})
    m = c.model
    v = jax.eval_shape(lambda: zoo.build(m).init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32)))
    total, active = zoo.count_params(v["params"], m, seq_len=32)
    expert = m.num_layers * m.moe.num_experts * 3 * m.d_model * m.moe.expert_dim
    assert total - active == expert - expert * 2 // 32        # E·S = 16 slots for 32 tokens


def test_encoder_soft_moe_trains_resumes_on_expert_mesh(data_dir, tmp_path):
    from routezoo.training import config_check
    from routezoo.training.metrics import read_metrics
    from routezoo.training.train import train_and_evaluate
    config = _moe_model_config(data_dir, "encoder_mlm", **{
        "mesh.data": 2, "mesh.expert": 4, "model.num_layers": 1, "train.steps": 8,
        "optimizer.learning_rate": 1e-2})
    config_check.validate(config)
    wd = str(tmp_path)
    train_and_evaluate(config, wd, stop_after=4)
    train_and_evaluate(config, wd)                         # restores step 4 and finishes
    records = read_metrics(wd)
    train = {r["step"]: r for r in records if "loss" in r}
    assert sorted(train) == list(range(1, 9))
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0], evals   # steps 0, 4, 8
    last = train[8]
    assert np.isfinite(last["loss"]) and last["loss"] == pytest.approx(last["ce"], rel=1e-6)  # no aux loss
    assert float(np.sum(last["moe/layer0/load"])) == pytest.approx(1.0, abs=1e-5)
    assert last["moe/layer0/slots_per_expert"] == 4.0          # round(32 tokens / 8 experts)
