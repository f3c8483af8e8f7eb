"""The full benchmark in one command: scan crossover, then the layers.

    python -m benchmarks.run_all [--quick] [--out DIR]

Run it on a quiet machine; it prints both markdown reports and writes
``bench_scan.{md,json}`` and ``bench_layers.{md,json,png}`` into ``--out``
(default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from benchmarks import bench_layers, bench_scan


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    extra = ["--quick"] if args.quick else []
    bench_scan.main(extra + ["--out", args.out])
    bench_layers.main(extra + ["--out", args.out])
    print(f"\nrun_all: {time.perf_counter() - t0:.0f} s in total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
