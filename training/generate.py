"""``routezoo sample --workdir DIR --prompt TEXT``: text from a trained decoder LM.

Loads the run's newest intact checkpoint (``workdir.load_trained``: a training run, or a
workdir written by ``routezoo transform``/``merge``/``convert --layout``; an adapter run
with its adapter merged in), encodes the prompt with the run's own tokenizer
(``data.tokenizer``), continues it with :func:`routezoo.zoo.sampling.sample` (the
key/value cache where the model has one) and prints each continuation, cut at the first
end-of-document token. Greedy at ``--temperature 0``; the same ``--seed`` draws the same
text.

The prompt is preceded by the tokenizer's end-of-document token, as every document after
the first one is in training (``data.packing``), unless ``--no-doc-start``.

Refused in one line, exit code 2: a directory that is not a trained run (no ``config.json``
or no intact checkpoint), a model that is not a decoder LM (the encoder and the
encoder-decoder have no sampler), a prompt plus ``--num-tokens`` longer than the model's
``model.max_len``, and flags out of range.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

USAGE = """usage: routezoo sample --workdir DIR [--prompt TEXT | --prompt-file FILE] [--num-tokens 128]
                       [--temperature 0.8] [--top-k 0] [--num-samples 1] [--seed 0] [--step N]
                       [--no-doc-start]

  Text from a trained decoder LM: DIR's newest intact checkpoint (or --step N), the run's
  tokenizer, --num-samples continuations of the prompt of --num-tokens tokens each, printed
  one per block, cut at the first end-of-document token.
  --temperature 0 is greedy; --top-k K samples among the K most likely tokens.
  --no-doc-start: the prompt without the end-of-document token that precedes it by default.
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
    p.add_argument("--num-tokens", dest="num_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", dest="top_k", type=int, default=0)
    p.add_argument("--num-samples", dest="num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--doc-start", dest="doc_start", action=argparse.BooleanOptionalAction, default=True)
    a = p.parse_args(argv)
    if a.prompt is not None and a.prompt_file is not None:
        raise SystemExit(_fail("give --prompt TEXT or --prompt-file FILE, not both"))
    for name, low in (("num_tokens", 1), ("num_samples", 1), ("top_k", 0)):
        if getattr(a, name) < low:
            raise SystemExit(_fail(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(a, name)}"))
    if a.temperature < 0:
        raise SystemExit(_fail(f"--temperature must be 0 (greedy) or positive, got {a.temperature}"))
    return a


def generate(workdir: str, prompt: str, *, num_tokens: int, temperature: float, top_k: int = 0,
             num_samples: int = 1, seed: int = 0, step: int | None = None, doc_start: bool = True,
             log=print) -> list[str]:
    """``num_samples`` continuations of ``prompt`` by the trained run in ``workdir``, each
    cut at its first end-of-document token. ``ValueError`` for a model without a sampler or
    a prompt that does not fit ``model.max_len``; ``FileNotFoundError`` for a directory
    without a trained run."""
    import jax
    import jax.numpy as jnp

    from routezoo.training.data.tokenizers import get_tokenizer
    from routezoo.training.workdir import load_trained
    from routezoo.zoo.sampling import sample

    config, model, state = load_trained(workdir, step=step, log=log)
    if not getattr(model, "causal", False) or not hasattr(model, "cfg"):
        raise ValueError(f"{workdir} holds a {type(model).__name__}; the sampler continues decoder LMs "
                         "(model.name=decoder) only")
    tok = get_tokenizer(config.data)
    ids = [int(i) for i in tok.encode(prompt)]
    if doc_start:
        ids = [int(tok.eos_id)] + ids
    if not ids:
        raise ValueError("the prompt is empty and --no-doc-start leaves nothing to continue; give a prompt or "
                         "keep the document start")
    max_len = int(config.model.max_len)
    if len(ids) + num_tokens > max_len:
        raise ValueError(f"prompt ({len(ids)} tokens) + --num-tokens {num_tokens} = {len(ids) + num_tokens} "
                         f"exceeds model.max_len {max_len}")
    prompt_ids = jnp.asarray(np.tile(np.asarray(ids, np.int32), (num_samples, 1)))
    variables = {"params": state.params, **state.model_state}
    out = np.asarray(jax.device_get(sample(model, variables, prompt_ids, jax.random.key(seed),
                                           num_tokens=num_tokens, temperature=temperature, top_k=top_k)))
    texts = []
    for row in out[:, len(ids):]:
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
    else:
        prompt = a.prompt or ""
    try:
        texts = generate(a.workdir, prompt, num_tokens=a.num_tokens, temperature=a.temperature, top_k=a.top_k,
                         num_samples=a.num_samples, seed=a.seed, step=a.step, doc_start=a.doc_start,
                         log=lambda m: print(m, file=sys.stderr))
    except (FileNotFoundError, ValueError) as e:
        return _fail(" ".join(str(e).split()))
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i}")
        print(prompt + text)
    return 0
