"""``routezoo sample --workdir DIR --prompt TEXT``: text from a trained decoder LM.

``DIR`` is a training run (its newest intact checkpoint through ``workdir.load_trained``:
also a workdir written by ``routezoo transform``/``merge``/``convert --layout``, and an
adapter run with its adapter merged in), or a Hugging Face checkpoint directory or one
written by ``routezoo convert --from-hf`` (``zoo.hf.from_hf``). The prompt is encoded with
the run's own tokenizer (``data.tokenizer``) or the checkpoint's ``tokenizer.json``, or
given as token ids (``--prompt-ids``), continued with :func:`routezoo.zoo.sampling.sample`
(the key/value cache where the model has one), and each continuation is printed, cut at
the first end-of-document token (with ``--prompt-ids``: the generated ids, uncut). Greedy
at ``--temperature 0``; the same ``--seed`` draws the same text.

For a training run the prompt is preceded by the tokenizer's end-of-document token, as
every document after the first one is in training (``data.packing``); a Hugging Face
tokenizer adds its own beginning-of-sequence token instead. ``--doc-start`` /
``--no-doc-start`` override either default.

Refused in one line, exit code 2: a directory that holds neither a trained run (or no
intact checkpoint) nor a checkpoint, a model that is not a decoder LM (the encoder and the
encoder-decoder have no sampler), a text prompt for a checkpoint without a tokenizer, token
ids outside the vocabulary, a prompt plus ``--num-tokens`` longer than the model's
``model.max_len``, and flags out of range.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

USAGE = """usage: routezoo sample --workdir DIR [--prompt TEXT | --prompt-file FILE | --prompt-ids 1,2,3]
                       [--num-tokens 128] [--temperature 0.8] [--top-k 0] [--num-samples 1] [--seed 0]
                       [--step N] [--doc-start | --no-doc-start]

  Text from a trained decoder LM. DIR: a training run (its newest intact checkpoint, or
  --step N; the run's tokenizer), or a Hugging Face checkpoint or converted directory (its
  tokenizer.json). --num-samples continuations of the prompt of --num-tokens tokens each,
  printed one per block, cut at the first end-of-document token; with --prompt-ids (token
  ids, for a checkpoint without a tokenizer) the generated ids, uncut.
  --temperature 0 is greedy; --top-k K samples among the K most likely tokens.
  --doc-start / --no-doc-start: put the end-of-document token before the prompt (default:
  yes for a training run, no for a Hugging Face checkpoint, whose tokenizer adds its own
  beginning-of-sequence token).
"""


def _fail(message: str) -> int:
    print(f"routezoo: error: sample: {message}", file=sys.stderr)
    return 2


def parse(argv: list[str]) -> argparse.Namespace:
    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise SystemExit(_fail(f"{message}; run 'routezoo sample --help'"))

    p = _Parser(prog="routezoo sample", add_help=False)
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompt-file", dest="prompt_file", default=None)
    p.add_argument("--prompt-ids", dest="prompt_ids", default=None)
    p.add_argument("--num-tokens", dest="num_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", dest="top_k", type=int, default=0)
    p.add_argument("--num-samples", dest="num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--doc-start", dest="doc_start", action=argparse.BooleanOptionalAction, default=None)
    a = p.parse_args(argv)
    if sum(x is not None for x in (a.prompt, a.prompt_file, a.prompt_ids)) > 1:
        raise SystemExit(_fail("give only one of --prompt TEXT, --prompt-file FILE, --prompt-ids 1,2,3"))
    if a.prompt_ids is not None:
        try:
            a.prompt_ids = [int(t) for t in a.prompt_ids.replace(" ", ",").split(",") if t]
        except ValueError:
            raise SystemExit(_fail(f"--prompt-ids takes comma-separated integers, got {a.prompt_ids!r}")) from None
    for name, low in (("num_tokens", 1), ("num_samples", 1), ("top_k", 0)):
        if getattr(a, name) < low:
            raise SystemExit(_fail(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(a, name)}"))
    if a.temperature < 0:
        raise SystemExit(_fail(f"--temperature must be 0 (greedy) or positive, got {a.temperature}"))
    return a


def _is_checkpoint_dir(path: str) -> bool:
    """A Hugging Face checkpoint (its ``config.json`` names a ``model_type``) or a directory
    of ``routezoo convert --from-hf`` (``hf_config.json`` beside routezoo's ``config.json``)."""
    import json
    import os

    from routezoo.zoo.hf import HF_CONFIG, RZ_HF_CONFIG

    if os.path.isfile(os.path.join(path, RZ_HF_CONFIG)):
        return True
    try:
        with open(os.path.join(path, HF_CONFIG)) as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return False


def load(workdir: str, step: int | None = None, log=print):
    """``(model, variables, tokenizer or None, is_run)`` of ``workdir``: a training run, or a
    Hugging Face checkpoint or converted directory."""
    import os

    from routezoo.training.data.tokenizers import get_tokenizer, hf_tokenizer_file, load_hf_tokenizer
    from routezoo.training.workdir import load_trained

    if not _is_checkpoint_dir(workdir):
        if not os.path.isfile(os.path.join(workdir, "config.json")):
            raise FileNotFoundError(f"{workdir} has no config.json: neither a routezoo training workdir nor a "
                                    "Hugging Face checkpoint")
        config, model, state = load_trained(workdir, step=step, log=log)   # no intact checkpoint: ValueError
        return model, {"params": state.params, **state.model_state}, get_tokenizer(config.data), True
    if step is not None:
        raise ValueError(f"--step is for training runs; {workdir} is a checkpoint directory")
    from routezoo.zoo import hf
    model, params = hf.from_hf(workdir)
    tok = load_hf_tokenizer(workdir) if hf_tokenizer_file(workdir) is not None else None
    return model, {"params": params}, tok, False


def generate(workdir: str, prompt: str | list[int], *, num_tokens: int, temperature: float, top_k: int = 0,
             num_samples: int = 1, seed: int = 0, step: int | None = None, doc_start: bool | None = None,
             log=print) -> list:
    """``num_samples`` continuations of ``prompt`` by the model in ``workdir``: texts cut at
    their first end-of-document token, or, for a ``prompt`` of token ids, the generated ids
    (uncut). ``ValueError`` for a model without a sampler, a text prompt without a
    tokenizer, or a prompt that does not fit ``model.max_len``; ``FileNotFoundError`` for a
    directory that holds neither a run nor a checkpoint."""
    import jax
    import jax.numpy as jnp

    from routezoo.zoo.sampling import sample

    model, variables, tok, is_run = load(workdir, step, log)
    if not getattr(model, "causal", False) or not hasattr(model, "cfg"):
        raise ValueError(f"{workdir} holds a {type(model).__name__}; the sampler continues decoder LMs "
                         "(model.name=decoder_lm) only")
    as_ids = not isinstance(prompt, str)
    if as_ids:
        ids = [int(i) for i in prompt]
    elif tok is None:
        raise ValueError(f"{workdir} has no tokenizer.json; give the prompt as token ids (--prompt-ids 1,2,3)")
    else:
        ids = [int(i) for i in tok.encode(prompt)]
    if (is_run if doc_start is None else doc_start):
        if tok is None:
            raise ValueError("--doc-start needs the end-of-document id of a tokenizer, and this checkpoint has none")
        ids = [int(tok.eos_id)] + ids
    vocab = int(model.cfg.vocab_size)
    if not ids:
        raise ValueError("the prompt is empty and no document-start token precedes it; give a prompt or "
                         "--doc-start")
    if min(ids) < 0 or max(ids) >= vocab:
        raise ValueError(f"prompt token ids must be in [0, {vocab}) (model.vocab_size), got {min(ids)}..{max(ids)}")
    max_len = int(model.cfg.max_len)
    if len(ids) + num_tokens > max_len:
        raise ValueError(f"prompt ({len(ids)} tokens) + --num-tokens {num_tokens} = {len(ids) + num_tokens} "
                         f"exceeds model.max_len {max_len}")
    prompt_ids = jnp.asarray(np.tile(np.asarray(ids, np.int32), (num_samples, 1)))
    out = np.asarray(jax.device_get(sample(model, variables, prompt_ids, jax.random.key(seed),
                                           num_tokens=num_tokens, temperature=temperature, top_k=top_k)))
    new = out[:, len(ids):]
    if as_ids:
        return [row.tolist() for row in new]
    texts = []
    for row in new:
        ends = np.flatnonzero(row == int(tok.eos_id))
        texts.append(tok.decode(row[:ends[0]] if ends.size else row))
    return texts


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help", "-help") for a in argv):
        print(USAGE)
        return 0
    a = parse(argv)
    if a.prompt_file is not None:
        try:
            with open(a.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            return _fail(f"--prompt-file {a.prompt_file}: {e}")
    elif a.prompt_ids is not None:
        prompt = a.prompt_ids
    else:
        prompt = a.prompt or ""
    try:
        outs = generate(a.workdir, prompt, num_tokens=a.num_tokens, temperature=a.temperature, top_k=a.top_k,
                        num_samples=a.num_samples, seed=a.seed, step=a.step, doc_start=a.doc_start,
                        log=lambda m: print(m, file=sys.stderr))
    except (FileNotFoundError, ValueError) as e:
        return _fail(" ".join(str(e).split()))
    for i, out in enumerate(outs):
        if len(outs) > 1:
            print(f"--- sample {i}")
        print(" ".join(map(str, out)) if isinstance(out, list) else prompt + out)
    return 0
