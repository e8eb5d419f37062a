"""Tests for per-example task ids in routezoo.training.data (``data.tasks``): rows never mix
tasks, task ids match the rows' documents, mixing proportions, checkpoint/resume, the
untasked pipeline unchanged, process sharding (rows and documents), eval batches per task
and the one-line errors.

Most tests use an in-memory source whose texts name their task: every document of task
``t`` is written in the letter ``LETTERS[t]`` (plus digits and newlines), so the letters
of a row say which tasks' documents it holds."""

import collections
import json

import grain
import numpy as np
import pytest

from routezoo.training import data
import test_data
from test_data import _assert_batches_equal, _take

SEQ_LEN = 16
BATCH = 6
LETTERS = "ABCD"
TOK = data.ByteTokenizer()


def _source(sizes=(5, 9, 3), seed=0):
    """Records {'text', 'path'} of len(sizes) tasks, interleaved in the source, plus two
    top-level modules (no task). Returns (records, {task name: record indices})."""
    rng = np.random.default_rng(seed)
    records, index = [{"text": "top level\n", "path": "os.py"}], collections.defaultdict(list)
    for i in range(max(sizes)):
        for t, n in enumerate(sizes):
            if i < n:
                body = LETTERS[t] * int(rng.integers(1, 3 * SEQ_LEN))
                index[f"pkg{t}"].append(len(records))
                records.append({"text": f"{LETTERS[t]}{i}\n{body}", "path": f"pkg{t}/m{i}.py"})
    records.append({"text": "more\n", "path": "abc.py"})
    return records, dict(index)


def _tasks(index, weights=None):
    return [data.Task(name, t, tuple(idx), 1.0 if weights is None else weights[t])
            for t, (name, idx) in enumerate(sorted(index.items()))]


def _letters(tokens):
    text = TOK.decode(np.asarray(tokens))
    return {ch for ch in text if ch.isalpha()}


def _rows(batch):
    """The packed rows (seq_len + 1 tokens) of a batch."""
    return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], 1)


def _config(data_dir, **data_overrides):
    return test_data._config(data_dir, SEQ_LEN, BATCH, **data_overrides)


def _train(records, tasks, **kw):
    kw = {"seed": 0, "batch_size": BATCH, "packing": "eos", **kw}
    return data.train_dataset(records, TOK, text_key="text", seq_len=SEQ_LEN, tasks=tasks, **kw)


# ------------------------------------------------------------------------- training


def test_rows_one_task_each_packed_per_task_and_uniform():
    records, index = _source()
    tasks = _tasks(index)
    batches = _take(iter(_train(records, tasks)), 40)
    per_task = collections.defaultdict(list)
    for b in batches:
        assert b["task_id"].shape == (BATCH,) and b["task_id"].dtype == np.int32
        assert (b["weights"] == 1).all()
        for row, task_id in zip(_rows(b), b["task_id"]):
            assert _letters(row) == {LETTERS[task_id]}       # one task, the one its id says
            per_task[int(task_id)].append(row)
    # Uniform: grain's interleaving gives every task the same number of rows (+-1).
    counts = [len(per_task[t]) for t in range(len(tasks))]
    assert max(counts) - min(counts) <= 1 and sum(counts) == 40 * BATCH
    # Each task's rows, in order, are its own documents packed: every epoch a reshuffled
    # permutation of exactly that task's texts.
    for task in tasks:
        flat = np.concatenate(per_task[task.id])
        docs = [TOK.decode(d) for d in np.split(flat, np.flatnonzero(flat == TOK.eos_id) + 1)]
        n = len(task.indices)
        texts = [records[i]["text"] for i in task.indices]
        assert len(docs) > 2 * n
        epoch1, epoch2 = docs[:n], docs[n: 2 * n]
        assert sorted(epoch1) == sorted(texts) == sorted(epoch2)
        assert epoch1 != texts or epoch2 != texts                # shuffled


def test_proportional_weights_mix_rows_in_proportion():
    records, index = _source()
    weights = [1.0, 3.0, 2.0]
    batches = _take(iter(_train(records, _tasks(index, weights))), 30)
    ids = np.concatenate([b["task_id"] for b in batches])
    expected = len(ids) * np.array(weights) / sum(weights)
    np.testing.assert_allclose(np.bincount(ids, minlength=3), expected, atol=1)


def test_resume_from_saved_state_gives_same_batches():
    records, index = _source()
    tasks = _tasks(index, [1.0, 2.0, 1.0])
    for kw in ({}, {"process_sharding": "rows", "process_index": 1, "process_count": 2},
               {"process_sharding": "documents", "process_index": 1, "process_count": 2}):
        make = lambda: iter(_train(records, tasks, batch_size=BATCH // 2 if kw else BATCH, **kw))
        it = make()
        _take(it, 5)
        state = json.loads(json.dumps(it.get_state()))           # as a checkpoint stores it
        after = _take(it, 5)
        restored = make()
        restored.set_state(state)
        _assert_batches_equal(_take(restored, 5), after)
        _assert_batches_equal(_take(make(), 4), _take(make(), 4))   # deterministic


def test_rows_sharding_splits_task_id_with_the_rows():
    records, index = _source()
    tasks = _tasks(index)
    whole = _take(iter(_train(records, tasks)), 4)
    parts = [_take(iter(_train(records, tasks, batch_size=BATCH // 2, process_index=p,
                               process_count=2, process_sharding="rows")), 4) for p in range(2)]
    for b, b0, b1 in zip(whole, *parts):
        for key in b:
            np.testing.assert_array_equal(np.concatenate([b0[key], b1[key]]), b[key])


def test_documents_sharding_disjoint_documents_per_task():
    records, index = _source(sizes=(6, 8, 4))
    tasks = _tasks(index)
    seen = []
    for p in range(2):
        batches = _take(iter(_train(records, tasks, batch_size=BATCH // 2, process_index=p,
                                    process_count=2, process_sharding="documents")), 30)
        rows = [(r, t) for b in batches for r, t in zip(_rows(b), b["task_id"])]
        assert all(_letters(r) == {LETTERS[t]} for r, t in rows)
        for task in tasks:
            flat = np.concatenate([r for r, t in rows if t == task.id])
            docs = [TOK.decode(d) for d in np.split(flat, np.flatnonzero(flat == TOK.eos_id) + 1)]
            shard = {records[i]["text"] for i in task.indices[p::2]}
            assert set(docs[:-1]) == shard      # its share of the task, and only that
            seen.append(shard)
    assert not set().union(*seen[:3]) & set().union(*seen[3:])
    one_doc = [data.Task("pkg0", 0, tuple(index["pkg0"][:1]))]
    with pytest.raises(ValueError, match="process 1 of 2 gets no documents of task 'pkg0'"):
        _train(records, one_doc, batch_size=BATCH // 2, process_index=1, process_count=2)


# ----------------------------------------------------------------------------- eval


def _eval(records, tasks, **kw):
    kw = {"batch_size": BATCH, "num_batches": 8, "packing": "eos", **kw}
    return data.TaskEvalBatches(records, TOK, text_key="text", seq_len=SEQ_LEN, tasks=tasks, **kw)


def test_eval_rows_per_task_round_robin_and_per_task():
    records, index = _source()
    tasks = _tasks(index)
    ev = _eval(records, tasks)
    batches = list(ev)
    assert len(batches) == 8
    _assert_batches_equal(batches, list(ev))                      # re-iterable, fixed
    mixed = collections.defaultdict(list)
    for b in batches:
        np.testing.assert_array_equal(b["weights"], (b["targets"] != TOK.pad_id))
        for row, task_id in zip(_rows(b), b["task_id"]):
            if (row != TOK.pad_id).any():
                assert _letters(row) == {LETTERS[task_id]}
                mixed[int(task_id)].append(row)
    assert (batches[-1]["weights"] == 0).all()                   # all data used up, padding
    ids = np.concatenate([b["task_id"][(b["weights"] > 0).any(1)] for b in batches])
    np.testing.assert_array_equal(ids[:3 * min(map(len, mixed.values()))],
                                  np.tile([0, 1, 2], min(map(len, mixed.values()))))
    for task in tasks:
        # One task alone: its own rows, the same as its rows in the mixed eval, and its
        # documents unshuffled, in order.
        alone = [(r, t) for b in _eval(records, [task]) for r, t in zip(_rows(b), b["task_id"])
                 if (r != TOK.pad_id).any()]
        assert {t for _, t in alone} == {task.id}
        np.testing.assert_array_equal(np.stack([r for r, _ in alone]), np.stack(mixed[task.id]))
        flat = np.concatenate([r for r, _ in alone])
        stream = np.concatenate([np.append(TOK.encode(records[i]["text"]), TOK.eos_id)
                                 for i in task.indices])
        np.testing.assert_array_equal(flat[: len(stream)], stream)
        assert (flat[len(stream):] == TOK.pad_id).all()


def test_eval_rows_sharding_splits_task_id():
    records, index = _source()
    tasks = _tasks(index)
    whole = list(_eval(records, tasks, num_batches=4))
    parts = [list(_eval(records, tasks, num_batches=4, batch_size=BATCH // 2, process_index=p,
                        process_count=2, process_sharding="rows")) for p in range(2)]
    for b, b0, b1 in zip(whole, *parts):
        for key in b:
            np.testing.assert_array_equal(np.concatenate([b0[key], b1[key]]), b[key])


# ------------------------------------------------------------------ stdlib and config


def _reference_batches(c, n):
    """The untasked train pipeline, composed here from its parts."""
    d = c.data
    docs = grain.MapDataset.source(data.get_source(d, "train")).shuffle(seed=c.seed)
    docs = docs.repeat().map(data.EncodeDocument(TOK, "text"))
    rows = data.PackIterDataset(docs.to_iter_dataset(), SEQ_LEN + 1, segments=True)   # data.packing=masked
    return _take(iter(rows.batch(BATCH, batch_fn=data.MakeBatch(BATCH))), n)


def test_tasks_off_gives_the_untasked_batches(data_dir):
    c = _config(data_dir)
    assert c.data.tasks == ""
    got = _take(data.make_train_iterator(c, process_index=0, process_count=1), 4)
    assert set(got[0]) == {"inputs", "targets", "weights", "segment_ids", "positions"}
    _assert_batches_equal(got, _reference_batches(c, 4))
    ev = data.eval_batches(c, process_index=0, process_count=1)
    assert type(ev) is data.EvalBatches and "task_id" not in next(iter(ev))
    with pytest.raises(ValueError, match="needs data.tasks"):
        data.eval_batches(c, task="email", process_index=0, process_count=1)


def test_stdlib_tasks_ids_resume_and_eval(data_dir):
    c = _config(data_dir, tasks="email, json,importlib", task_sampling="proportional")
    files = data.stdlib_files()
    names = ["email", "json", "importlib"]
    # Proportional weights: the tasks' text bytes in the train split.
    root = data.stdlib_root()
    for task, name in zip(data.split_tasks(c.data, "train"), names):
        paths = [p for p in files["train"] if p.startswith(name + "/")]
        assert (task.name, task.id, len(task.indices)) == (name, names.index(name), len(paths))
        assert task.weight == sum(len((root / p).read_bytes().decode("utf-8", "replace")
                                      .encode("utf-8")) for p in paths)
    source = data.get_source(c.data, "train")
    it = data.make_train_iterator(c, process_index=0, process_count=1)
    batches = _take(it, 3)
    state = it.get_state()
    after = _take(it, 3)
    restored = data.make_train_iterator(c, process_index=0, process_count=1)
    restored.set_state(state)
    _assert_batches_equal(_take(restored, 3), after)
    # Every row is made of pieces of its task's files (UTF-8 bytes; EOS between files).
    texts = {n: b"\0".join(source[i]["text"] for i in t.indices)
             for n, t in zip(names, data.split_tasks(c.data, "train"))}
    for b in batches:
        for row, task_id in zip(_rows(b), b["task_id"]):
            for piece in np.split(row, np.flatnonzero(row == TOK.eos_id)):
                piece = (piece[piece >= data.BYTE_OFFSET] - data.BYTE_OFFSET).astype(np.uint8)
                assert piece.tobytes() in texts[names[task_id]]
    # Eval: json has no validation file (5% by hash) and is left out; per task works.
    assert data.eval_task_names(c.data) == [n for n in names if any(
        p.startswith(n + "/") for p in files["validation"])] == ["email", "importlib"]
    mixed = list(data.eval_batches(c, process_index=0, process_count=1))
    assert len(mixed) == 3 and set(np.concatenate([b["task_id"] for b in mixed])) == {0, 2}
    one = list(data.eval_batches(c, task="importlib", process_index=0, process_count=1))
    assert {int(t) for b in one for t in b["task_id"][(b["weights"] > 0).any(1)]} == {2}
    with pytest.raises(ValueError, match="task 'json' has no documents in the 'validation'"):
        data.eval_batches(c, task="json", process_index=0, process_count=1)
    with pytest.raises(ValueError, match="not in data.tasks; allowed: email, json, importlib"):
        data.eval_batches(c, task="asyncio", process_index=0, process_count=1)


def test_available_tasks_and_one_line_errors(data_dir):
    c = _config(data_dir)
    files = data.stdlib_files()
    expected = collections.Counter(p.split("/")[0] for p in files["train"]
                                   if "/" in p and p.split("/")[0].isidentifier())
    available = data.available_tasks(c.data)
    assert available == dict(expected) and list(available) == sorted(available)
    assert "test" not in available and "os" not in available
    c.data.tasks = "email,nosuchpkg"
    with pytest.raises(ValueError) as e:
        data.make_train_iterator(c, process_index=0, process_count=1)
    msg = str(e.value)
    assert "\n" not in msg and "'nosuchpkg'" in msg
    assert msg.endswith("allowed (top-level stdlib packages): " + ", ".join(sorted(available)))
    for tasks, sampling, match in [("email,email", "uniform", "email more than once"),
                                   ("email,", "uniform", "unknown task"),
                                   ("email", "random", "data.task_sampling 'random'; allowed: "
                                                       "uniform, proportional")]:
        c.data.tasks, c.data.task_sampling = tasks, sampling
        with pytest.raises(ValueError, match=match):
            data.task_names(c.data)
    other = _config(data_dir, name="lm1b", tasks="email")
    with pytest.raises(ValueError, match="needs data.name='stdlib'"):
        data.task_names(other.data)
    with pytest.raises(ValueError, match="needs data.name='stdlib'"):
        data.available_tasks(other.data)


def test_cli_refuses_tasks_of_a_corpus_without_tasks(tmp_path, capsys):
    """data.tasks with data.name='files' or a TFDS name: one line naming the corpora that have
    tasks, exit 2, before any data is read or built (the files and the TFDS dir do not exist)."""
    from conftest import assert_cli_usage_error
    needle = ("data.tasks needs data.name='stdlib' (top-level stdlib packages) or 'shakespeare' "
              "(Shakespeare genres), got data.name=")
    for name, extra in (("files", [f"--config.data.files={tmp_path}/none/*.jsonl"]),
                        ("lm1b", [f"--config.data.data_dir={tmp_path}/tfds"])):
        assert_cli_usage_error(tmp_path, capsys, [f"--config.data.name={name}", "--config.data.tasks=email", *extra],
                               needle + repr(name))
    assert not (tmp_path / "tfds").exists()   # nothing built


def test_cli_refuses_tasks_without_validation_files(data_dir, tmp_path, capsys):
    """``routezoo train`` checks data.tasks against the dataset before anything is
    written: tasks without any validation file cannot be evaluated (one line, exit 2)."""
    from routezoo.training import cli
    workdir = tmp_path / "run"
    code = cli.main(["train", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
                     "--config.data.tasks=json", "--config.train.steps=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not workdir.exists()
    assert len(err) == 1 and "no task of data.tasks (json) has files in the 'validation' split" in err[0]
    assert "tasks with validation files: " in err[0] and "email" in err[0]
