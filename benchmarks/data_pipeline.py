"""Input-pipeline throughput per host: tokens/s that routezoo's training dataset produces.

    python benchmarks/data_pipeline.py [--seq_len 2048 --batch 16] [--seconds 8 --max_batches 2000]
        [--tokenizers byte,sentencepiece,hf] [--sources memory,files] [--workers 0,2,4]
        [--corpus_mb 40] [--consumer_tokens_per_s 146000] [--tag cpu]

Builds the per-process training dataset exactly as ``routezoo train`` does on one host
(:func:`routezoo.training.data.pipeline.train_dataset`, process 0 of 1) and pulls batches
``{'inputs': int32[batch, seq_len], ...}`` from it: ``--warmup`` batches first (their time,
worker start-up included, is reported as ``startup_s``), then batches until ``--seconds``
have passed or ``--max_batches`` were taken, whichever comes first. Every batch counts
``batch * seq_len`` tokens (padding and the weight-0 targets at document boundaries
included: that is what the training step consumes).

Configurations (every combination, except that ``eos`` packing runs for the byte tokenizer
in-process only, to show what ``masked`` packing's segments cost):

* tokenizer: ``byte`` (:class:`ByteTokenizer`); ``sentencepiece``: a ``--spm_vocab`` (4096)
  piece unigram model trained here with :func:`train_sentencepiece` on the first
  ``--spm_sample_mb`` of the (shuffled) corpus; ``hf``: a GPT-2 style byte-level BPE
  (``ByteLevel`` pre-tokenizer and decoder, special ``<|endoftext|>``, ``--hf_vocab``
  (16384) pieces) trained here with the ``tokenizers`` package on ``--hf_sample_mb`` of
  the corpus, saved as ``tokenizer.json`` in a temp dir and loaded with
  :class:`HFTokenizer`. Training the tokenizers is not timed (``train_s`` in the JSON).
* source: ``memory``: the corpus as a list of ``{'text': str}`` records (grain
  ``MapDataset``: shuffled, repeated, read with 4 threads); ``files``: the same records
  written to ``--num_files`` ``.jsonl`` files in a temp dir and streamed with
  :class:`DocumentStream` (``data.name='files'``: shuffled file order, 1024-document
  shuffle windows).
* workers: ``num_workers=0`` (everything in this process) and grain worker processes
  (``mp_prefetch``) for each count of ``--workers``; a count above the CPUs this process
  may run on (``os.sched_getaffinity``) is lowered to that number (duplicates dropped).
* packing: ``masked`` (``segment_ids``/``positions`` per row, the default) and ``eos``.

Corpus: the ``.py`` files of the running interpreter's standard library
(``sysconfig.get_paths()['stdlib']``, test suites included, ``site-packages`` and
``__pycache__`` left out; for CPython 3.11: 1,790 files, of which 1,758 are non-empty
and valid UTF-8 (the others are skipped), 31.5 MB, from a few bytes to 0.76 MB, median
6.8 kB), in a fixed shuffled order, capped at ``--corpus_mb``.

grain's worker processes read grain's absl flags (``--grain_*``, e.g.
``grain_enable_multiprocess_worker_profiling``) when they start, and raise
``absl.flags.UnparsedFlagAccessError: Trying to access flag
--grain_enable_multiprocess_worker_profiling before flags were parsed.`` unless the
flags were parsed, as ``absl.app.run`` does (``routezoo train`` runs under it). This
script parses them itself with ``flags.FLAGS([sys.argv[0]])`` before it builds any
dataset (grain 0.2.18; its workers are ``spawn``\\ed processes, so they start fresh,
re-import the pipeline's modules and receive the pickled dataset, in-memory corpus
included).

Closing a worker pool (``iterator.close()``) sometimes takes 25 s here: grain sets its stop
event, drains the output queue and joins each worker with a 25 s timeout
(``process_prefetch._PROCESS_KILL_TIMEOUT_S``), then kills it; a worker that put one more
batch after the drain seems to block on exit flushing its queue until it is killed. It
does not touch the throughput, but this script closes the iterators on background threads
(joined before the results are written; ``close_s`` in the JSON) so that it does not add
up to the run time.

For context the table shows, per configuration, the ratio of the tokens/s produced to
those a training step consumes: ``--consumer_tokens_per_s``, by default the 146,000
tokens/s one H200 trains ``configs/moe_1b`` at, batch 16 x 2048 (BENCHMARKS.md,
``results/train_step_h200_moe1b_b16.json``; that config uses a 32000-piece SentencePiece
model). A ratio below 1 means the pipeline cannot keep that GPU fed on this host. The
numbers are wall-clock on a possibly shared machine: the JSON records the CPUs this
process may use and the load average before and after every configuration.

Results: ``benchmarks/results/data_pipeline_<tag>.json`` (``--tag``, default ``cpu``; or
``--out``): the environment, the command line, one row per configuration; a markdown table
is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
from importlib import metadata

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
EOT = "<|endoftext|>"


# ------------------------------------------------------------------------------ corpus


def stdlib_corpus(max_bytes: int, seed: int = 0) -> tuple[list[dict[str, str]], dict]:
    """``{'text': str}`` records of the stdlib's ``.py`` files in a fixed shuffled order,
    up to ``max_bytes`` of UTF-8 (the file that crosses the cap is left out)."""
    import pathlib
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py")
                   if not {"site-packages", "__pycache__"} & set(p.relative_to(root).parts))
    order = np.random.default_rng(seed).permutation(len(paths))
    records, sizes, skipped = [], [], 0
    total = 0
    for i in order:
        try:
            text = paths[i].read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            skipped += 1
            continue
        n = len(text.encode("utf-8"))
        if not text or total + n > max_bytes:
            continue
        records.append({"text": text})
        sizes.append(n)
        total += n
    sizes_a = np.asarray(sizes)
    info = {"root": str(root), "files_found": len(paths), "documents": len(records), "bytes": int(total),
            "unreadable": skipped, "cap_bytes": int(max_bytes),
            "doc_bytes_median": int(np.median(sizes_a)), "doc_bytes_max": int(sizes_a.max()),
            "doc_bytes_p90": int(np.percentile(sizes_a, 90))}
    return records, info


def write_jsonl(records: list[dict[str, str]], directory: str, num_files: int) -> list[str]:
    """The records dealt round-robin into ``num_files`` ``.jsonl`` files in ``directory``."""
    paths = [os.path.join(directory, f"part-{i:03d}.jsonl") for i in range(num_files)]
    handles = [open(p, "w", encoding="utf-8") for p in paths]
    try:
        for i, r in enumerate(records):
            handles[i % num_files].write(json.dumps(r, ensure_ascii=False) + "\n")
    finally:
        for h in handles:
            h.close()
    return paths


def sample_texts(records: list[dict[str, str]], max_bytes: int) -> list[str]:
    out, total = [], 0
    for r in records:
        if total >= max_bytes:
            break
        out.append(r["text"])
        total += len(r["text"].encode("utf-8"))
    return out


# -------------------------------------------------------------------------- tokenizers


def make_byte(records, args, tmp):
    from routezoo.training.data.tokenizers import ByteTokenizer
    return ByteTokenizer(), {}


def make_sentencepiece(records, args, tmp):
    from routezoo.training.data.tokenizers import SentencePieceTokenizer, train_sentencepiece
    texts = sample_texts(records, int(args.spm_sample_mb * 1e6))
    proto = train_sentencepiece(texts, args.spm_vocab)
    tok = SentencePieceTokenizer(proto)
    return tok, {"vocab_size": tok.vocab_size, "sample_bytes": sum(len(t.encode()) for t in texts)}


def make_hf(records, args, tmp):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from routezoo.training.data.tokenizers import HFTokenizer
    texts = sample_texts(records, int(args.hf_sample_mb * 1e6))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.hf_vocab, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    directory = os.path.join(tmp, "hf_bpe")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    hf = HFTokenizer(path)
    if hf.eos_id != tok.token_to_id(EOT):
        raise RuntimeError(f"HFTokenizer took eos id {hf.eos_id}, expected {EOT}'s {tok.token_to_id(EOT)}")
    return hf, {"vocab_size": hf.vocab_size, "sample_bytes": sum(len(t.encode()) for t in texts),
                "eos_id": hf.eos_id, "pad_id": hf.pad_id}


MAKERS = {"byte": make_byte, "sentencepiece": make_sentencepiece, "hf": make_hf}


def bytes_per_token(tokenizer, records, n_docs: int = 200) -> float:
    """UTF-8 bytes per token (EOS not counted) over the first ``n_docs`` documents."""
    texts = [r["text"] for r in records[:n_docs]]
    return sum(len(t.encode("utf-8")) for t in texts) / max(sum(len(tokenizer.encode(t)) for t in texts), 1)


# ---------------------------------------------------------------------------- measuring


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def close_iterator(it, row: dict) -> None:
    """Closes ``it`` and records how long that took in ``row['close_s']``."""
    t0 = time.perf_counter()
    try:
        it.close()
    except Exception as e:  # noqa: BLE001 - a failed close is reported, not fatal
        row["close_error"] = f"{type(e).__name__}: {e}"
    row["close_s"] = time.perf_counter() - t0


def measure(tokenizer, source, *, args, workers: int, packing: str) -> tuple[dict, object]:
    """Builds the dataset, takes ``args.warmup`` batches, then times batches until
    ``args.seconds`` or ``args.max_batches``; returns the row and the open iterator (the
    caller closes it)."""
    from routezoo.training.data.pipeline import train_dataset
    load_before = load_average()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    ds = train_dataset(source, tokenizer, text_key="text", seq_len=args.seq_len, batch_size=args.batch,
                       seed=args.seed, num_workers=workers, packing=packing)
    it = iter(ds)
    try:
        for _ in range(args.warmup):
            batch = next(it)
        shape, dtype = tuple(batch["inputs"].shape), str(batch["inputs"].dtype)
        if shape != (args.batch, args.seq_len) or dtype != "int32":
            raise RuntimeError(f"batch inputs are {dtype}{list(shape)}, expected int32[{args.batch}, {args.seq_len}]")
        startup = time.perf_counter() - t0
        n, weight, gaps = 0, 0.0, []
        start = last = time.perf_counter()
        while n < args.max_batches:
            batch = next(it)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            n += 1
            weight += float(batch["weights"].sum())
            if now - start >= args.seconds:
                break
        elapsed = time.perf_counter() - start
    except BaseException:
        close_iterator(it, {})
        raise
    cpu = time.process_time() - cpu0
    tokens = n * args.batch * args.seq_len
    gaps_ms = 1e3 * np.asarray(gaps)
    row = {"batches": n, "seconds": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed,
           "batches_per_s": n / elapsed, "startup_s": startup,
           "batch_ms_median": float(np.median(gaps_ms)), "batch_ms_p90": float(np.percentile(gaps_ms, 90)),
           "weighted_target_fraction": weight / max(tokens, 1),
           "main_process_cpu_s": cpu, "load_before": load_before, "load_after": load_average()}
    return row, it


def environment(affinity: int) -> dict:
    import jax
    cpu_model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                             cpu_model)
    except OSError:
        pass
    versions = {}
    for name in ("jax", "grain", "tokenizers", "sentencepiece", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu_model": cpu_model, "cpu_count": os.cpu_count(), "sched_getaffinity": affinity,
            "device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
            "python": platform.python_version(), **versions, "hostname_os": platform.platform(),
            "load_average_start": load_average()}


def worker_counts(requested: list[int], cores: int) -> list[int]:
    out = []
    for w in requested:
        w = min(w, cores) if w > 0 else 0
        if w not in out:
            out.append(w)
    return out


def configurations(args, cores: int) -> list[tuple[str, str, int, str]]:
    out = []
    workers = worker_counts([int(w) for w in args.workers.split(",")], cores)
    for tok in args.tokenizers.split(","):
        for src in args.sources.split(","):
            for w in workers:
                out.append((tok, src, w, "masked"))
                if tok == "byte" and w == 0 and "eos" in args.packings.split(","):
                    out.append((tok, src, w, "eos"))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=16, help="rows per batch (per host)")
    p.add_argument("--seconds", type=float, default=8.0, help="time budget per configuration (after warm-up)")
    p.add_argument("--max_batches", type=int, default=2000, help="batch budget per configuration")
    p.add_argument("--warmup", type=int, default=3, help="batches taken before the timing")
    p.add_argument("--tokenizers", default="byte,sentencepiece,hf")
    p.add_argument("--sources", default="memory,files")
    p.add_argument("--workers", default="0,2,4", help="num_workers values (capped at the usable CPUs)")
    p.add_argument("--packings", default="masked,eos", help="'eos' runs for byte, in-process, only")
    p.add_argument("--corpus_mb", type=float, default=40.0, help="cap on the corpus, MB of UTF-8")
    p.add_argument("--num_files", type=int, default=8, help=".jsonl files of the 'files' source")
    p.add_argument("--spm_vocab", type=int, default=4096)
    p.add_argument("--spm_sample_mb", type=float, default=2.0, help="corpus MB SentencePiece trains on")
    p.add_argument("--hf_vocab", type=int, default=16384)
    p.add_argument("--hf_sample_mb", type=float, default=8.0, help="corpus MB the byte-level BPE trains on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--consumer_tokens_per_s", type=float, default=146000.0,
                   help="tokens/s a training step consumes (default: configs/moe_1b on one H200, batch 16 x 2048)")
    p.add_argument("--tag", default="cpu", help="results file benchmarks/results/data_pipeline_<tag>.json")
    p.add_argument("--out", default="", help="results file (overrides --tag)")
    p.add_argument("--device_note", default="", help="free text stored with the results (hardware, load)")
    args = p.parse_args()
    for name in args.tokenizers.split(","):
        if name not in MAKERS:
            p.error(f"unknown tokenizer {name!r}; allowed: {', '.join(MAKERS)}")
    for name in args.sources.split(","):
        if name not in ("memory", "files"):
            p.error(f"unknown source {name!r}; allowed: memory, files")
    out_path = args.out or os.path.join(RESULTS, f"data_pipeline_{args.tag}.json")

    # grain's worker processes read its absl flags: parse them (no absl flags of our own).
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS([sys.argv[0]])

    t_start = time.perf_counter()
    affinity = len(os.sched_getaffinity(0))
    env = environment(affinity)
    records, corpus = stdlib_corpus(int(args.corpus_mb * 1e6), seed=args.seed)
    print(f"[{time.perf_counter() - t_start:.0f} s] corpus: {corpus['documents']} stdlib .py files, {corpus['bytes'] / 1e6:.1f} MB "
          f"(median {corpus['doc_bytes_median']} B, max {corpus['doc_bytes_max']} B)", flush=True)

    from routezoo.training.data.sources import DocumentStream
    tmp = tempfile.mkdtemp(prefix="data_pipeline_")
    rows, tokenizers_info, closers = [], {}, []
    try:
        files = write_jsonl(records, tmp, args.num_files)
        sources = {"memory": records,
                   "files": DocumentStream(files, text_key="text", txt_unit="file", split="all",
                                           eval_fraction=0.0, shuffle_buffer=1024)}
        built = {}
        for name in args.tokenizers.split(","):
            t0 = time.perf_counter()
            try:
                tok, info = MAKERS[name](records, args, tmp)
            except Exception as e:  # noqa: BLE001 - report and go on
                tokenizers_info[name] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
                print(f"tokenizer {name}: {tokenizers_info[name]['error']}", flush=True)
                continue
            info.update(train_s=time.perf_counter() - t0, bytes_per_token=bytes_per_token(tok, records),
                        done_at_s=time.perf_counter() - t_start)
            tokenizers_info[name] = info
            built[name] = tok
            print(f"tokenizer {name}: {json.dumps(info)}", flush=True)
        for tok_name, src, workers, packing in configurations(args, affinity):
            row = {"tokenizer": tok_name, "source": src, "workers": workers, "packing": packing}
            if tok_name not in built:
                row["error"] = "tokenizer not built: " + tokenizers_info[tok_name]["error"]
            else:
                try:
                    measured, it = measure(built[tok_name], sources[src], args=args, workers=workers,
                                           packing=packing)
                    row.update(measured)
                    # grain's close of a worker pool can block for up to 25 s (see the module
                    # docstring): close in the background, join before writing the results.
                    closer = threading.Thread(target=close_iterator, args=(it, row), daemon=True)
                    closer.start()
                    closers.append(closer)
                    row["x_consumer"] = row["tokens_per_s"] / args.consumer_tokens_per_s
                    row["text_mb_per_s"] = row["tokens_per_s"] * tokenizers_info[tok_name]["bytes_per_token"] / 1e6
                except Exception as e:  # noqa: BLE001 - report and go on (e.g. workers not starting)
                    row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
            row["done_at_s"] = time.perf_counter() - t_start
            rows.append(row)
            print(json.dumps(row), flush=True)
        for closer in closers:
            closer.join()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    env["load_average_end"] = load_average()
    wall = time.perf_counter() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump({"environment": env, "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                   "args": vars(args), "device_note": args.device_note, "corpus": corpus,
                   "tokenizers": tokenizers_info, "unit": "tokens/s (batch * seq_len per batch)",
                   "rows": rows, "wall_s": wall}, f, indent=2)

    print(f"\nwrote {out_path} ({wall:.0f} s)")
    print(f"{env['cpu_model']}, {env['cpu_count']} CPUs ({affinity} usable per sched_getaffinity), "
          f"load {env['load_average_start']} -> {env['load_average_end']}; python {env['python']}, "
          f"jax {env['jax']}, grain {env['grain']}, tokenizers {env['tokenizers']}, "
          f"sentencepiece {env['sentencepiece']}")
    print(f"batch {args.batch} x {args.seq_len}, {args.seconds:g} s or {args.max_batches} batches per row after "
          f"{args.warmup} warm-up; consumer: {args.consumer_tokens_per_s:,.0f} tokens/s "
          f"(moe_1b train step on one H200)\n")
    print("| tokenizer | source | workers | packing | tokens/s | x consumer |")
    print("|---|---|---:|---|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['tokenizer']} | {r['source']} | {r['workers']} | {r['packing']} | error | "
                  f"{r['error'][:80]} |")
        else:
            print(f"| {r['tokenizer']} | {r['source']} | {r['workers']} | {r['packing']} | "
                  f"{r['tokens_per_s']:,.0f} | {r['x_consumer']:.2f} |")


if __name__ == "__main__":
    main()
