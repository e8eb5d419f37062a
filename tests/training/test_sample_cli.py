"""``routezoo sample``: text from a trained run, against a plain greedy loop over the
uncached forward pass; draws; refusals in one line with exit code 2."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from routezoo.training import cli
from routezoo.training.data.tokenizers import ByteTokenizer
from routezoo.training.train import train_and_evaluate
from routezoo.training.workdir import load_trained

PROMPT = "def f(x):"
N = 8


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("sample_run"))
    train_and_evaluate(tiny_config(data_dir, **{"train.steps": 4}), wd)
    return wd


def _cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        sys.exit(cli.main(["sample", *argv]))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_greedy_text_equals_a_plain_greedy_loop(run, capsys):
    code, out, err = _cli(capsys, "--workdir", run, "--prompt", PROMPT, "--num-tokens", str(N), "--temperature", "0")
    assert code == 0, err
    # the reference: the uncached forward pass over the growing sequence, argmax each time
    _, model, state = load_trained(run)
    tok = ByteTokenizer()
    seq = np.asarray([[tok.eos_id, *tok.encode(PROMPT)]], np.int32)
    forward = jax.jit(lambda t: model.apply({"params": state.params, **state.model_state}, t,
                                            deterministic=True)[0])
    for _ in range(N):
        nxt = np.asarray(jnp.argmax(forward(jnp.asarray(seq))[:, -1], axis=-1), np.int32)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    new = seq[0, -N:]
    ends = np.flatnonzero(new == tok.eos_id)
    want = PROMPT + tok.decode(new[:ends[0]] if ends.size else new)
    assert out == want + "\n"


def test_draws_follow_the_seed(run, capsys):
    flags = ["--workdir", run, "--prompt", PROMPT, "--num-tokens", "16", "--temperature", "1.0",
             "--num-samples", "2"]
    code, a, err = _cli(capsys, *flags, "--seed", "3")
    assert code == 0, err
    _, b, _ = _cli(capsys, *flags, "--seed", "3")
    assert a == b                                    # the same seed: the same text
    blocks = a.split("--- sample ")[1:]
    assert len(blocks) == 2 and blocks[0][1:] != blocks[1][1:]   # two rows, two draws


@pytest.mark.parametrize("flags, needle", [
    (["--prompt", "x", "--num-tokens", "100000"], "exceeds model.max_len"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature must be 0 (greedy) or positive"),
    (["--prompt", "x", "--num-tokens", "0"], "--num-tokens must be at least 1"),
    (["--prompt", "x", "--prompt-file", "y"], "give only one of --prompt TEXT"),
    (["--prompt", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["--prompt-ids", "1,x"], "--prompt-ids takes comma-separated integers"),
    (["--prompt-ids", "1,999"], "prompt token ids must be in [0, 258)"),
])
def test_bad_flags_are_one_line_and_exit_2(run, capsys, flags, needle):
    code, out, err = _cli(capsys, "--workdir", run, *flags)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_not_a_run_is_refused(tmp_path, capsys):
    code, _, err = _cli(capsys, "--workdir", str(tmp_path / "nothing"), "--prompt", "x")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "neither a routezoo training workdir nor a Hugging Face" in err, err


def test_a_model_without_a_sampler_is_refused(monkeypatch, capsys):
    from routezoo import zoo
    from routezoo.configs import base
    from routezoo.training import generate

    m = base.get_config().model
    m.name = "encoder_mlm"
    encoder = zoo.build(m)
    monkeypatch.setattr(generate, "load", lambda *a, **k: (encoder, {}, ByteTokenizer(), True))
    code, out, err = _cli(capsys, "--workdir", "anything", "--prompt", "x")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "continues decoder LMs (model.name=decoder_lm) only" in err, err
