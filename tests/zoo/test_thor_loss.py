"""THOR's two-pass training loss through the zoo LM (``ThorRouter.model_losses``, the second
pass run by ``DecoderLM``) at the authors' settings (Zuo et al. 2022): 2 experts in every
other layer, one draw per batch, ``α = 2.5`` with both passes' cross-entropy. The loss terms
equal the formula computed by hand from two explicit forward passes with the same RNGs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from routezoo import zoo
from routezoo.training import config_check
from routezoo.zoo.lm import ffn_kinds

B, L, ALPHA = 4, 16, 2.5


def thor_config(**overrides):
    return tiny_config("/tmp/unused", **{
        "model.ffn": "moe", "model.moe.every": 2, "model.num_layers": 4, "model.moe.router": "thor",
        "model.moe.num_experts": 2, "model.moe.k": 1, "model.moe.thor_train_level": "batch",
        "model.moe.thor_consistency_coef": ALPHA, "model.moe.thor_ce_both": True, **overrides})


@functools.lru_cache(maxsize=None)
def setup():
    tokens = jax.random.randint(jax.random.key(0), (B, L + 1), 2, 258)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    weights = jnp.ones((B, L), jnp.float32).at[0, -3:].set(0.0)   # three padded positions
    variables = jax.jit(zoo.build(thor_config().model).init)(jax.random.key(1), inputs)
    return inputs, targets, weights, variables


def rngs(seed):
    return {"router": jax.random.key(seed), "dropout": jax.random.key(100 + seed)}


def two_passes(seed):
    """The model without two-pass terms, called twice in one ``apply`` with the same RNGs."""
    inputs, _, _, variables = setup()
    plain = zoo.build(thor_config(**{"model.moe.thor_consistency_coef": 0.0,
                                     "model.moe.thor_ce_both": False}).model)
    twice = lambda m, x: (m(x, deterministic=False)[0], m(x, deterministic=False)[0])  # noqa: E731
    return jax.jit(lambda v: plain.apply(v, inputs, rngs=rngs(seed), method=twice))(variables)


def by_hand(l1, l2, targets, w):
    """``(CE1, CE2, symKL)`` in float64, means over tokens weighted by ``w``."""
    def logp(z):
        z = np.asarray(z, np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    lp1, lp2, t, w = logp(l1), logp(l2), np.asarray(targets), np.asarray(w, np.float64)
    mean = lambda v: (w * v).sum() / w.sum()  # noqa: E731
    ce = lambda lp: mean(-np.take_along_axis(lp, t[..., None], -1)[..., 0])  # noqa: E731
    sym_kl = 0.5 * ((np.exp(lp1) - np.exp(lp2)) * (lp1 - lp2)).sum(-1)
    return ce(lp1), ce(lp2), mean(sym_kl)


def test_authors_layout_validates():
    cfg = thor_config()
    config_check.validate(cfg)
    assert ffn_kinds(cfg.model) == ("mlp", "moe", "mlp", "moe")   # experts in every other layer
    assert ffn_kinds(thor_config(**{"model.ffn": "moe,mlp,moe,mlp"}).model) == ("moe", "mlp", "moe", "mlp")


@pytest.mark.parametrize("seed", [0, 1])
def test_loss_is_mean_of_both_cross_entropies_plus_alpha_sym_kl(seed):
    inputs, targets, w, variables = setup()
    model = zoo.build(thor_config().model)
    logits, aux = jax.jit(lambda v: model.apply(v, inputs, deterministic=False, targets=targets,
                                                loss_weights=w, rngs=rngs(seed)))(variables)
    l1, l2 = two_passes(seed)
    np.testing.assert_array_equal(logits, l1)          # the model returns the first pass
    assert float(jnp.abs(l1 - l2).max()) > 0.1         # the second pass drew other experts
    ce1, ce2, kl = by_hand(l1, l2, targets, w)
    losses = {k: float(v) for k, v in aux["losses"].items()}
    assert set(losses) == {"thor_consistency", "thor_ce_both"}
    np.testing.assert_allclose(losses["thor_consistency"], ALPHA * kl, rtol=1e-5)
    np.testing.assert_allclose(losses["thor_ce_both"], 0.5 * (ce2 - ce1), rtol=1e-4, atol=1e-6)
    # what the training step minimises: its cross-entropy (the first pass's) plus the terms
    np.testing.assert_allclose(ce1 + sum(losses.values()), 0.5 * (ce1 + ce2) + ALPHA * kl, rtol=1e-5)


def test_first_pass_only_by_default_and_nothing_in_evaluation():
    inputs, targets, w, variables = setup()
    model = zoo.build(thor_config(**{"model.moe.thor_ce_both": False}).model)
    _, aux = jax.jit(lambda v: model.apply(v, inputs, deterministic=False, targets=targets,
                                           loss_weights=w, rngs=rngs(0)))(variables)
    l1, l2 = two_passes(0)
    assert set(aux["losses"]) == {"thor_consistency"}   # the loop's cross-entropy is the first pass's
    np.testing.assert_allclose(aux["losses"]["thor_consistency"], ALPHA * by_hand(l1, l2, targets, w)[2], rtol=1e-5)
    model = zoo.build(thor_config().model)
    _, aux = model.apply(variables, inputs, deterministic=True, targets=targets, loss_weights=w)
    assert aux["losses"] == {}
    with pytest.raises(ValueError, match="moe.thor_ce_both=True needs the targets"):
        model.apply(variables, inputs, deterministic=False, rngs=rngs(0))
