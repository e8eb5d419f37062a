"""``routezoo convert --layout scanned|unscanned``: a workdir's checkpoint moved between the
scanned and unscanned layer layouts bit for bit (training/relayout.py), resuming as the
original does, and every refusal in one line with exit code 2."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import tiny_config
from routezoo.training import cli
from routezoo.training.train import train_and_evaluate
from routezoo.training.workdir import load_trained, read_workdir_config
from routezoo.zoo import stack

STEPS, FIRST = 6, 4   # trained to step 4 (the checkpoint converted), resumed to 6


@pytest.fixture(scope="module")
def scanned_run(data_dir, tmp_path_factory):
    """A tiny scanned run stopped at step 4 of 6 (its checkpoint: step 4)."""
    wd = str(tmp_path_factory.mktemp("relayout") / "scanned")
    train_and_evaluate(tiny_config(data_dir, **{"model.scan_layers": True, "train.steps": STEPS}), wd,
                       stop_after=FIRST)
    assert os.listdir(os.path.join(wd, "checkpoints")) == [str(FIRST)]
    return wd


@pytest.fixture(scope="module")
def unscanned_run(scanned_run, tmp_path_factory):
    """``scanned_run`` converted by ``routezoo convert --layout unscanned``."""
    out = str(tmp_path_factory.mktemp("relayout") / "unscanned")
    assert cli.main(["convert", "--workdir", scanned_run, "--layout", "unscanned", "--out", out]) == 0
    return out


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(jax.device_get(tree))


def assert_bit_equal(got, want, what):
    (got_leaves, got_def), (want_leaves, want_def) = _leaves(got), _leaves(want)
    assert got_def == want_def, what
    for (path, a), (_, b) in zip(got_leaves, want_leaves):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, (what, jax.tree_util.keystr(path))
        # bit for bit: the raw bytes, so -0.0 / NaN payloads count too
        assert a.tobytes() == b.tobytes(), (what, jax.tree_util.keystr(path))


def _files(step_dir, item):
    root = os.path.join(step_dir, item)
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root) for n in names}


def test_round_trip_is_bit_exact(scanned_run, unscanned_run, tmp_path):
    src_config, _, src = load_trained(scanned_run)
    dst_config, _, dst = load_trained(unscanned_run)
    # config.json: every key as it was, model.scan_layers flipped
    src_json, dst_json = (json.load(open(os.path.join(w, "config.json"))) for w in (scanned_run, unscanned_run))
    assert src_json["model"].pop("scan_layers") is True and dst_json["model"].pop("scan_layers") is False
    assert src_json == dst_json
    assert stack.is_scanned(src_config.model) and not stack.is_scanned(dst_config.model)
    assert "layers" in src.params and "layers" not in dst.params and "layer1" in dst.params

    # unscanned: every leaf the source's own leaf moved by to_unscanned, bit for bit
    for field in ("params", "opt_state", "model_state"):
        assert_bit_equal(getattr(dst, field), stack.to_unscanned(getattr(src, field), src_config.model), field)
    for field in ("step", "rng"):
        assert_bit_equal(getattr(dst, field), getattr(src, field), field)
    assert int(dst.step) == FIRST

    # the same step, the data iterator's position and the guard byte for byte, a valid manifest
    src_step, dst_step = (os.path.join(w, "checkpoints", str(FIRST)) for w in (scanned_run, unscanned_run))
    assert os.listdir(os.path.join(unscanned_run, "checkpoints")) == [str(FIRST)]
    for item in ("data", "guard"):
        assert _files(dst_step, item) == _files(src_step, item), item
    from routezoo.training.checkpoint import verify_manifest
    verify_manifest(dst_step)
    manifest = json.load(open(os.path.join(dst_step, "manifest.json")))["files"]
    assert any(name.startswith("state/") for name in manifest) and any(name.startswith("data/") for name in manifest)

    # and back: the original checkpoint's state, bit for bit
    back = str(tmp_path / "back")
    os.makedirs(back)   # an empty directory is fine
    assert cli.main(["convert", "--workdir", unscanned_run, "--layout", "scanned", "--out", back]) == 0
    back_config, _, again = load_trained(back)
    assert back_config.to_dict() == src_config.to_dict()
    assert_bit_equal(again, src, "state")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]   # no staging left behind


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if r["step"] > FIRST and "loss" in r}


def test_resume_from_converted_matches_original(scanned_run, unscanned_run, tmp_path):
    original, converted = str(tmp_path / "original"), str(tmp_path / "converted")
    shutil.copytree(scanned_run, original)
    shutil.copytree(unscanned_run, converted)
    out_original = train_and_evaluate(read_workdir_config(original), original)
    out_converted = train_and_evaluate(read_workdir_config(converted), converted)
    assert out_original["step"] == out_converted["step"] == STEPS
    want, got = _losses(original), _losses(converted)
    assert sorted(want) == sorted(got) == list(range(FIRST + 1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-5, atol=1e-5)
    # the eval after two updates: the two layouts compile to different programs (float sums in
    # another order), so the parameters the updates reach differ by rounding
    np.testing.assert_allclose(out_converted["eval_loss"], out_original["eval_loss"], rtol=1e-4)


def _random_checkpoint(config, workdir, step):
    """A workdir holding ``config`` and one checkpoint at ``step`` of a random train state
    (every float leaf random, no training: nothing compiles) and a guard item."""
    from flax import linen as nn

    from routezoo import zoo
    from routezoo.training.adapter_run import optimizer_for
    from routezoo.training.checkpoint import Checkpointer
    from routezoo.training.state import mesh_and_rules, state_shardings

    _config_only_workdir(workdir, config)
    mesh, rules = mesh_and_rules(config)
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract, shardings, _ = state_shardings(zoo.build(config.model), optimizer_for(config)[0], config, mesh, rules)
        values = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype)
                              if np.issubdtype(a.dtype, np.floating) else np.full(a.shape, step, a.dtype), abstract)
        checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False, verify=True)
        checkpointer.save(step, jax.device_put(values, shardings), None,
                          extra={"skipped": 1, "loss_mean": 2.5, "count": step})
        checkpointer.close()
    return values


def test_leading_layer_moe_and_model_state(data_dir, tmp_path):
    """A leading unscanned layer (``layer0``) before two scanned MoE layers whose router keeps
    a bias in ``model_state`` (``router_state``): each part in its place, bit for bit, both ways."""
    from routezoo.training import relayout

    config = tiny_config(data_dir, **{"model.scan_layers": True, "model.num_layers": 3, "model.ffn": "mlp,moe,moe",
                                      "model.moe.num_experts": 4, "model.moe.bias_update_rate": 1e-3})
    layout, = stack.stack_layouts(config.model).values()
    assert (layout.prefix, layout.unit, layout.repeats) == (1, ("moe",), 2)
    src, dst, back = (str(tmp_path / n) for n in ("src", "dst", "back"))
    values = _random_checkpoint(config, src, 3)
    assert jax.tree.leaves(values.model_state)   # the router's bias, stacked [R, E]

    assert relayout.convert_layout(src, dst, scanned=False, log=lambda *_: None) == 3
    _, _, got = load_trained(dst)
    assert set(got.params) >= {"layer0", "layer1", "layer2"} and "layers" not in got.params
    assert set(got.model_state["router_state"]) == {"layer1", "layer2"}
    want = values.replace(**{f: stack.to_unscanned(getattr(values, f), config.model)
                             for f in ("params", "opt_state", "model_state")})
    assert_bit_equal(got, want, "unscanned state")
    np.testing.assert_array_equal(got.params["layer2"]["moe"]["router"]["kernel"],
                                  values.params["layers"]["block0"]["moe"]["router"]["kernel"][1])

    assert relayout.convert_layout(dst, back, scanned=True, log=lambda *_: None) == 3
    _, _, again = load_trained(back)
    assert_bit_equal(again, values, "state after the round trip")
    with open(os.path.join(back, "checkpoints", "3", "guard", "metadata")) as f:
        assert json.load(f) == {"skipped": 1, "loss_mean": 2.5, "count": 3}


# ------------------------------------------------------------------------ refusals


def _convert_fails(capsys, argv, needle, out=None):
    """``routezoo convert ARGV`` exits 2 with one stderr line containing ``needle``; ``out``
    (the --out directory) is left as it was."""
    before = sorted(os.listdir(out)) if out and os.path.isdir(out) else None
    existed = bool(out) and os.path.exists(out)
    capsys.readouterr()
    try:
        code = cli.main(["convert", *argv])
    except SystemExit as e:   # a flag argparse refuses
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("routezoo: error: convert:") and needle in err, err
    if out:
        assert os.path.exists(out) == existed, out
        if before is not None:
            assert sorted(os.listdir(out)) == before
    return err


def _config_only_workdir(path, config):
    """A workdir holding only ``config.json`` (the checks before any checkpoint is read)."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    return str(path)


def test_refuses_a_destination_that_is_not_empty(scanned_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _convert_fails(capsys, ["--workdir", scanned_run, "--layout", "unscanned", "--out", str(out)],
                   "is not empty; convert never overwrites", str(out))
    assert (out / "keep.txt").read_text() == "mine"
    _convert_fails(capsys, ["--workdir", scanned_run, "--layout", "unscanned", "--out", str(out / "keep.txt")],
                   "exists and is not a directory", str(out / "keep.txt"))


def test_refuses_what_is_not_a_workdir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "out")
    _convert_fails(capsys, ["--workdir", str(tmp_path / "empty"), "--layout", "unscanned", "--out", out],
                   "not a routezoo training workdir", out)
    _convert_fails(capsys, ["--workdir", str(tmp_path / "missing"), "--layout", "unscanned", "--out", out],
                   "is not a directory", out)


def test_refuses_a_workdir_without_an_intact_checkpoint(data_dir, scanned_run, tmp_path, capsys):
    out = str(tmp_path / "out")
    bare = _config_only_workdir(tmp_path / "bare", tiny_config(data_dir, **{"model.scan_layers": True}))
    _convert_fails(capsys, ["--workdir", bare, "--layout", "unscanned", "--out", out], "no checkpoint in", out)
    broken = str(tmp_path / "broken")
    shutil.copytree(scanned_run, broken)
    state_dir = os.path.join(broken, "checkpoints", str(FIRST), "state")
    victim = max((os.path.join(d, n) for d, _, names in os.walk(state_dir) for n in names), key=os.path.getsize)
    with open(victim, "r+b") as f:   # a damaged file: its manifest no longer matches
        f.truncate(os.path.getsize(victim) // 2)
    _convert_fails(capsys, ["--workdir", broken, "--layout", "unscanned", "--out", out], "no intact checkpoint", out)


def test_refuses_an_adapter_run(data_dir, tmp_path, capsys):
    src = _config_only_workdir(tmp_path / "adapter", tiny_config(data_dir, **{"adapter.method": "lora",
                                                                              "model.scan_layers": False}))
    out = str(tmp_path / "out")
    for layout in ("scanned", "unscanned"):
        _convert_fails(capsys, ["--workdir", src, "--layout", layout, "--out", out],
                       "adapter runs always run unscanned", out)


def test_refuses_a_model_that_cannot_be_scanned(data_dir, tmp_path, capsys):
    # Read-ME's pre-gate routes every layer from outside the stack: never scanned
    src = _config_only_workdir(tmp_path / "pregate", tiny_config(data_dir, **{
        "model.ffn": "moe", "model.moe.router": "pregate", "model.scan_layers": True}))
    out = str(tmp_path / "out")
    for layout in ("scanned", "unscanned"):
        _convert_fails(capsys, ["--workdir", src, "--layout", layout, "--out", out], "cannot be scanned", out)
    one = _config_only_workdir(tmp_path / "one_layer", tiny_config(data_dir, **{"model.num_layers": 1}))
    _convert_fails(capsys, ["--workdir", one, "--layout", "scanned", "--out", out], "cannot be scanned", out)


def test_refuses_the_layout_it_already_has(data_dir, scanned_run, tmp_path, capsys):
    out = str(tmp_path / "out")
    _convert_fails(capsys, ["--workdir", scanned_run, "--layout", "scanned", "--out", out],
                   "is already scanned", out)
    src = _config_only_workdir(tmp_path / "unscanned", tiny_config(data_dir, **{"model.scan_layers": False}))
    _convert_fails(capsys, ["--workdir", src, "--layout", "unscanned", "--out", out], "is already unscanned", out)


@pytest.mark.parametrize("argv, needle", [
    (["--layout", "sideways", "--out", "OUT"], "invalid choice: 'sideways' (choose from 'scanned', 'unscanned')"),
    (["--layout", "unscanned"], "--layout scanned|unscanned and --out NEW_DIR go together"),
    (["--to-hf", "HF", "--layout", "unscanned", "--out", "OUT"], "give exactly one of"),
])
def test_bad_flags_one_line(scanned_run, tmp_path, capsys, argv, needle):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    _convert_fails(capsys, ["--workdir", scanned_run, *argv], needle, str(tmp_path / "out"))


def test_usage_names_the_layout_mode(capsys):
    assert cli.main(["convert", "--help"]) == 0
    assert "--layout scanned|unscanned --out NEW_DIR" in capsys.readouterr().out
