"""The full CPU benchmark in one command: scan, layers, LM training, generation.

    python -m benchmarks.run_all [--quick] [--out DIR]
    python -m benchmarks.run_all --out benchmarks/results   # refresh the committed files

Run it on a quiet machine; it prints the markdown reports, and with ``--out``
writes ``bench_scan.{md,json}``, ``bench_layers.{md,json,png}``,
``bench_train.json`` and ``bench_generate.json`` into that folder.  Without
``--out`` (the default) nothing is written, so ``--quick`` (a check of the
harness) never overwrites the committed results.  On a GPU machine run
``benchmarks/gpu/run.sh`` as well.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from benchmarks import bench_generate, bench_layers, bench_scan, bench_train, harness


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="pass --quick to every script: a check of the harness, not a "
                        "measurement (default: off, the full run)")
    p.add_argument("--out", default=None,
                   help="write every script's results into this folder (default: print "
                        "only; --out benchmarks/results refreshes the committed files)")
    harness.add_malloc_flag(p)  # passed on; each script applies it before it computes
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    extra = (["--quick"] if args.quick else []) + ["--malloc", args.malloc]

    def out(name: Optional[str] = None):
        if not args.out:
            return []
        return ["--out", args.out if name is None else os.path.join(args.out, name)]

    bench_scan.main(extra + out())
    bench_layers.main(extra + out())
    bench_train.main(extra + out("bench_train.json"))
    bench_generate.main(extra + out("bench_generate.json"))
    print(f"\nrun_all: {time.perf_counter() - t0:.0f} s in total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
