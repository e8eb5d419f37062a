"""Operations on trained MoE models, measured: one entry point over the per-operation scripts.

    # a 2-core CPU (tiny models; merge/compress/null experts about 6 min a seed, upcycle/
    # unlearn/layer_skip about 15 min a seed)
    python benchmarks/transform_quality.py --size tiny --seeds 3 --root runs/transform_quality
    # one GPU (larger models: a 12-layer dense model and its MoE for upcycle/unlearn/skip;
    # pass a trained leaderboard-size MoE run with --moe_source for merge and null experts)
    python benchmarks/transform_quality.py --size small --seeds 3 --root runs/transform_quality \\
        --moe_source runs/leaderboard_moe

Runs, per seed, ``benchmarks/transforms/merge_experts.py`` (``merge`` 8->4 and 8->2 with
MC-SMoE, averaging and pruning at equal size, and ``add_null_experts``, each against the source
before and after the same fine-tune) and ``benchmarks/transforms/upcycle_unlearn_skip.py``
(``upcycle`` against continued dense training and an MoE from scratch at equal tokens,
``unlearn`` against whole-model unlearning, ``layer_skip`` at several speed-ups), each into
its own workdirs under ``--root/seed<N>/``, and writes ``--root/summary.json`` with every
seed's rows. ``--only merge`` or ``--only upcycle`` runs one of the two.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "transforms"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("tiny", "small"), default="tiny")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--root", required=True, help="a new directory for every workdir")
    ap.add_argument("--moe_source", default="", help="a trained MoE run for merge and null experts "
                    "('' = the tiny one merge_experts.py trains per seed)")
    ap.add_argument("--only", choices=("", "merge", "upcycle"), default="")
    a = ap.parse_args(argv)
    import merge_experts
    import upcycle_unlearn_skip

    summary = {"size": a.size, "seeds": a.seeds, "merge": [], "upcycle": []}
    for seed in range(a.seeds):
        root = os.path.join(os.path.abspath(a.root), f"seed{seed}")
        if a.only in ("", "merge"):
            args = ["--workdir", os.path.join(root, "merge"), "--seed", str(seed)]
            if a.moe_source:
                args += ["--source", a.moe_source]
            res = merge_experts.run(args)
            print(res["table"], flush=True)
            summary["merge"].append(res["rows"])
        if a.only in ("", "upcycle"):
            ns = argparse.Namespace(size=a.size, root=os.path.join(root, "upcycle"), json="", forget="email",
                                    unlearn_lr=1e-3, dense_steps=0, more_steps=0, unlearn_steps=0, seed=seed)
            res = upcycle_unlearn_skip.run(ns)
            print(upcycle_unlearn_skip.tables(res), flush=True)
            summary["upcycle"].append(res)
        with open(os.path.join(os.path.abspath(a.root), "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
