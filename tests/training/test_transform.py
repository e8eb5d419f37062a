"""``routezoo transform``: the framework (training/transform/__init__.py) end to end on a tiny
MoE run: the new workdir reads and trains as any run, the source is never touched, and every
refusal is one line, exit 2, with nothing written."""

import hashlib
import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from routezoo.training import cli
from routezoo.training import transform as T
from routezoo.training.train import train_and_evaluate

MOE = {"model.ffn": "moe", "model.moe.num_experts": 4, "model.moe.k": 2, "train.steps": 2,
       "model.scale_tied_logits": False, "checkpoint.every": 2, "train.eval_steps": 1}


def _digest(directory):
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(directory)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(path.encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def moe_run(data_dir, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("moe_src"))
    train_and_evaluate(tiny_config(data_dir, **MOE), wd)
    return wd


@pytest.fixture(scope="module")
def dense_run(data_dir, tmp_path_factory):
    """A dense model's workdir: its config (refused before any checkpoint is read)."""
    wd = str(tmp_path_factory.mktemp("dense_src"))
    os.makedirs(os.path.join(wd, "checkpoints"))
    with open(os.path.join(wd, "config.json"), "w") as f:
        f.write(tiny_config(data_dir).to_json_best_effort())
    return wd


@pytest.fixture()
def copy_transform():
    """A transform registered for the test: the source unchanged, with one calibration
    batch's shape, an evaluation and a routing count in its report."""
    seen = {}

    def copy(source, opts, ctx):
        seen["source"] = source
        batch = ctx.batches(1)[0]
        stats = ctx.routing_stats(source.config, source.params, source.model_state, 1, batches=[batch])
        report = {"batch_shape": list(batch["inputs"].shape), "scale": opts["scale"],
                  "eval": ctx.evaluate(source.config, source.params, source.model_state),
                  "load": stats["load"]}
        return T.TransformResult(source.copy_config(), source.params, source.model_state, report)

    T.register("test_copy", options={"scale": 1.0, "flag": False}, needs_moe=True, summary="test")(copy)
    yield seen
    del T.TRANSFORMS["test_copy"]


def _params_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


def test_identity_transform_writes_a_workdir_that_reads_and_trains(moe_run, tmp_path, capsys, copy_transform):
    from routezoo.training.workdir import load_trained
    before = _digest(moe_run)
    out = str(tmp_path / "out")
    assert cli.main(["transform", "test_copy", "--from", moe_run, "--workdir", out,
                     "--config.transform.scale=0.5", "--config.train.eval_steps=1"]) == 0
    assert _digest(moe_run) == before                         # the source is only read
    record = json.load(open(os.path.join(out, T.TRANSFORM_JSON)))
    assert record["transform"] == "test_copy" and record["options"] == {"scale": 0.5, "flag": False}
    assert record["source"] == {"path": os.path.abspath(moe_run), "kind": "workdir", "step": 2}
    assert record["report"]["batch_shape"] == [16, 32]
    assert np.sum(record["report"]["load"]) == 2 * 2 * 16 * 32   # layers x k x tokens (no padding here)
    assert np.isfinite(record["report"]["eval"]["eval_loss"])
    assert record["overrides"] == {"train.eval_steps": "1"}

    _, _, src_state = load_trained(moe_run)
    cfg, _, state = load_trained(out)
    assert int(state.step) == 0 and cfg.train.eval_steps == 1
    assert _params_equal(state.params, src_state.params)     # bit for bit, back in the scanned layout
    assert _params_equal(state.model_state, src_state.model_state)

    # analyze and convert --to-hf read it; train --workdir OUT (no --config) fine-tunes it from step 0
    assert cli.main(["analyze", "--workdir", out, "--steps", "1"]) == 0
    assert cli.main(["convert", "--workdir", out, "--to-hf", str(tmp_path / "hf")]) == 0
    assert cli.main(["train", "--workdir", out, "--config.train.steps=1", "--config.train.eval_steps=1"]) == 0
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in lines] == [0, 1]
    capsys.readouterr()


def test_source_from_a_hugging_face_directory(moe_run, tmp_path, copy_transform):
    """An exported checkpoint in, the same weights out (the HF import's layout)."""
    from routezoo.training.workdir import load_trained
    hf_dir = str(tmp_path / "hf")
    assert cli.main(["convert", "--workdir", moe_run, "--to-hf", hf_dir]) == 0
    out = str(tmp_path / "out")
    T.run_transform("test_copy", hf_dir, out, overrides={"train.eval_steps": "1"}, log=lambda *_: None)
    src = copy_transform["source"]
    assert src.kind == "hf" and src.step == 0
    _, _, state = load_trained(out)
    _, _, src_state = load_trained(moe_run)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(src_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0)


@pytest.mark.parametrize("args, needle", [
    (["nope"], "unknown transform 'nope'"),
    (["test_copy", "--config.transform.nope=1"], "has no option 'nope'"),
    (["test_copy", "--config.transform.scale=abc"], "is not a float"),
    (["test_copy", "--config.transform.flag=maybe"], "is not a boolean"),
    (["test_copy", "--config.model.d_model=8"], "cannot be overridden"),
    (["test_copy", "--config.train.nokey=1"], "unknown config key"),
])
def test_refusals_are_one_line_and_write_nothing(moe_run, tmp_path, capsys, copy_transform, args, needle):
    out = str(tmp_path / "out")
    name, *flags = args
    assert cli.main(["transform", name, "--from", moe_run, "--workdir", out, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not os.path.exists(out)


def test_refuses_a_dense_source_a_full_output_and_a_missing_source(dense_run, moe_run, tmp_path, capsys,
                                                                    copy_transform):
    out = str(tmp_path / "out")
    assert cli.main(["transform", "test_copy", "--from", dense_run, "--workdir", out]) == 2
    err = capsys.readouterr().err.strip()
    assert "dense" in err and len(err.splitlines()) == 1 and not os.path.exists(out)

    os.makedirs(out)
    open(os.path.join(out, "x"), "w").close()
    assert cli.main(["transform", "test_copy", "--from", moe_run, "--workdir", out]) == 2
    assert "is not empty" in capsys.readouterr().err and os.listdir(out) == ["x"]

    assert cli.main(["transform", "test_copy", "--from", str(tmp_path / "missing"),
                     "--workdir", str(tmp_path / "o2")]) == 2
    assert "is not a directory" in capsys.readouterr().err and not os.path.exists(tmp_path / "o2")

    assert cli.main(["transform", "test_copy", "--from", moe_run, "--workdir", os.path.join(moe_run, "sub")]) == 2
    assert "inside the source" in capsys.readouterr().err


def test_usage_lists_registered_transforms(capsys, copy_transform):
    assert cli.main(["transform", "--help"]) == 0
    assert "test_copy" in capsys.readouterr().out


def test_finetune_moves_only_what_the_mask_lets_move(moe_run, copy_transform):
    source = T.load_source(moe_run, log=lambda *_: None)
    ctx = T.Context(source, log=lambda *_: None)
    batches = ctx.batches(1)
    mask = jax.tree_util.tree_map_with_path(
        lambda path, x: float("layer0" in jax.tree_util.keystr(path) and "router" in jax.tree_util.keystr(path)),
        source.params)
    params, _, losses = ctx.finetune(source.config, source.params, source.model_state, 2, update_mask=mask,
                                     batches=batches)
    moved = {jax.tree_util.keystr(p) for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                                                           jax.tree.leaves(source.params))
             if np.asarray(a).tobytes() != np.asarray(b).tobytes()}
    assert moved == {"['layer0']['moe']['router']['kernel']"} and np.isfinite(losses[0])


# ------------------------------------------------------------------------ place


def _brute_force(pairs, load, devices, balance):
    import itertools
    from routezoo.training.transform import place as P
    m, e = load.shape
    rows = [r for r in itertools.product(range(devices), repeat=e)
            if all(np.bincount(r, minlength=devices) == e // devices)]
    return min(P.objective(np.asarray(c), pairs, load, devices, balance) for c in itertools.product(rows, repeat=m))


def test_place_solvers_on_hand_made_affinities():
    from routezoo.training.transform import place as P
    # 2 layers, 4 experts, 2 devices: expert i of layer 0 sends everything to expert pi(i) of layer 1
    pairs = np.zeros((1, 4, 4), np.int64)
    for i, j in [(0, 0), (1, 2), (2, 1), (3, 3)]:
        pairs[0, i, j] = 10
    load = np.full((2, 4), 10)
    current = np.tile(P.devices_of_slots(4, 2), (2, 1))
    assert P.cross_fraction(current, pairs) == 0.5           # experts 1 and 2 sit apart from their successors
    for dev in (P.solve(pairs, load, 2), P.solve_exact(pairs, load, 2)):
        assert P.cross_fraction(dev, pairs) == 0.0 and list(P.imbalance(dev, load, 2)) == [1.0, 1.0]
    rng = np.random.default_rng(0)
    for _ in range(6):   # the exact solver is the optimum; the greedy one never worse than staying put
        pairs, load = rng.integers(0, 10, (2, 4, 4)), rng.integers(1, 20, (3, 4))
        for balance in (0.0, 0.1):
            best = _brute_force(pairs, load, 2, balance)
            assert P.objective(P.solve_exact(pairs, load, 2, balance=balance), pairs, load, 2, balance) == \
                pytest.approx(best, abs=1e-12)
        pairs, load = rng.integers(0, 20, (3, 8, 8)), rng.integers(1, 50, (4, 8))
        current = np.tile(P.devices_of_slots(8, 4), (4, 1))
        dev = P.solve(pairs, load, 4)
        assert P.objective(dev, pairs, load, 4, 0.1) <= P.objective(current, pairs, load, 4, 0.1)
        assert P.cross_fraction(dev, pairs) <= P.cross_fraction(current, pairs) + 0.1 * 3  # J mixes in balance
        for row in dev:
            slots = P.slots_of(row, 4)
            assert sorted(slots) == list(range(8)) and all(row == slots // 2)


def test_ragged_exchange_rows_count_copies_by_sender_and_receiver():
    from routezoo.layers.moe.exchange import ragged_exchange_rows
    rng = np.random.default_rng(0)
    experts = rng.integers(0, 8, (4, 40))                    # 4 shards, 40 copies each, 8 experts on 4 shards
    counts = np.stack([np.bincount(r, minlength=8) for r in experts])
    rows = ragged_exchange_rows(counts, 4)
    for s in range(4):
        for r in range(4):
            assert rows[s, r] == np.sum(experts[s] // 2 == r)


def test_place_permutes_experts_and_keeps_the_outputs(moe_run, tmp_path):
    from routezoo.layers.moe.block import layer_expert_maps
    out = str(tmp_path / "placed")
    record = T.run_transform("place", moe_run, out, {"devices": "2", "calibration_batches": "1"},
                             log=lambda *_: None)
    rep = record["report"]
    assert rep["objective_after"] <= rep["objective_before"] + 1e-12
    assert rep["after"]["cross_device_fraction"] <= rep["before"]["cross_device_fraction"] + 0.1
    assert sum(rep["before"]["ragged_exchange"]["rows_total"]) == 2 * 2 * rep["tokens"]   # layers x k x tokens
    src = T.load_source(moe_run, log=lambda *_: None)
    new = T.load_source(out, log=lambda *_: None)
    maps = layer_expert_maps(new.config.model.moe, 2)
    for layer, m in zip(new.moe_layers, maps):
        assert sorted(m) == [0, 1, 2, 3]                      # a permutation per layer
        for name, w in src.params[f"layer{layer}"]["moe"]["experts"].items():
            got = np.asarray(new.params[f"layer{layer}"]["moe"]["experts"][name])
            assert got[list(m)].tobytes() == np.asarray(w).tobytes()
    ctx = T.Context(src, log=lambda *_: None)
    inputs = ctx.batches(1)[0]["inputs"][:4]
    want, _ = ctx.apply(src.config, src.params, src.model_state, inputs)
    got, _ = ctx.apply(new.config, new.params, new.model_state, inputs)
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()   # same rows, same weights: bit for bit


def test_place_with_the_identity_placement_is_the_source(moe_run, tmp_path, capsys):
    from routezoo.training.workdir import load_trained
    out = str(tmp_path / "same")
    assert cli.main(["transform", "place", "--from", moe_run, "--workdir", out, "--config.transform.devices=2",
                     "--config.transform.solver=identity", "--config.transform.calibration_batches=1"]) == 0
    rep = json.load(open(os.path.join(out, T.TRANSFORM_JSON)))["report"]
    assert rep["before"] == rep["after"] and rep["expert_map"] == ""
    cfg, _, state = load_trained(out)
    src_cfg, _, src_state = load_trained(moe_run)
    assert cfg.model.to_dict() == src_cfg.model.to_dict() and _params_equal(state.params, src_state.params)
    assert cli.main(["transform", "place", "--from", moe_run, "--workdir", str(tmp_path / "o3"),
                     "--config.transform.devices=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not divide model.moe.num_experts=4" in err and len(err.splitlines()) == 1
