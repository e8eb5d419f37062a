"""Tests for routezoo.training.data: the stdlib dataset, tokenizers, packing, sharding,
checkpointing of the train iterator, eval batches and named (mocked) TFDS datasets."""

import logging
import subprocess
import sys
import textwrap

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from routezoo.configs import base
from routezoo.training import data
from routezoo.training.data import tokenizers

SEQ_LEN = 32
BATCH = 4


def _config(data_dir, seq_len=SEQ_LEN, batch=BATCH, **data_overrides):
    c = base.get_config()
    c.data.data_dir = str(data_dir)
    c.data.seq_len = seq_len
    c.train.batch_size = batch
    c.train.eval_steps = 3
    for key, value in data_overrides.items():
        c.data[key] = value
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    c = _config(d)
    assert data.ensure_dataset(c.data) == str(d)
    return d


def _split_paths(data_dir, split):
    source = data.get_source(_config(data_dir).data, split)
    return sorted(source[i]["path"].decode() for i in range(len(source)))


def _docs(n, seed=0):
    """n distinct in-memory documents of varied length (some longer than a row)."""
    rng = np.random.default_rng(seed)
    return [{"text": f"<doc {i}>" + "é" * int(rng.integers(0, 3 * SEQ_LEN))} for i in range(n)]


def _stream(docs, tok):
    return np.concatenate([np.append(tok.encode(d["text"]), tok.eos_id) for d in docs])


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# --------------------------------------------------------------------------- stdlib


def test_stdlib_split_deterministic_disjoint_complete(data_dir, tmp_path):
    train, val = _split_paths(data_dir, "train"), _split_paths(data_dir, "validation")
    assert val and train
    assert not set(train) & set(val)
    assert all("site-packages" not in p for p in train + val)
    files = data.stdlib_files()
    assert (train, val) == (files["train"], files["validation"])
    on_disk = sorted(p.relative_to(data.stdlib_root()).as_posix()
                     for p in data.stdlib_root().rglob("*.py"))
    expected = [p for p in on_disk
                if not set(p.split("/")[:-1]) & {"site-packages", "test", "tests", "idle_test"}]
    assert sorted(train + val) == expected
    assert all(data.stdlib_split_of(p) == "validation" for p in val)
    assert 0.01 < len(val) / len(expected) < 0.1
    # A second, independent build lists exactly the same files per split.
    data.ensure_dataset(_config(tmp_path).data)
    assert _split_paths(tmp_path, "train") == train
    assert _split_paths(tmp_path, "validation") == val


def test_stdlib_build_is_process_safe(tmp_path):
    script = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        from routezoo.configs import base
        from routezoo.training import data
        c = base.get_config(); c.data.data_dir = {str(tmp_path)!r}
        data.ensure_dataset(c.data)
        print("n_validation", len(data.get_source(c.data, "validation")))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(o.count("built routezoo_stdlib") for o in outs) == 1, outs
    assert len({line for o in outs for line in o.splitlines() if "n_validation" in line}) == 1


def test_ensure_dataset_logs_build(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger=data.__name__):
        data.ensure_dataset(_config(tmp_path).data)
        data.ensure_dataset(_config(tmp_path).data)
    built = [r.getMessage() for r in caplog.records if "built" in r.getMessage()]
    assert len(built) == 1 and "train" in built[0] and "validation" in built[0]


# ----------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_token_bytes():
    tok = data.ByteTokenizer()
    text = "naïve café — 日本語 🐍\n\tend"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.min() >= 2 and ids.max() < tok.vocab_size == 258
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    assert tok.decode(ids) == text
    assert tok.decode(np.concatenate([[1], ids, [1, 0, 0]])) == text
    assert tok.token_bytes.shape == (258,)
    assert tok.token_bytes[ids].sum() == len(text.encode("utf-8"))
    assert tok.token_bytes[[0, 1]].tolist() == [0, 0]


def test_sentencepiece_trained_cached_round_trip(data_dir, monkeypatch):
    monkeypatch.setattr(tokenizers, "SPM_SAMPLE_CHARS", 300_000)
    c = _config(data_dir, tokenizer="sentencepiece", spm_vocab_size=400)
    tok = data.get_tokenizer(c.data)
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (400, 0, 1)
    text = "def f(x):\n    return 'héllo wörld ✓ 日本'  # 🐍\n\n\tz = 1\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.min() > 1 and ids.max() < 400
    assert tok.decode(ids) == text
    assert tok.decode(np.concatenate([[0, 1], ids, [1, 0]])) == text
    assert tok.token_bytes.shape == (400,) and tok.token_bytes[[0, 1, 2]].tolist() == [0] * 3
    assert tok.token_bytes[ids].sum() == len(text.encode("utf-8"))
    # Cached: the second call loads the model file instead of training.
    cached = list((data_dir / "routezoo_spm").glob("*400.model"))
    assert len(cached) == 1
    monkeypatch.setattr(tokenizers, "train_sentencepiece", lambda *a, **k: pytest.fail("retrained"))
    assert np.array_equal(data.get_tokenizer(c.data).encode(text), ids)
    from_file = data.get_tokenizer(_config(data_dir, tokenizer="sentencepiece",
                                           spm_model=str(cached[0])).data)
    assert np.array_equal(from_file.encode(text), ids)
    # Usable in the pipeline: batches carry sentencepiece ids.
    batch = next(data.make_train_iterator(c, process_index=0, process_count=1))
    assert batch["inputs"].max() < 400


# -------------------------------------------------------------------------- packing


def _check_segments(b, tok):
    """Segments follow the EOS-separated documents; positions restart at each; weights as above."""
    seg, pos, inp = b["segment_ids"], b["positions"], b["inputs"]
    for r in range(inp.shape[0]):
        starts = np.flatnonzero(np.diff(seg[r], prepend=-1))
        real = seg[r] != 0
        # a new segment begins exactly after an EOS (or at the row's start)
        np.testing.assert_array_equal(starts[1:][real[starts[1:]]] - 1,
                                      np.flatnonzero(inp[r][:-1] == tok.eos_id)[: len(starts[1:][real[starts[1:]]])])
        np.testing.assert_array_equal(seg[r][real], np.cumsum(np.diff(seg[r][real], prepend=0) != 0))
        for a, z in zip(starts, [*starts[1:], len(seg[r])]):
            np.testing.assert_array_equal(pos[r][a:z], np.arange(z - a) if seg[r][a] else 0)
    # every real target except the one after a document's EOS (the next document's first token)
    np.testing.assert_array_equal(b["weights"], ((b["targets"] != tok.pad_id) & (inp != tok.eos_id)).astype(np.float32))


@pytest.mark.parametrize("packing", ["eos", "masked"])
def test_packing_reproduces_document_stream(packing):
    tok, docs = data.ByteTokenizer(), _docs(12)
    ds = data.train_dataset(docs, tok, text_key="text", seq_len=SEQ_LEN, batch_size=BATCH,
                            seed=0, shuffle=False, packing=packing)
    batches = _take(iter(ds), 10)
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (BATCH, SEQ_LEN)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
        assert b["weights"].dtype == np.float32
        if packing == "eos":
            assert (b["weights"] == 1).all() and "segment_ids" not in b
        else:
            assert b["segment_ids"].shape == b["positions"].shape == (BATCH, SEQ_LEN)
            _check_segments(b, tok)
    rows = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1)
                           for b in batches])
    for b in batches:   # targets are inputs shifted by one
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    flat = rows.ravel()
    stream = np.tile(_stream(docs, tok), len(flat) // len(_stream(docs, tok)) + 1)
    np.testing.assert_array_equal(flat, stream[: len(flat)])


def test_pack_final_row_padded():
    tok, docs = data.ByteTokenizer(), _docs(5)
    stream = _stream(docs, tok)
    src = grain.MapDataset.source(docs).map(data.EncodeDocument(tok, "text"))
    rows = list(data.PackIterDataset(src.to_iter_dataset(), SEQ_LEN + 1, pad_final=True))
    flat = np.concatenate(rows)
    assert all(len(r) == SEQ_LEN + 1 for r in rows)
    np.testing.assert_array_equal(flat[: len(stream)], stream)
    assert (flat[len(stream):] == tok.pad_id).all() and len(flat) - len(stream) <= SEQ_LEN


# --------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("source", ["stdlib", "memory"])
def test_iterator_state_restores_exactly(data_dir, source):
    if source == "stdlib":
        c = _config(data_dir)
        make = lambda: data.make_train_iterator(c, process_index=0, process_count=1)
    else:   # a tiny source: 9 batches cross several reshuffled epochs
        ds = data.train_dataset(_docs(6), data.ByteTokenizer(), text_key="text",
                                seq_len=SEQ_LEN, batch_size=BATCH, seed=3)
        make = lambda: iter(ds)
    it = make()
    _take(it, 3)
    state = it.get_state()
    after = _take(it, 3)
    restored = make()
    restored.set_state(state)
    _assert_batches_equal(_take(restored, 3), after)
    _assert_batches_equal(_take(make(), 3), _take(make(), 3))   # deterministic from seed


def test_iterator_orbax_checkpoint_manager(data_dir, tmp_path):
    c = _config(data_dir)
    it = data.make_train_iterator(c, process_index=0, process_count=1)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(data=data.iterator_save_args(it)))
        mngr.wait_until_finished()
    after = _take(it, 3)
    assert (tmp_path / "ckpt" / "3" / "data" / "process_0-of-1.json").exists()
    fresh = data.make_train_iterator(c, process_index=0, process_count=1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = mngr.restore(3, args=ocp.args.Composite(
            data=data.iterator_restore_args(fresh)))
    assert restored["data"] is fresh
    _assert_batches_equal(_take(fresh, 3), after)


def test_iterator_checkpoint_one_file_per_process(data_dir, tmp_path, monkeypatch):
    """grain's handler (behind the save/restore args) names its file by the process."""
    from grain._src.core import sharding
    c = _config(data_dir)
    handler = grain.checkpoint.CheckpointHandler()
    make = lambda p: data.make_train_iterator(c, process_index=p, process_count=2)
    its, after = [make(p) for p in range(2)], []
    for p, it in enumerate(its):
        monkeypatch.setattr(sharding, "get_process_index_and_count", lambda p=p: (p, 2))
        _take(it, 2)
        handler.save(tmp_path, args=data.iterator_save_args(it))
        after.append(_take(it, 2))
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    for p in range(2):
        monkeypatch.setattr(sharding, "get_process_index_and_count", lambda p=p: (p, 2))
        restored = handler.restore(tmp_path, args=data.iterator_restore_args(make(p)))
        _assert_batches_equal(_take(restored, 2), after[p])


# ------------------------------------------------------------------ process sharding


def _two_epochs_docs(ds, n_docs, tok):
    """Decoded documents of the first two epochs (``n_docs`` each) of ``ds``."""
    batches, it = [], iter(ds)
    while sum(int((b["inputs"] == tok.eos_id).sum()) for b in batches) < 2 * n_docs + 1:
        batches.append(next(it))
    flat = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1).ravel()
                           for b in batches])
    docs = [tok.decode(d) for d in np.split(flat, np.flatnonzero(flat == tok.eos_id) + 1)]
    return docs[:n_docs], docs[n_docs: 2 * n_docs]


def test_process_sharding_disjoint_and_complete():
    tok, docs = data.ByteTokenizer(), _docs(40)
    texts = [d["text"] for d in docs]
    seen = []
    for p in range(2):
        ds = data.train_dataset(docs, tok, text_key="text", seq_len=SEQ_LEN,
                                batch_size=BATCH // 2, seed=7, process_index=p, process_count=2)
        assert next(iter(ds))["inputs"].shape == (BATCH // 2, SEQ_LEN)
        epoch1, epoch2 = _two_epochs_docs(ds, 20, tok)
        assert sorted(epoch1) == sorted(texts[p::2])      # a permutation of its shard
        assert epoch1 != texts[p::2]                       # shuffled
        assert sorted(epoch2) == sorted(epoch1) and epoch2 != epoch1   # re-shuffled
        seen.append(set(epoch1))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(texts)


def test_make_train_iterator_process_split(data_dir):
    c = _config(data_dir)
    b0, b1 = (next(data.make_train_iterator(c, process_index=p, process_count=2))
              for p in range(2))
    assert b0["inputs"].shape == b1["inputs"].shape == (BATCH // 2, SEQ_LEN)
    assert not np.array_equal(b0["inputs"], b1["inputs"])
    with pytest.raises(ValueError, match="divisible"):
        data.make_train_iterator(c, process_index=0, process_count=3)


# ----------------------------------------------------------------------------- eval


def test_eval_batches_deterministic_and_padded(data_dir):
    c = _config(data_dir)
    ev = data.eval_batches(c, process_index=0, process_count=1)
    first, second = list(ev), list(ev)
    assert len(first) == len(ev) == c.train.eval_steps
    _assert_batches_equal(first, second)
    for b in first:
        assert b["inputs"].shape == (BATCH, SEQ_LEN)
        _check_segments(b, data.ByteTokenizer())
    shards = [list(data.eval_batches(c, process_index=p, process_count=2)) for p in range(2)]
    assert all(len(s) == c.train.eval_steps for s in shards)
    assert not np.array_equal(shards[0][0]["inputs"], shards[1][0]["inputs"])


@pytest.mark.parametrize("packing", ["eos", "masked"])
def test_eval_short_split_pads_with_zero_weights(packing):
    tok, docs = data.ByteTokenizer(), _docs(3)
    stream = _stream(docs, tok)
    ev = data.EvalBatches(docs, tok, text_key="text", seq_len=SEQ_LEN, batch_size=BATCH,
                          num_batches=6, packing=packing)
    batches = list(ev)
    assert len(batches) == 6
    rows = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1)
                           for b in batches])
    flat = rows.ravel()
    np.testing.assert_array_equal(flat[: len(stream)], stream)
    assert (flat[len(stream):] == 0).all()
    total_weight = sum(b["weights"].sum() for b in batches)
    # eos: every real target; masked: every real target but those after a document's EOS
    lost = 0 if packing == "eos" else sum(int(((b["inputs"] == tok.eos_id) & (b["targets"] != 0)).sum())
                                          for b in batches)
    assert total_weight == sum(int((b["targets"] != 0).sum()) for b in batches) - lost
    assert batches[-1]["weights"].sum() == 0
    if packing == "masked":
        for b in batches:
            _check_segments(b, tok)
            assert (b["segment_ids"][b["inputs"] == 0] == 0).all()   # padding is segment 0


# ------------------------------------------------------------------- named datasets


def test_named_dataset_with_mock_data(tmp_path):
    assert data.known_dataset("lm1b") and data.known_dataset("stdlib")
    c = _config(tmp_path, name="lm1b", eval_split="test")
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        it = data.make_train_iterator(c, process_index=0, process_count=1)
        batches = _take(it, 2)
        state = it.get_state()
        after = _take(it, 2)
        restored = data.make_train_iterator(c, process_index=0, process_count=1)
        restored.set_state(state)
        _assert_batches_equal(_take(restored, 2), after)
        evals = list(data.eval_batches(c, process_index=0, process_count=1))
    assert batches[0]["inputs"].shape == (BATCH, SEQ_LEN)
    assert len(evals) == c.train.eval_steps
    assert (batches[0]["inputs"] == data.EOS_ID).any()   # several short documents per row


def test_unknown_dataset_one_line_error(tmp_path):
    assert not data.known_dataset("no_such_dataset_xyz")
    c = _config(tmp_path, name="no_such_dataset_xyz")
    for call in (lambda: data.ensure_dataset(c.data),
                 lambda: data.make_train_iterator(c, process_index=0, process_count=1)):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "no_such_dataset_xyz" in msg and "stdlib" in msg
        assert "array_record" in msg


def test_unprepared_named_dataset_one_line_error(tmp_path):
    c = _config(tmp_path, name="tiny_shakespeare")
    with pytest.raises(ValueError) as e:
        data.make_train_iterator(c, process_index=0, process_count=1)
    assert "\n" not in str(e.value) and "tiny_shakespeare" in str(e.value)


def test_no_tensorflow_imported():
    assert "tensorflow" not in sys.modules
