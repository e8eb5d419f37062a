"""``routezoo sample`` on Hugging Face checkpoints: greedy tokens equal transformers'
``generate`` (float32, a tiny random Llama and Mixtral), from the checkpoint directory and
from its ``routezoo convert --from-hf`` copy; a text prompt without a tokenizer is refused."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from routezoo.training import cli
from test_hf import FAMILIES, tiny_causal_lm_factory

PROMPT = [1, 17, 42, 5, 88, 23]
N = 6


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny_causal_lm_factory(tmp_path_factory, {k: FAMILIES[k] for k in ("llama", "mixtral")})


def _sample(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        sys.exit(cli.main(["sample", *argv]))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_greedy_ids_equal_transformers_generate(family, hf_dir, tmp_path, capsys):
    import torch
    path, model = hf_dir(family)
    with torch.no_grad():
        want = model.generate(torch.tensor([PROMPT]), max_new_tokens=N, min_new_tokens=N, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    converted = str(tmp_path / "converted")
    assert cli.main(["convert", "--from-hf", path, "--workdir", converted]) == 0
    capsys.readouterr()
    for d in (path, converted):
        code, out, err = _sample(capsys, "--workdir", d, "--prompt-ids", ",".join(map(str, PROMPT)),
                                 "--num-tokens", str(N), "--temperature", "0")
        assert code == 0, err
        assert [int(t) for t in out.split()] == want


def test_text_prompt_without_a_tokenizer_is_refused(hf_dir, capsys):
    path, _ = hf_dir("llama")
    code, out, err = _sample(capsys, "--workdir", path, "--prompt", "hello")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "no tokenizer.json" in err and "--prompt-ids" in err, err
    code, _, err = _sample(capsys, "--workdir", path, "--prompt-ids", "1,500")
    assert code == 2 and "must be in [0, 96)" in err, err
