"""Composition of whole models (zoo/compose.py, training/compose.py): each router's selection
rule on hand-made cases, the composed score against the chosen member's (bit for bit) and a
merged-weights reference, generation, refusals in one line, and ``routezoo compose`` end to
end on tiny runs."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import per_layer_config, random_adapter
from routezoo import zoo
from routezoo.layers.adapters.lora import LoRA
from routezoo.training import cli
from routezoo.zoo import compose as C
from routezoo.zoo.lm import cross_entropy

# ------------------------------------------------------------------------ selection rules


def test_tryage_takes_the_lowest_predicted_loss_plus_weighted_cost():
    predicted = np.array([[1.0, 1.2, 0.9],
                          [2.0, 1.0, 3.0],
                          [0.5, 0.5, 0.5]])
    costs = np.array([1.0, 1.1, 2.0])
    np.testing.assert_array_equal(C.tryage_select(predicted, costs, 0.0), [2, 1, 0])   # tie: the lower index
    # weight 0.2: row 0 scores 1.2, 1.42, 1.3; row 1 2.2, 1.22, 3.4
    np.testing.assert_array_equal(C.tryage_select(predicted, costs, 0.2), [0, 1, 0])
    # a large weight makes cost decide: the cheapest member everywhere
    np.testing.assert_array_equal(C.tryage_select(predicted, costs, 100.0), [0, 0, 0])
    # against the definition on random values
    rng = np.random.default_rng(0)
    p, c = rng.random((50, 4)), rng.random(4)
    for w in (0.0, 0.3, 3.0):
        want = [min(range(4), key=lambda m: p[b, m] + w * c[m]) for b in range(50)]
        np.testing.assert_array_equal(C.tryage_select(p, c, w), want)
    with pytest.raises(ValueError, match=r"predicted losses \[B, M\] and costs \[M\]"):
        C.tryage_select(p, c[:3], 0.0)


def test_coe_table_is_the_best_member_per_category_and_the_classifier_picks_the_row():
    # 3 members, categories 0, 1 (and 2 without rows): per-sequence losses
    losses = np.array([[1.0, 2.0, 3.0],
                       [1.2, 2.0, 0.5],    # category 0 means: 1.1, 2.0, 1.75 -> member 0
                       [3.0, 1.0, 2.0],
                       [3.0, 1.5, 1.0]])   # category 1 means: 3.0, 1.25, 1.5 -> member 1
    table, fallback = C.coe_table(losses, [0, 0, 1, 1], 3)
    # overall means 2.05, 1.625, 1.625: the fallback is member 1 (the first of the tie)
    assert fallback == 1
    np.testing.assert_array_equal(table, [0, 1, 1])
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.34, 0.33, 0.33]])
    fixed = np.array([2, 0, 1])
    np.testing.assert_array_equal(C.coe_select(probs, fixed), [2, 0, 1, 2])
    # uncertain rows (entropy above 1.0 nats: only the near-uniform last row, ln 3 = 1.0986) go to the fallback
    np.testing.assert_array_equal(C.coe_select(probs, fixed, fallback=1, entropy_threshold=1.0), [2, 0, 1, 1])
    with pytest.raises(ValueError, match="needs a fallback"):
        C.coe_select(probs, fixed, entropy_threshold=1.0)


def test_retriever_takes_the_nearest_pilot_by_cosine():
    angle = np.deg2rad([0.0, 20.0, 90.0, 100.0, 180.0])
    pilots = np.stack([np.cos(angle), np.sin(angle)], 1) * np.array([[1.0], [5.0], [0.1], [2.0], [1.0]])
    member = np.array([0, 1, 1, 2, 0])
    q_angle = np.deg2rad([5.0, 14.0, 94.0, 96.0, 170.0, 270.0])
    queries = np.stack([np.cos(q_angle), np.sin(q_angle)], 1) * 3.0
    # nearest by angle, whatever the lengths: 5 -> 0, 14 -> 20, 94 -> 90, 96 -> 100, 170 -> 180;
    # 270 is 90 degrees from both 0 and 180 (both member 0)
    np.testing.assert_array_equal(C.retriever_select(queries, pilots, member), [0, 1, 1, 2, 0, 0])
    # per-member means: member 1's mean of a long 20-degree and a short 90-degree pilot points near 20 degrees,
    # so a 94-degree query now goes to member 2 (100 degrees)
    np.testing.assert_array_equal(C.retriever_select(queries, pilots, member, pool="mean")[2], 2)
    with pytest.raises(ValueError, match="retriever pool 'max'"):
        C.retriever_select(queries, pilots, member, pool="max")


def test_unknown_router_names_are_refused():
    assert C.check_router_names(["tryage", " coe "]) == ["tryage", "coe"]
    with pytest.raises(ValueError, match="unknown router 'best'; allowed: oracle, tryage, coe, retriever"):
        C.check_router_names(["tryage", "best"])


# ------------------------------------------------------------------------ a library in memory


def _model(d_model=32, vocab=258):
    c = per_layer_config("", **{"model.d_model": d_model, "model.vocab_size": vocab})
    return c, zoo.build(c.model)


def _params(model, seed):
    return nn.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32)))


@pytest.fixture(scope="module")
def library():
    """Engine 0: a base and two LoRAs of different ranks and targets (slots 0, 1, 2);
    engine 1: another full model of the same architecture (member 3)."""
    _, model = _model()
    base = _params(model, 0)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    loras = []
    for i, (targets, rank) in enumerate((("attn/(q|v)|mlp/wo", 2), ("attn/(k|o)|mlp/wi", 3))):
        lora = LoRA(targets=targets, rank=rank, alpha=4.0)
        loras.append((f"lora{i}", random_adapter(lora, boxed, seed=i + 1), lora))
    lib = C.Library.from_lora(model, base, loras, base_name="base", seq_len=16)
    other = _params(model, 7)
    lib = C.Library([*lib.engines, C.Engine(model, other)],
                    [*lib.members, C.Member("other", 1, 0, C.forward_flops_per_token(model, 16))],
                    token_bytes=np.r_[np.zeros(2), np.ones(256)])
    return {"lib": lib, "model": model, "base": base, "loras": loras, "other": other}


def _batch(rng, b=6, length=16):
    r = rng.integers(2, 258, (b, length + 1)).astype(np.int32)
    w = np.ones((b, length), np.float32)
    w[0, -3:] = 0.0   # a row with padding at the end
    return {"inputs": r[:, :-1], "targets": r[:, 1:], "weights": w}


def test_composed_score_equals_the_chosen_members_score(library):
    lib, model = library["lib"], library["model"]
    batch = _batch(np.random.default_rng(0))
    every = lib.member_scores(batch)
    assert every["nll"].shape == (6, 4)
    for choice in ([0, 1, 2, 3, 2, 1], [3, 3, 1, 1, 0, 2], [2] * 6):
        got = lib.score(batch, np.array(choice))
        rows = np.arange(6)
        assert got["nll"].tobytes() == every["nll"][rows, choice].tobytes()   # bit for bit
        np.testing.assert_array_equal(got["loss"], every["loss"][rows, choice])
        np.testing.assert_array_equal(got["tokens"], batch["weights"].sum(1))
        np.testing.assert_array_equal(got["bytes"], batch["weights"].sum(1))   # one byte per byte token
    # the reference: each member as a plain model (a LoRA merged into its base's weights)
    refs = [library["base"]["params"]] + [lora.merge(library["base"]["params"], p) for _, p, lora in library["loras"]]
    refs.append(library["other"]["params"])
    for m, params in enumerate(refs):
        logits, _ = model.apply({"params": params}, jnp.asarray(batch["inputs"]))
        nll, _ = cross_entropy(logits, jnp.asarray(batch["targets"]), jnp.asarray(batch["weights"]))
        np.testing.assert_allclose(every["nll"][:, m], np.asarray(nll.sum(-1)), rtol=2e-5)
    assert len({tuple(np.round(every["nll"][:, m], 3)) for m in range(4)}) == 4   # four different models
    with pytest.raises(ValueError, match="choice 4 out of range; the library has members 0..3"):
        lib.score(batch, np.array([0, 1, 2, 3, 4, 0]))


def test_generation_is_the_chosen_members(library):
    lib = library["lib"]
    prompt = np.random.default_rng(1).integers(2, 258, (4, 5)).astype(np.int32)
    choice = np.array([1, 3, 0, 2])
    for temperature in (0.0, 1.0):
        got = lib.generate(prompt, choice, jax.random.PRNGKey(3), num_tokens=4, temperature=temperature)
        assert got.shape == (4, 9)
        np.testing.assert_array_equal(got[:, :5], prompt)
        for m in range(4):
            alone = lib.generate(prompt, np.full(4, m), jax.random.PRNGKey(3), num_tokens=4, temperature=temperature)
            np.testing.assert_array_equal(got[choice == m], alone[choice == m])


def test_member_costs_count_the_lora_factors(library):
    lib, model = library["lib"], library["model"]
    base = C.forward_flops_per_token(model, 16)
    for m, (_, p, _) in zip(lib.members[1:3], library["loras"]):
        entries = sum(x.size for x in jax.tree.leaves(p))
        assert m.flops_per_token == base + 2 * entries
    np.testing.assert_allclose(lib.relative_costs(), lib.flops / base)


def test_routers_choose_by_their_rules(library):
    """The router classes end to end on a small encoder: heads whose weights are zero give
    fixed predictions, so the choices must be the rules' on those; the retriever's pilots
    are the features of known prompts; the oracle is the lowest true loss."""
    lib = library["lib"]
    c, enc_model = _model(d_model=16, vocab=259)
    enc = C.PromptEncoder(enc_model, _params(enc_model, 5), prefix=4)
    rng = np.random.default_rng(2)
    batch = _batch(rng)   # the shapes of the tests above: their compiled member forwards are reused
    b, d = 6, 16
    fixed = np.array([0.3, -0.2, 0.1, 0.5], np.float32)
    tryage = C.Tryage(enc, {"w": np.zeros((d, 4), np.float32), "b": fixed}, 2.0, 0.5, np.array([1.0, 1.2, 1.4, 1.0]))
    np.testing.assert_allclose(tryage.predicted_losses(batch), np.broadcast_to(2.0 + 0.5 * fixed, (b, 4)), rtol=1e-6)
    for w in (0.0, 0.5, 2.0):
        tryage.cost_weight = w
        np.testing.assert_array_equal(tryage.choose(lib, batch),
                                      C.tryage_select(np.broadcast_to(2.0 + 0.5 * fixed, (b, 4)), tryage.costs, w))
    coe = C.CoE(enc, {"w": np.zeros((d, 2), np.float32), "b": np.array([0.0, 1.0], np.float32)}, np.array([3, 2]),
                ("a", "b"), fallback=0)
    np.testing.assert_array_equal(coe.choose(lib, batch), [2] * b)
    coe.entropy_threshold = 0.5    # softmax([0, 1]) has entropy 0.58 nats: every row falls back
    np.testing.assert_array_equal(coe.choose(lib, batch), [0] * b)
    pilots = enc.features(batch)
    retriever = C.Retriever(enc, pilots, np.array([3, 1, 2, 0, 1, 3]))
    np.testing.assert_array_equal(retriever.choose(lib, batch), [3, 1, 2, 0, 1, 3])
    oracle = C.Oracle()
    np.testing.assert_array_equal(oracle.choose(lib, batch), np.argmin(lib.member_scores(batch)["nll"], 1))
    composed = C.Composed(lib, retriever)
    got = composed.score(batch)
    np.testing.assert_array_equal(got["nll"], lib.member_scores(batch)["nll"][np.arange(b), [3, 1, 2, 0, 1, 3]])
    prompt = batch["inputs"][:4, :5]
    tokens, choice = composed.generate(prompt, jax.random.PRNGKey(0), num_tokens=4)
    np.testing.assert_array_equal(choice, [3, 1, 2, 0])   # each prompt's own pilot
    np.testing.assert_array_equal(tokens, lib.generate(prompt, choice, jax.random.PRNGKey(0), num_tokens=4))
    with pytest.raises(ValueError, match="router 'oracle' reads the sequence's targets"):
        C.Composed(lib, oracle).generate(prompt, jax.random.PRNGKey(0), num_tokens=4)
    # the prompt is only the first `prefix` tokens: changing the rest changes no choice
    other = dict(batch, inputs=np.concatenate([batch["inputs"][:, :4], batch["inputs"][::-1, 4:]], 1))
    np.testing.assert_array_equal(retriever.choose(lib, other), retriever.choose(lib, batch))
    assert retriever.flops_per_prompt(lib, 16) == enc.flops_per_prompt() + 2 * b * d
    assert oracle.flops_per_prompt(lib, 16) == lib.flops.sum() * 16


def test_a_library_of_two_vocabularies_is_refused(library):
    _, small = _model(vocab=300)
    with pytest.raises(ValueError, match="library members disagree in vocabulary: vocab_size base: 258, "
                                         "lora0: 258, lora1: 258, other: 258, wide: 300"):
        C.Library([*library["lib"].engines, C.Engine(small, _params(small, 0))],
                  [*library["lib"].members, C.Member("wide", 2, 0, 1.0)])


# ------------------------------------------------------------------------ routezoo compose on runs


def _config_only(path, config):
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    return str(path)


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """A tiny base (random weights at step 0), another full model, and two LoRA runs on the
    base (random adapters; data.tasks email and importlib), written as runs write them."""
    from routezoo.layers import adapters as adapter_lib
    from routezoo.training.adapter_run import adapter_config, save_adapter
    from routezoo.training.state import init_variables
    from routezoo.training.workdir import write_step0_workdir

    root = tmp_path_factory.mktemp("compose")
    config = per_layer_config(data_dir, **{"data.seq_len": 32})
    model = zoo.build(config.model)
    variables = nn.unbox(jax.jit(init_variables(model, config))(jax.random.PRNGKey(0)))
    params = jax.device_get(variables["params"])
    out = {"root": root, "config": config}
    for name, p in (("base", params), ("full", jax.tree.map(lambda x: x * 1.1, params))):
        out[name] = str(root / name)
        write_step0_workdir(out[name], config, p, {}, jax.random.PRNGKey(0), record_name="made.json", record={})
    boxed = jax.eval_shape(init_variables(model, config), jax.random.PRNGKey(0))["params"]
    for i, task in enumerate(("email", "importlib")):
        c = per_layer_config(data_dir, **{"data.seq_len": 32, "init.from_workdir": out["base"], "data.tasks": task,
                                          "adapter.method": "lora", "adapter.rank": 2 + i,
                                          "adapter.targets": "attn/(q|v)|mlp/wo"})
        wd = _config_only(root / f"lora_{task}", c)
        method = adapter_lib.from_config(adapter_config(c))
        meta = {"method": "lora", "adapter": adapter_config(c).to_dict(), "base_fingerprint": adapter_lib.fingerprint(
            params)}
        save_adapter(os.path.join(wd, "adapter"), random_adapter(method, boxed, seed=i + 1, scale=0.5), meta, 1)
        out[task] = wd
    return out


def _compose(capsys, *argv):
    capsys.readouterr()
    code = cli.main(["compose", *argv])
    got = capsys.readouterr()
    return code, got.out, got.err


SMALL = ["--rows", "8", "--prefix", "8", "--steps", "2", "--encoder-steps", "2", "--batch", "8"]


def test_train_router_and_eval_end_to_end(runs, tmp_path, capsys):
    from routezoo.training import compose as T

    library = ",".join(runs[k] for k in ("base", "email", "importlib", "full"))
    out = str(tmp_path / "routers")
    code, stdout, err = _compose(capsys, "train-router", "--library", library, "--workdir", out,
                                 "--routers", "tryage,coe,retriever,oracle", "--cost-weight", "0.1", *SMALL)
    assert code == 0, err
    record = json.load(open(os.path.join(out, "compose.json")))
    assert record["domains"] == ["email", "importlib"]   # from the LoRA runs' data.tasks
    assert [m["engine"] for m in record["members"]] == [0, 0, 0, 1]   # base and its LoRAs share one engine
    assert [m["slot"] for m in record["members"]] == [0, 1, 2, 0]
    assert record["routers"]["coe"]["categories"] == ["email", "importlib"]
    assert sorted(os.listdir(os.path.join(out, "routers"))) == ["coe.npz", "retriever.npz", "tryage.npz"]
    assert "library: 4 members in 2 engine(s)" in stdout

    code, stdout, err = _compose(capsys, "eval", "--workdir", out, "--cost-weights", "0,1000")
    assert code == 0, err
    res = json.load(open(os.path.join(out, "eval.json")))
    assert set(res["routers"]) == {"tryage", "coe", "retriever", "oracle"}
    bpbs = [m["bpb"] for m in res["members"]]
    assert res["best_single"]["bpb"] == min(bpbs) and np.isclose(res["uniform"]["bpb"], np.mean(bpbs))
    for name, r in res["routers"].items():
        assert res["routers"]["oracle"]["bpb"] <= r["bpb"] + 1e-9, name
        assert sum(r["choices"]) == res["rows"] and r["router_flops_per_prompt"] > 0
    assert res["routers"]["oracle"]["agreement_with_oracle"] == 1.0
    # at a cost weight of 1000 nats per unit of relative cost tryage takes a cheapest member only
    cheapest = np.flatnonzero(np.isclose([m["flops_per_token"] for m in res["members"]],
                                         min(m["flops_per_token"] for m in res["members"])))
    heavy = res["tryage_cost_weight"][1]
    assert heavy["cost_weight"] == 1000 and sum(heavy["choices"][i] for i in cheapest) == res["rows"]
    assert "best single member" in stdout

    # the saved routers read back: each router's bits per byte is its choices' member scores
    record, lib, _, routers = T.load_routers(out)
    _, ev = T.domain_data(runs["config"], record["domains"], 8, 32, 8)
    scores = T.member_scores(lib, ev, 8)
    for name, router in routers.items():
        choice = np.concatenate([router.choose(lib, part)[:k] for _, k, part in T.chunks(ev, 8)])
        want = scores["nll"][np.arange(len(choice)), choice].sum() / np.log(2) / scores["bytes"].sum()
        np.testing.assert_allclose(res["routers"][name]["bpb"], want, rtol=1e-6)
        assert res["routers"][name]["choices"] == np.bincount(choice, minlength=4).tolist()


def _refused(capsys, argv, needle, out):
    before = sorted(os.listdir(out)) if os.path.isdir(out) else None
    code, _, err = _compose(capsys, *argv)
    err = err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("routezoo: error: compose:") and needle in err, err
    assert (sorted(os.listdir(out)) if os.path.isdir(out) else None) == before


def test_refusals(runs, data_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    good = f"{runs['base']},{runs['email']}"
    train = ["train-router", "--workdir", out, *SMALL]
    _refused(capsys, [*train, "--library", good, "--routers", "tryage,best"],
             "unknown router 'best'; allowed: oracle, tryage, coe, retriever", out)
    wide = _config_only(tmp_path / "wide", per_layer_config(data_dir, **{"model.vocab_size": 300}))
    _refused(capsys, [*train, "--library", f"{good},{wide}"],
             f"library members disagree in vocabulary: {runs['base']} (vocab_size 258, byte tokenizer)", out)
    spm = _config_only(tmp_path / "spm", per_layer_config(data_dir, **{"data.tokenizer": "sentencepiece"}))
    _refused(capsys, [*train, "--library", f"{good},{spm}"], "sentencepiece tokenizer", out)
    _refused(capsys, [*train, "--library", runs["base"]], "a composition needs at least two members", out)
    _refused(capsys, [*train, "--library", f"{good},{runs['base']}"], "more than once", out)
    _refused(capsys, [*train, "--library", good, "--domains", "email,nosuchpackage"],
             "--domains: unknown task(s) 'nosuchpackage' in data.tasks", out)
    _refused(capsys, [*train, "--library", f"{runs['base']},{runs['full']}"], "no domains: the members have no "
             "data.tasks", out)
    _refused(capsys, [*train, "--library", f"{good},{tmp_path / 'missing'}"], "is not a directory", out)
    (tmp_path / "empty").mkdir()
    _refused(capsys, [*train, "--library", f"{good},{tmp_path / 'empty'}"], "not a routezoo training workdir", out)
    broken = str(tmp_path / "broken")
    shutil.copytree(runs["full"], broken)
    state_dir = os.path.join(broken, "checkpoints", "0", "state")
    victim = max((os.path.join(d, n) for d, _, names in os.walk(state_dir) for n in names), key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    _refused(capsys, [*train, "--library", f"{good},{broken}"], "no intact checkpoint", out)
    adapterless = str(tmp_path / "adapterless")
    shutil.copytree(runs["email"], adapterless)
    shutil.rmtree(os.path.join(adapterless, "adapter"))
    _refused(capsys, [*train, "--library", f"{runs['base']},{adapterless}"], "LoRA run without a readable adapter",
             out)
    serving = _config_only(tmp_path / "serving", per_layer_config(data_dir, **{
        "adapter.method": "multi_lora", "adapter.targets": ".*", "init.from_workdir": runs["base"]}))
    _refused(capsys, [*train, "--library", f"{good},{serving}"], "adapter.method='multi_lora' acts on activations",
             out)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    _refused(capsys, ["train-router", "--workdir", str(taken), "--library", good],
             "is not empty; compose never overwrites", str(taken))
    _refused(capsys, ["eval", "--workdir", str(tmp_path / "empty")], "not a directory written by", out)
    _refused(capsys, ["route", "--workdir", out], "unknown command 'route'; allowed: train-router, eval", out)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]   # no staging left
