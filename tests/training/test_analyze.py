"""``routezoo analyze``: routing analytics of a trained MoE LM (tables, plots, summary)."""

import csv
import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import tiny_config
from routezoo.training import analyze, cli
from routezoo.training.train import train_and_evaluate

CAPACITY = {"model.ffn": "moe", "model.moe.num_experts": 4, "model.moe.k": 2, "model.moe.expert_dim": 32,
            "model.moe.dispatch": "capacity", "model.moe.capacity_factor": 0.5, "train.steps": 2}
E, K = 4, 2


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _float(x):
    return float("nan") if x == "" else float(x)


@pytest.fixture(scope="module")
def capacity_run(data_dir, tmp_path_factory):
    """A 2-step capacity MoE run (cf 0.5 in training, eval cf 2.0), analysed on 1 batch."""
    wd = str(tmp_path_factory.mktemp("capacity"))
    train_and_evaluate(tiny_config(data_dir, **CAPACITY), wd)
    assert cli.main(["analyze", "--workdir", wd, "--steps", "1", "--min-count", "2"]) == 0
    return wd


@pytest.fixture(scope="module")
def loaded(capacity_run):
    """(model, variables, inputs of the first eval batch) of the capacity run."""
    from routezoo.training import data
    from routezoo.training.train import load_trained

    config, model, state = load_trained(capacity_run)
    inputs = next(iter(data.eval_batches(config)))["inputs"]
    return model, {"params": state.params, **state.model_state}, inputs


def _out(wd, name):
    return os.path.join(wd, "analysis", name)


def test_files_and_summary(capacity_run):
    summary = json.load(open(_out(capacity_run, "summary.json")))
    for name in summary["files"]:
        assert os.path.getsize(_out(capacity_run, name)) > 0, name
    for name in ("load.png", "experts_per_token.png", "token_entropy.png", "drop_by_position.png",
                 "affinity_layer0_layer1.png", "token_specialisation_top.csv", "expert_top_tokens.csv"):
        assert name in summary["files"]
    assert summary["moe_layers"] == ["layer0", "layer1"] and summary["batches"] == 1
    assert summary["checkpoint_step"] == 2 and summary["tokens"] == 16 * 32
    assert summary["check_dropped_fraction_max_abs_diff"] < 1e-6
    for layer in summary["layers"].values():
        assert layer["experts_per_token"] == pytest.approx(K)
        assert 0 <= layer["token_mutual_information"] <= layer["expert_entropy"] + 1e-9
    top = _rows(_out(capacity_run, "token_specialisation_top.csv"))
    assert {r["kind"] for r in top} == {"most", "least"} and all(r["token"] for r in top)


def test_load_rows_sum_to_one_and_match_the_model_statistic(capacity_run, loaded):
    """The load table equals ``moe/layer{i}/load`` recomputed on the one analysed batch."""
    model, variables, inputs = loaded
    assert (inputs != 0).all()                                # no padding in this batch
    _, aux, routings = analyze.capture_routing(model, variables, inputs)
    load = {r["layer"]: r for r in _rows(_out(capacity_run, "load.csv"))}
    counts = {r["layer"]: r for r in _rows(_out(capacity_run, "load_counts.csv"))}
    assert sorted(routings) == [0, 1]
    for i, routing in routings.items():
        stat = np.asarray(aux["stats"][f"layer{i}/load"])
        got = np.array([int(counts[f"layer{i}"][f"expert_{j}"]) for j in range(E)])
        idx = np.asarray(routing.indices)
        np.testing.assert_array_equal(got, np.bincount(idx[idx >= 0], minlength=E))
        # the model's float32 counts / total, bit for bit
        np.testing.assert_array_equal(np.float32(got) / np.float32(got.sum()), stat)
        row = np.array([float(load[f"layer{i}"][f"expert_{j}"]) for j in range(E)])
        assert row.sum() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(row, stat, rtol=1e-6)


def test_recomputed_drops_match_the_dispatcher(loaded):
    """Dropped copies from ``capacity_slots`` match the MoE's own dropped_fraction in
    training mode (cf 0.5)."""
    from routezoo.layers.routers import expert_capacity

    model, variables, inputs = loaded
    rngs = {s: jax.random.key(1) for s in ("dropout", "jitter", "router")}
    _, aux, routings = analyze.capture_routing(model, variables, inputs, deterministic=False, rngs=rngs)
    c = expert_capacity(32, E, K, 0.5, 4)
    for i, r in routings.items():
        d = np.asarray(analyze.dropped_mask(r.indices, r.priority, num_experts=E, group_size=32, capacity=c))
        assert d.mean() == pytest.approx(float(aux["stats"][f"layer{i}/dropped_fraction"]), abs=1e-6)
        assert d.mean() >= 0.5 - 1e-6                            # 2·S copies, E·C = S slots


def test_drop_rate_by_position(capacity_run):
    rows = _rows(_out(capacity_run, "drop_by_position.csv"))
    by = {}
    for r in rows:
        by.setdefault(r["setting"], []).append(r)
    assert set(by) == {"eval", "train"}
    train = by["train"]
    assert {r["capacity_factor"] for r in train} == {"0.5"}
    assert len(train) == 2 * 32
    assert max(float(r["drop_rate"]) for r in train) > 0
    # capacity fills in sequence order, first choices first: position 0 keeps its first choice
    assert all(float(r["drop_rate"]) <= 0.5 for r in train if r["position"] == "0")
    assert all(float(r["drop_rate"]) == 0 for r in by["eval"])   # eval cf 2.0: C = S
    summary = json.load(open(_out(capacity_run, "summary.json")))
    drop = summary["layers"]["layer0"]["drop"]["train"]
    assert drop["second_half"] > drop["first_half"]


def test_experts_per_token_histogram(capacity_run):
    rows = _rows(_out(capacity_run, "experts_per_token.csv"))
    kinds = {(r["layer"], r["kind"]): r for r in rows}
    assert set(kinds) == {(f"layer{i}", k) for i in (0, 1) for k in ("routed", "kept@eval", "kept@train")}
    for (layer, kind), r in kinds.items():
        hist = [int(r[str(n)]) for n in range(K + 1)]
        assert sum(hist) == 16 * 32
        if kind != "kept@train":
            assert hist == [0, 0, 16 * 32]
    assert float(kinds[("layer0", "kept@train")]["mean"]) < K


def test_affinity_rows_are_distributions(capacity_run):
    rows = _rows(_out(capacity_run, "affinity.csv"))
    assert {(r["from_layer"], r["to_layer"]) for r in rows} == {("layer0", "layer1")}
    m = np.zeros((E, E))
    n = np.zeros((E, E), int)
    for r in rows:
        m[int(r["from_expert"]), int(r["to_expert"])] = _float(r["probability"])
        n[int(r["from_expert"]), int(r["to_expert"])] = int(r["count"])
    assert n.sum() == 16 * 32
    used = n.sum(1) > 0
    np.testing.assert_allclose(m[used].sum(1), 1.0, atol=1e-12)
    assert np.isnan(m[~used]).all()


def test_token_tables(capacity_run):
    spec = _rows(_out(capacity_run, "token_specialisation.csv"))
    assert sum(int(r["count"]) for r in spec) == 16 * 32
    for r in spec:
        for i in (0, 1):
            assert 0 <= float(r[f"layer{i}/entropy"]) <= np.log(E) + 1e-9
            if int(r["count"]) == 1:    # one token, two distinct experts: entropy log 2
                assert float(r[f"layer{i}/entropy"]) == pytest.approx(np.log(2))
    top = _rows(_out(capacity_run, "expert_top_tokens.csv"))
    assert top and all(1 <= int(r["rank"]) <= 10 for r in top)
    load = {r["layer"]: r for r in _rows(_out(capacity_run, "load_counts.csv"))}
    for r in top:   # shares are consistent with the load counts
        copies = int(load[r["layer"]][f"expert_{r['expert']}"])
        assert float(r["share_of_expert"]) == pytest.approx(int(r["count"]) / copies)


def test_dropless_has_no_drops(capacity_run, tmp_path):
    """The same weights with dropless dispatch (parameters are dispatch-independent)."""
    wd = str(tmp_path / "dropless")
    shutil.copytree(capacity_run, wd, ignore=shutil.ignore_patterns("analysis"))
    cfg = json.load(open(os.path.join(wd, "config.json")))
    cfg["model"]["moe"]["dispatch"] = "dropless"
    json.dump(cfg, open(os.path.join(wd, "config.json"), "w"))
    assert cli.main(["analyze", "--workdir", wd, "--steps", "1"]) == 0
    rows = _rows(os.path.join(wd, "analysis", "drop_by_position.csv"))
    assert {r["setting"] for r in rows} == {"dropless"}
    assert all(float(r["drop_rate"]) == 0 for r in rows)
    # same routing, so the same load table
    assert _rows(os.path.join(wd, "analysis", "load_counts.csv")) == _rows(_out(capacity_run, "load_counts.csv"))


def test_errors_are_one_line_exit_2(capacity_run, data_dir, tmp_path, capsys):
    def run(wd):
        code = cli.main(["analyze", "--workdir", str(wd)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        return err

    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    shutil.copy(os.path.join(capacity_run, "config.json"), no_ckpt)
    assert "no checkpoint" in run(no_ckpt) and str(no_ckpt) in run(no_ckpt)
    assert not (no_ckpt / "analysis").exists()

    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(tiny_config(data_dir).to_json())
    assert "no MoE layers" in run(dense)

    duo = tmp_path / "duo"
    duo.mkdir()
    (duo / "config.json").write_text(tiny_config(data_dir, **{"model.ffn": "moe", "model.moe.router": "duo"}).to_json())
    assert "moe.router='duo' (Duo-LLM) chooses big/small/skip" in run(duo)

    assert "not a routezoo training workdir" in run(tmp_path / "missing")
    assert cli.main(["analyze", "--workdir", capacity_run, "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_empty_slots_do_not_count():
    """Dynamic routers (top_p, null experts) leave -1 slots: not in load, histogram or top-1."""
    inputs = np.array([[5, 6, 0]])                                   # last token is padding
    idx = np.array([[[2, -1], [-1, 1], [3, 0]]])                      # [B=1, L=3, K=2]
    w = np.array([[[1.0, 0.0], [0.0, 0.7], [0.6, 0.4]]])
    nxt = np.array([[[-1, -1], [0, 3], [1, 2]]])
    wn = np.array([[[0.0, 0.0], [0.4, 0.6], [0.5, 0.5]]])
    acc = analyze.RoutingAccumulator([0, 1], E, 8, 3, ["dropless"], pad_id=0)
    nodrop = {"dropless": np.zeros((1, 3, 2), bool)}
    acc.add(inputs, {0: {"indices": idx, "weights": w, "dropped": nodrop, "dropped_fraction_diff": 0.0},
                     1: {"indices": nxt, "weights": wn, "dropped": nodrop, "dropped_fraction_diff": 0.0}})
    np.testing.assert_array_equal(acc.load, [[0, 1, 1, 0], [1, 0, 0, 1]])
    np.testing.assert_array_equal(acc.hist["routed"], [[0, 2, 0], [1, 0, 1]])
    np.testing.assert_array_equal(analyze.top1_expert(nxt, wn), [[-1, 3, 1]])
    assert acc.affinity[0].sum() == 1 and acc.affinity[0, 1, 3] == 1    # token 0 has no layer-1 expert
    assert acc.tokens == 2 and acc.token_count[5] == acc.token_count[6] == 1
