"""Operations on trained MoE models, measured: one entry point over the per-operation scripts.

    # a 2-core CPU (tiny models; merge/compress/null experts about 6 min a seed, upcycle/
    # unlearn/layer_skip about 15 min a seed)
    python benchmarks/transform_quality.py --size tiny --seeds 3 --root runs/transform_quality
    # one GPU (the router leaderboard's medium MoE, 8 layers, d_model 512, as the merge source;
    # an 8-layer dense model and its MoE for upcycle/unlearn/skip): one call per seed and part,
    # each well inside 10 minutes, resumable
    python benchmarks/transform_quality.py --size small --seed_ids 0 --only merge --root runs/tq --resume
    python benchmarks/transform_quality.py --size small --seed_ids 0 --only upcycle --root runs/tq --resume

Runs, per seed, ``benchmarks/transforms/merge_experts.py`` (``merge`` 8->4 and 8->2 with
MC-SMoE, averaging and pruning at equal size, and ``add_null_experts``, each against the source
before and after the same fine-tune) and ``benchmarks/transforms/upcycle_unlearn_skip.py``
(``upcycle`` against continued dense training and an MoE from scratch at equal tokens,
``unlearn`` against whole-model unlearning, ``layer_skip`` at several speed-ups), each into
its own workdirs under ``--root/seed<N>/``. Each finished part writes
``--root/seed<N>/{merge,upcycle}.json``; ``--root/summary.json`` joins every part found under
``--root`` (parts of other calls too). ``--only merge`` or ``--only upcycle`` runs one of the
two; ``--resume`` keeps finished parts and continues a part that was cut off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "transforms"))


def summarize(root: str) -> dict:
    """Every finished part under ``root`` (``seed<N>/{merge,upcycle}.json``), by seed."""
    summary: dict = {"seeds": [], "merge": [], "upcycle": []}
    names = [n for n in os.listdir(root) if n.startswith("seed") and n[4:].isdigit()]
    for name in sorted(names, key=lambda n: int(n[4:])):
        seed = int(name[4:])
        for part in ("merge", "upcycle"):
            path = os.path.join(root, name, f"{part}.json")
            if os.path.exists(path):
                with open(path) as f:
                    summary[part].append({"seed": seed, **json.load(f)})
                if seed not in summary["seeds"]:
                    summary["seeds"].append(seed)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("tiny", "small"), default="tiny")
    ap.add_argument("--seeds", type=int, default=3, help="run seeds 0 .. N-1")
    ap.add_argument("--seed_ids", default="", help="these seeds instead, comma-separated (e.g. 1 or 0,2)")
    ap.add_argument("--root", required=True, help="a new directory for every workdir (or, with --resume, "
                                                  "one holding earlier parts)")
    ap.add_argument("--moe_source", default="", help="a trained MoE run for merge and null experts "
                    "('' = the one of --size merge_experts.py trains per seed)")
    ap.add_argument("--only", choices=("", "merge", "upcycle"), default="")
    ap.add_argument("--resume", action="store_true", help="keep finished parts; continue one that was cut off")
    a = ap.parse_args(argv)
    import merge_experts
    import upcycle_unlearn_skip

    seeds = [int(x) for x in a.seed_ids.split(",") if x.strip()] if a.seed_ids else list(range(a.seeds))
    top = os.path.abspath(a.root)
    for seed in seeds:
        root = os.path.join(top, f"seed{seed}")
        os.makedirs(root, exist_ok=True)
        for part in ("merge", "upcycle"):
            out = os.path.join(root, f"{part}.json")
            if a.only not in ("", part) or (a.resume and os.path.exists(out)):
                continue
            if part == "merge":
                args = ["--workdir", os.path.join(root, "merge"), "--seed", str(seed), "--size", a.size]
                args += ["--source", a.moe_source] if a.moe_source else []
                args += ["--resume"] if a.resume else []
                res = merge_experts.run(args)
                print(res["table"], flush=True)
                res = {"rows": res["rows"]}
            else:
                ns = argparse.Namespace(size=a.size, root=os.path.join(root, "upcycle"), json="", forget="email",
                                        unlearn_lr=1e-3, dense_steps=0, more_steps=0, unlearn_steps=0, seed=seed,
                                        resume=a.resume)
                res = upcycle_unlearn_skip.run(ns)
                print(upcycle_unlearn_skip.tables(res), flush=True)
            with open(out, "w") as f:
                json.dump(res, f, indent=1, default=float)
            write_summary(top, a.size)
    write_summary(top, a.size)
    return 0


def write_summary(top: str, size: str) -> None:
    with open(os.path.join(top, "summary.json"), "w") as f:
        json.dump({"size": size, **summarize(top)}, f, indent=1, default=float)


if __name__ == "__main__":
    sys.exit(main())
