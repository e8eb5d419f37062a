"""Tests for data.tokenizer=hf (HFTokenizer) and data.tokenizer=auto: token_bytes against the
UTF-8 length of random texts, round trips, special ids from a checkpoint directory, the
config refusals and a short training run."""

import json
import math
import random

import numpy as np
import pytest

from conftest import assert_cli_usage_error, tiny_config

tokenizers = pytest.importorskip("tokenizers")

from routezoo.training import config_check  # noqa: E402
from routezoo.training import data as data_lib  # noqa: E402

ALPHABETS = ["abcdefghijklmnopqrstuvwxyz", "ABCXYZ0123456789", " ,.;:!?()\n\t",
             "éèêàçüöñßøå", "你好世界中文字", "🙂🚀🎉👍🏽", "Ωπλ", "𝄞"]


def _texts(n: int, seed: int) -> list[str]:
    """Random texts mixing ASCII, accents, CJK and emoji; each starts with a letter."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = [rng.choice(ALPHABETS[0])]
        for _ in range(rng.randint(0, 40)):
            chars.append(rng.choice(rng.choice(ALPHABETS)))
        out.append("".join(chars))
    return out


CORPUS = _texts(300, seed=0) + [f"the quick brown fox jumps over {i} lazy dogs" for i in range(100)]


def _byte_level_bpe(directory, vocab_size: int = 400, corpus=CORPUS):
    """A GPT-2 style byte-level BPE tokenizer (special <|endoftext|>), saved in ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory


def _metaspace_byte_fallback(directory, prepend_scheme: str = "never"):
    """A Llama-2 style tokenizer: Metaspace pieces, 256 byte-fallback pieces <0xAB>,
    specials <unk> <s> </s> <pad>, and a post-processor putting <s> before the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend_scheme)
    seen = [t for t in CORPUS if not set(t) & set("\u03a9\u03c0\u03bb\U0001d11e")]   # Greek and 𝄞 fall back to bytes
    tok.train_from_iterator(seen, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    strip = [decoders.Strip(" ", 1, 0)] if prepend_scheme != "never" else []
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), *strip])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory):
    return _byte_level_bpe(tmp_path_factory.mktemp("bbpe"))


@pytest.fixture(scope="module")
def metaspace_dir(tmp_path_factory):
    return _metaspace_byte_fallback(tmp_path_factory.mktemp("spm_like"))


# ----------------------------------------------------------------------- token bytes

def test_byte_level_table_is_a_bijection_matching_the_library():
    from tokenizers import pre_tokenizers
    from routezoo.training.data.tokenizers import _byte_level_chars
    table = _byte_level_chars()
    assert sorted(table.values()) == list(range(256))
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())


@pytest.mark.parametrize("kind", ["byte_level", "metaspace_never", "metaspace_first"])
def test_token_bytes_sum_to_utf8_length(tmp_path, kind):
    if kind == "byte_level":
        tok = data_lib.load_hf_tokenizer(str(_byte_level_bpe(tmp_path / kind)))
        extra, prefix = 0, []
    else:
        scheme = kind.split("_")[1]
        tok = data_lib.load_hf_tokenizer(str(_metaspace_byte_fallback(tmp_path / kind, scheme)))
        extra, prefix = (1 if scheme == "first" else 0), [tok.bos_id]   # the dummy-prefix space; BOS
    texts = _texts(200, seed=1)
    assert any(len(t.encode()) > len(t) for t in texts)            # multi-byte characters present
    fallback = 0
    for text in texts:
        ids = tok.encode(text)
        assert ids.tolist()[:len(prefix)] == prefix
        assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8")) + extra, (text, ids)
        fallback += int(np.sum((tok.token_bytes[ids] == 1) & (ids >= tok.vocab_size - 256)))
    if kind != "byte_level":
        assert fallback > 0                                          # byte-fallback pieces were used
    assert tok.token_bytes[tok.eos_id] == 0 and tok.token_bytes[tok.pad_id] == 0


@pytest.mark.parametrize("fixture", ["byte_level_dir", "metaspace_dir"])
def test_round_trip(request, fixture):
    tok = data_lib.load_hf_tokenizer(str(request.getfixturevalue(fixture)))
    for text in _texts(50, seed=2):
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and ids.max() < tok.vocab_size
        assert tok.decode(ids) == text
        assert tok.decode(np.append(ids, [tok.eos_id, tok.pad_id, tok.pad_id])) == text


# ----------------------------------------------------------------------- special ids

def test_special_ids_from_tokenizer_config(metaspace_dir, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "tokenizer.json").write_text((metaspace_dir / "tokenizer.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "</s>", "bos_token": {"content": "<s>"}, "pad_token": "<unk>"}))
    (d / "config.json").write_text(json.dumps({"eos_token_id": 3, "pad_token_id": 3}))   # loses
    tok = data_lib.load_hf_tokenizer(str(d))
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (2, 1, 0)


def test_special_ids_from_config_json_and_pad_fallback(byte_level_dir, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "tokenizer.json").write_text((byte_level_dir / "tokenizer.json").read_text())
    (d / "config.json").write_text(json.dumps({"eos_token_id": [7, 0], "bos_token_id": 5}))
    tok = data_lib.load_hf_tokenizer(str(d))
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (7, 5, 7)          # no pad token: pad = eos


def test_special_ids_from_the_tokenizers_own_specials(metaspace_dir, byte_level_dir):
    tok = data_lib.load_hf_tokenizer(str(metaspace_dir / "tokenizer.json"))
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (2, 1, 3)          # </s>, <s>, <pad>
    gpt2 = data_lib.load_hf_tokenizer(str(byte_level_dir))
    assert (gpt2.eos_id, gpt2.bos_id, gpt2.pad_id) == (0, None, 0)    # <|endoftext|>; pad = eos


@pytest.mark.parametrize("packing", ["eos", "masked"])
def test_pipeline_uses_the_special_ids(metaspace_dir, packing):
    tok = data_lib.load_hf_tokenizer(str(metaspace_dir))
    docs = ["abc def", "héllo 你好", "x"]
    batches = data_lib.EvalBatches(docs, tok, text_key="text", seq_len=7, batch_size=4, num_batches=1,
                                   packing=packing)
    batch = next(iter(batches))
    rows = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)   # [B, L+1]
    want = np.concatenate([np.append(tok.encode(d), tok.eos_id) for d in docs])
    assert want[0] == tok.bos_id and (want == tok.bos_id).sum() == len(docs)
    flat = rows.ravel()
    np.testing.assert_array_equal(flat[:len(want)], want)
    assert (flat[len(want):] == tok.pad_id).all() and len(flat) > len(want)
    want_w = batch["targets"] != tok.pad_id
    if packing == "masked":   # and never the next document's first token (the one after an eos)
        want_w &= batch["inputs"] != tok.eos_id
    np.testing.assert_array_equal(batch["weights"], want_w.astype(np.float32))


def test_auto_picks_the_checkpoints_tokenizer(metaspace_dir, tmp_path, data_dir):
    c = tiny_config(data_dir)
    assert c.data.tokenizer == "auto" and data_lib.tokenizer_choice(c) == ("byte", "")
    assert isinstance(data_lib.get_tokenizer(c.data), data_lib.ByteTokenizer)
    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    c.init.from_hf = str(empty)
    assert data_lib.resolve_tokenizer(c) == [] and c.data.tokenizer == "auto"
    c.init.from_hf = str(metaspace_dir)
    assert data_lib.resolve_tokenizer(c) and (c.data.tokenizer, c.data.tokenizer_path) == ("hf", str(metaspace_dir))
    tok = data_lib.get_tokenizer(c.data)
    assert isinstance(tok, data_lib.HFTokenizer) and (tok.eos_id, tok.pad_id) == (2, 3)
    c2 = tiny_config(data_dir, **{"init.from_hf": str(metaspace_dir), "model.vocab_size": 300})
    with pytest.raises(config_check.ConfigError, match=f"model.vocab_size 300 is smaller .* {tok.vocab_size} ids"):
        config_check.validate(c2)


# ----------------------------------------------------------------------- refusals

@pytest.mark.parametrize("flags,needle", [
    (["--config.data.tokenizer=gpt2"], "unknown data.tokenizer 'gpt2'; allowed: auto, byte, sentencepiece, hf"),
    (["--config.data.tokenizer=hf"], "data.tokenizer='hf' needs data.tokenizer_path"),
    (["--config.data.tokenizer=hf", "--config.data.tokenizer_path={empty}"], "is neither a tokenizer.json"),
    (["--config.data.tokenizer=hf", "--config.data.tokenizer_path={bbpe}"],
     "model.vocab_size 258 is smaller than the Hugging Face tokenizer's vocabulary of 400 ids"),
])
def test_bad_tokenizer_config_one_line_exit_2(tmp_path, capsys, byte_level_dir, flags, needle):
    (tmp_path / "empty").mkdir()
    flags = [f.format(empty=tmp_path / "empty", bbpe=byte_level_dir) for f in flags]
    assert_cli_usage_error(tmp_path, capsys, flags, needle)


# ----------------------------------------------------------------------- end to end

def test_train_with_hf_tokenizer(data_dir, tmp_path):
    import inspect
    import json as json_module
    import textwrap
    from routezoo.training.loop import train_and_evaluate
    from routezoo.training.metrics import read_metrics
    python = inspect.getsource(json_module).splitlines() + inspect.getsource(textwrap).splitlines()
    path = str(_byte_level_bpe(tmp_path / "tok", 512, python))   # trained on Python, as the stdlib data
    tok = data_lib.load_hf_tokenizer(path)
    c = tiny_config(data_dir, **{"data.tokenizer": "hf", "data.tokenizer_path": path,
                                 "model.vocab_size": tok.vocab_size, "train.steps": 2,
                                 "train.eval_every": 2, "train.eval_steps": 1, "checkpoint.every": 2})
    config_check.validate(c)
    nbytes = ntok = 0.0
    for batch in data_lib.eval_batches(c):
        nbytes += float((tok.token_bytes[batch["targets"]] * batch["weights"]).sum())
        ntok += float(batch["weights"].sum())
    out = train_and_evaluate(c, str(tmp_path / "wd"))
    assert math.isfinite(out["eval_bits_per_byte"]) and out["eval_bits_per_byte"] > 0
    logged = [r["eval_bytes_per_token"] for r in read_metrics(str(tmp_path / "wd")) if "eval_bytes_per_token" in r]
    assert logged and out["eval_bytes_per_token"] == pytest.approx(nbytes / ntok, rel=1e-6)
    assert logged[-1] == pytest.approx(nbytes / ntok, rel=1e-6) and nbytes / ntok > 1.5   # BPE merges bytes
