"""The user's own data through the whole pipeline: ``data.name=files`` configs (train and
validation splits, resume, processes), ``data.format=chat`` (the loss on completions only,
Hugging Face chat templates as transformers renders them), examples packed whole, bad input
from the command line, and a tiny Hugging Face MoE fine-tuned on a ``.jsonl`` folder with
its own tokenizer, then exported and reloaded in transformers."""

from __future__ import annotations

import gzip
import json

import jax
import numpy as np
import pytest

from conftest import assert_cli_usage_error, tiny_config
from routezoo.training import config_check
from routezoo.training import data

SEQ_LEN = 32
BATCH = 8
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _texts(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "ηta", "theta", "🙂"]
    return [f"doc {i}: " + " ".join(rng.choice(words, int(rng.integers(1, 30)))) for i in range(n)]


def _write_jsonl(path, texts, key="text"):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({key: t}) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    texts = _texts(120)
    for i in range(3):
        _write_jsonl(root / f"part{i}.jsonl", texts[i * 40:(i + 1) * 40])
    (root / "val").mkdir()
    _write_jsonl(root / "val" / "val.jsonl", _texts(10, seed=1))
    return root, texts


def _files_config(data_dir, root, **overrides):
    return tiny_config(data_dir, **{"data.name": "files", "data.files": str(root / "part*.jsonl"),
                                    "data.seq_len": SEQ_LEN, "train.batch_size": BATCH, **overrides})


def _decoded_documents(batches, tok):
    """The documents of masked-packed batches, by segment, decoded (pieces of one document
    cut across rows come back as separate pieces)."""
    out = []
    for b in batches:
        rows = np.concatenate([b["inputs"], b["targets"][:, -1:]], 1)
        seg = np.concatenate([b["segment_ids"], b["segment_ids"][:, -1:]], 1)
        for r, s in zip(rows, seg):
            for k in np.unique(s[s > 0]):
                out.append(tok.decode(r[s == k]))
    return out


def test_files_config_splits_resumes_and_shards(data_dir, corpus):
    root, texts = corpus
    tok = data.ByteTokenizer()
    c = _files_config(data_dir, root, **{"data.eval_fraction": 0.25})
    config_check.validate(c)
    it = data.make_train_iterator(c, process_index=0, process_count=1)
    [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    after = [next(it) for _ in range(4)]
    again = data.make_train_iterator(c, process_index=0, process_count=1)
    again.set_state(state)
    for x, y in zip(after, [next(again) for _ in range(4)]):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    # the hash split: the eval documents are exactly those not trained on
    ev = data.eval_batches(c, process_index=0, process_count=1)
    c.train.eval_steps = 40
    whole = set(texts)   # documents longer than a row come back in pieces: compare whole ones
    eval_docs = set(_decoded_documents(data.eval_batches(c, process_index=0, process_count=1), tok)) & whole
    train_docs = set(_decoded_documents([next(it) for _ in range(60)], tok)) & whole
    assert eval_docs and train_docs and not eval_docs & train_docs
    assert len(ev) == 2
    # data.eval_files: the validation folder, the whole of data.files for training
    c2 = _files_config(data_dir, root, **{"data.eval_files": str(root / "val" / "*.jsonl"), "train.eval_steps": 20})
    rows = [np.concatenate([b["inputs"], b["targets"][:, -1:]], 1)
            for b in data.eval_batches(c2, process_index=0, process_count=1)]
    flat = np.concatenate(rows).ravel()   # unshuffled: the validation files' stream, in order
    stream = [tok.decode(d) for d in np.split(flat, np.flatnonzero(flat == tok.eos_id) + 1)]
    assert stream[:10] == _texts(10, seed=1) and not any(stream[10:])
    # two processes (documents sharding): disjoint documents
    c3 = _files_config(data_dir, root, **{"data.process_sharding": "documents", "data.eval_fraction": 0.25,
                                          "data.seq_len": 256})
    seen = [set(_decoded_documents([b for _, b in zip(range(10), data.make_train_iterator(
        c3, process_index=p, process_count=2))], tok)) & whole for p in range(2)]
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_chat_prompt_completion_weights_zero_exactly_on_the_prompt():
    tok = data.ByteTokenizer()
    records = [{"prompt": f"Q{i}: what is {i} + {i}? ", "completion": f"A: {2 * i}."} for i in range(30)]
    enc = data.ChatEncoder(tok)
    ds = data.train_dataset(records, tok, text_key="text", seq_len=SEQ_LEN, batch_size=BATCH, seed=0,
                            shuffle=False, encoder=enc)
    batches = [b for _, b in zip(range(6), iter(ds))]
    for rec, doc in zip(records, [enc(r) for r in records]):
        n_prompt = len(rec["prompt"].encode())
        assert (doc["mask"][:n_prompt] == 0).all() and (doc["mask"][n_prompt:] == 1).all()
        assert tok.decode(doc["ids"]) == rec["prompt"] + rec["completion"] and doc["ids"][-1] == tok.eos_id
    for b in batches:
        rows = np.concatenate([b["inputs"], b["targets"][:, -1:]], 1)
        seg = np.concatenate([b["segment_ids"], b["segment_ids"][:, -1:]], 1)
        for r, s, w in zip(rows, seg, b["weights"]):
            for k in np.unique(s[s > 0]):   # each example whole in its row, its weights on its completion
                idx = np.flatnonzero(s == k)
                text = tok.decode(r[idx])
                rec = next(x for x in records if x["prompt"] + x["completion"] == text)
                n_prompt = len(rec["prompt"].encode())
                want = np.zeros(len(idx))
                want[n_prompt:] = 1          # the input at idx[j] predicts token j + 1 of the example
                np.testing.assert_array_equal(w[idx[:-1]], want[1:])
                if idx[-1] < len(w):         # its last token predicts padding or the next example: 0
                    assert w[idx[-1]] == 0
            assert (w[s[:-1] == 0] == 0).all()


def _chat_tokenizer(directory, vocab_size=384):
    """A byte-level BPE with ChatML specials and a chat template, saved as a HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = _texts(300) + [f"user asks {i}, assistant answers {i * 3}" for i in range(200)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "chat_template": CHATML}))
    return directory


@pytest.fixture(scope="module")
def chat_tok_dir(tmp_path_factory):
    return _chat_tokenizer(tmp_path_factory.mktemp("chat_tok"))


def test_hf_ids_and_chat_template_match_transformers(chat_tok_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(chat_tok_dir))
    tok = data.load_hf_tokenizer(str(chat_tok_dir))
    for text in _texts(20, seed=3):
        assert tok.encode(text).tolist() == ref(text)["input_ids"]
    enc = data.ChatEncoder(tok)
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "user asks 4"},
            {"role": "assistant", "content": "assistant answers 12"}, {"role": "user", "content": "and 5?"},
            {"role": "assistant", "content": "assistant answers 15"}]
    doc = enc({"messages": conv})
    want = ref.apply_chat_template(conv, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert doc["ids"][:-1].tolist() == list(want) and doc["ids"][-1] == tok.eos_id
    # the completion tokens: each assistant answer with its <|im_end|>, nothing of the prompt
    im_start, im_end = tok._tok.token_to_id("<|im_start|>"), tok._tok.token_to_id("<|im_end|>")
    ids, mask = doc["ids"], doc["mask"]
    answers = [tok.decode(ids[a:b]) for a, b in _runs(mask)]
    assert answers == ["assistant answers 12\n", "assistant answers 15\n"]   # <|im_end|> decodes to nothing
    assert (ids[mask == 1] == im_end).sum() == 2 and not (ids[mask == 1] == im_start).any()
    prompt_only = ref.apply_chat_template(conv[:2], tokenize=True, add_generation_prompt=True)
    prompt_only = prompt_only["input_ids"] if hasattr(prompt_only, "keys") else prompt_only
    assert (mask[:len(prompt_only)] == 0).all() and mask[len(prompt_only)] == 1
    # prompt/completion given as messages: the completion's turn only
    pc = enc({"prompt": conv[:4], "completion": conv[4:]})
    assert [tok.decode(pc["ids"][a:b]) for a, b in _runs(pc["mask"])] == ["assistant answers 15\n"]


def _runs(mask):
    """[start, end) of each run of 1s."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return list(zip(edges[::2], edges[1::2]))


def test_chat_without_template_and_bad_records():
    enc = data.ChatEncoder(data.ByteTokenizer())
    doc = enc({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    tok = data.ByteTokenizer()
    assert tok.decode(doc["ids"]) == "user: hi\nassistant: yo\n"
    assert tok.decode(doc["ids"][doc["mask"] == 1]) == "yo\n"
    with pytest.raises(ValueError, match="needs 'messages', or 'prompt' and 'completion'; it has \\['text'\\]"):
        enc({"text": "x"})
    with pytest.raises(ValueError, match="no assistant message"):
        enc({"messages": [{"role": "user", "content": "hi"}]})


def test_whole_packing_keeps_examples_whole_and_cuts_the_long_one():
    tok = data.ByteTokenizer()
    docs = [{"ids": np.arange(2, 2 + n, dtype=np.int32) + 10 * i, "mask": np.ones(n, np.float32)}
            for i, n in enumerate([10, 20, 8, 40, 5, 30])]
    import grain
    src = grain.MapDataset.source(docs).to_iter_dataset()
    rows = list(data.PackIterDataset(src, 17, pad_id=0, pad_final=True, segments=True, whole=True))
    pieces = [r["tokens"][r["segment_ids"] == k] for r in rows for k in np.unique(r["segment_ids"][r["segment_ids"] > 0])]
    want = [d["ids"][:17] for d in docs]   # each example in one row; the long ones cut to a row
    assert len(pieces) == len(want) and all(np.array_equal(p, w) for p, w in zip(pieces, want))
    for r in rows:
        assert (r["tokens"][r["segment_ids"] == 0] == 0).all() and (r["mask"][r["segment_ids"] == 0] == 0).all()


def test_tfds_style_bytes_records_render_as_chat():
    enc = data.ChatEncoder(data.ByteTokenizer())
    doc = enc({"prompt": np.asarray(b"2+2="), "completion": np.asarray(b"4")})
    assert data.ByteTokenizer().decode(doc["ids"]) == "2+2=4"


@pytest.mark.parametrize("case,needle", [
    ("missing", "matches no file"),
    ("empty", "empty.jsonl"),
    ("nokey", "'body'"),
    ("stdlib_chat", "data.format='chat' needs records with prompt/completion"),
    ("bad_packing", "unknown data.packing 'none'"),
])
def test_bad_files_config_one_line_exit_2(tmp_path, capsys, data_dir, case, needle):
    good = _write_jsonl(tmp_path / "good.jsonl", ["a", "b"])
    (tmp_path / "empty.jsonl").write_text("")
    flags = {"missing": ["--config.data.name=files", f"--config.data.files={tmp_path}/nothing*.jsonl"],
             "empty": ["--config.data.name=files", f"--config.data.files={good},{tmp_path}/empty.jsonl"],
             "nokey": ["--config.data.name=files", f"--config.data.files={good}", "--config.data.text_key=body"],
             "stdlib_chat": ["--config.data.format=chat"],
             "bad_packing": ["--config.data.packing=none"]}[case]
    assert_cli_usage_error(tmp_path, capsys, [f"--config.data.data_dir={data_dir}", *flags], needle)


# ----------------------------------------------------------------------- end to end

def test_finetune_hf_moe_on_jsonl_folder_and_export(tmp_path, capsys):
    """A tiny transformers Mixtral saved with its tokenizer trains with init.from_hf on a
    .jsonl folder (its tokenizer picked up, the loss falls), exports, and reloads in
    transformers with logits equal to routezoo's."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from routezoo.training import cli
    from routezoo.training.metrics import read_metrics
    from routezoo.zoo import hf

    hf_dir = _chat_tokenizer(tmp_path / "hf")
    tok = data.load_hf_tokenizer(str(hf_dir))
    cfg = transformers.MixtralConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=128, num_local_experts=4, num_experts_per_tok=2,
                                     eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(str(hf_dir))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [f"user asks {i % 7}, assistant answers {(i % 7) * 3}" for i in range(300)]
    for i in range(3):
        with gzip.open(corpus / f"part{i}.jsonl.gz", "wt") if i == 2 else open(corpus / f"part{i}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in lines[i::3])
    wd = tmp_path / "wd"
    flags = ["train", "--workdir", str(wd), f"--config.init.from_hf={hf_dir}", "--config.data.name=files",
             f"--config.data.files={corpus}/*.jsonl,{corpus}/*.jsonl.gz", "--config.data.seq_len=32",
             "--config.data.eval_fraction=0.1", "--config.train.steps=30", "--config.train.batch_size=8",
             "--config.train.eval_every=30", "--config.train.eval_steps=1", "--config.train.log_every=5",
             "--config.checkpoint.every=30", "--config.optimizer.learning_rate=0.01",
             "--config.optimizer.warmup_steps=3", "--config.train.progress=False"]
    assert cli.main(flags) == 0
    out = capsys.readouterr().out
    assert "tokenizer from the checkpoint" in out
    logged = [r for r in read_metrics(str(wd)) if "loss" in r]
    assert logged[-1]["loss"] < 0.6 * logged[0]["loss"], [r["loss"] for r in logged]
    assert 0 <= logged[-1]["data_wait_fraction"] <= 1
    saved = json.loads((wd / "config.json").read_text())
    assert saved["data"]["tokenizer"] == "hf" and saved["data"]["packing"] == "masked"
    # export with the tokenizer; transformers reloads both, and its logits are routezoo's
    export = tmp_path / "export"
    assert cli.main(["convert", "--workdir", str(wd), "--to-hf", str(export)]) == 0
    assert (export / "tokenizer.json").is_file() and (export / "tokenizer_config.json").is_file()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(export))
    ids = ref_tok("user asks 3, assistant answers 9")["input_ids"]
    assert ids == tok.encode("user asks 3, assistant answers 9").tolist()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits.numpy()
    model, params = hf.from_hf(str(export))
    got, _ = jax.jit(model.apply)({"params": params}, np.asarray([ids], np.int32))   # eagerly: a compile per op
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    before = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    assert not torch.equal(before.model.embed_tokens.weight, ref.model.embed_tokens.weight)   # it trained
