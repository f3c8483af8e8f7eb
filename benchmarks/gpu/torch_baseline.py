"""``torch.nn.GRU`` (cuDNN) forward+backward and a device-to-device copy.

Run by :mod:`benchmarks.gpu.bench` in a process of its own: PyTorch and JAX
each load their own CUDA libraries (cuDNN among them), and one process per
framework keeps their versions apart.  Writes one JSON file (rewritten after
every measurement, so a run cut short keeps what it measured)::

    python3 -m benchmarks.gpu.torch_baseline --out /tmp/torch.json \
        --T 512 1024 --batch 8 --d 256 --min-calls 20 --budget-s 60

Timing is the same as the JAX side's: wall time of one call ended by
``torch.cuda.synchronize()``, median of at least ``--min-calls`` calls after
two warm-up calls.  A ``T`` whose warm-up calls say that ``--min-calls`` calls
would take more than ``--case-cap-s`` or the time left is skipped (recorded,
with the warm-up time).

The GRU is the minGRU paper's baseline: ``torch.nn.GRU(d, d,
batch_first=True)`` in float32 on ``(batch, T, d)``, gradients of
``sum(y * g)`` (``g`` a fixed random cotangent) with respect to the input
and every parameter, through ``torch.autograd.grad`` (no accumulation into
``.grad``).  Without PyTorch the file says so (``status: skipped``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence


def _write(path: str, obj: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def _get(fn: Callable[[], Any]) -> Any:
    """``fn()`` as a JSON value, or the error's text (flags move between versions)."""
    try:
        v = fn()
        return v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
    except Exception as e:  # noqa: BLE001 - informative only
        return f"unavailable: {type(e).__name__}"


def _timed(call: Callable[[], Any], sync: Callable[[], None], min_calls: int,
           left_s: float, target_s: float = 0.3, max_calls: int = 200) -> Dict[str, Any]:
    """Median wall ms of ``call`` after two warm-up calls (or a skip record).

    The first call of a shape pays cuDNN's set-up (seconds); the budget is
    judged on the second.
    """
    t0 = time.perf_counter()
    call()
    sync()
    setup = time.perf_counter() - t0
    if setup > left_s:
        return dict(status="skipped", first_call_ms=setup * 1e3,
                    reason=f"the first call took {setup:.3f} s > the {left_s:.0f} s left")
    t0 = time.perf_counter()
    call()
    sync()
    first = time.perf_counter() - t0
    if min_calls * first > left_s - setup:
        return dict(status="skipped", first_call_ms=first * 1e3,
                    reason=f"{min_calls} calls of {first:.3f} s exceed the {left_s:.0f} s left")
    n = int(min(max_calls, max(min_calls, target_s / max(first, 1e-6))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return dict(status="ok", median_ms=statistics.median(times), min_ms=min(times),
                max_ms=max(times), n=n, first_call_ms=setup * 1e3)


def run(ts: Sequence[int], batch: int, d: int, min_calls: int, copy_bytes: int,
        budget_s: float, out: Optional[str] = None, case_cap_s: float = 10.0
        ) -> Dict[str, Any]:
    t_start = time.perf_counter()
    left = lambda: budget_s - (time.perf_counter() - t_start)
    res: Dict[str, Any] = dict(status="running", batch=batch, d=d, min_calls=min_calls,
                               case_cap_s=case_cap_s)
    save = (lambda: _write(out, res)) if out else (lambda: None)
    try:
        import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        res.update(status="skipped", reason=f"torch not importable: {e}")
        save()
        return res
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res["machine"] = dict(
        torch_version=torch.__version__, cuda=torch.version.cuda, device=str(dev),
        device_name=_get(lambda: torch.cuda.get_device_name(0)) if cuda else "cpu",
        cudnn_available=_get(torch.backends.cudnn.is_available),
        cudnn_enabled=_get(lambda: torch.backends.cudnn.enabled),
        cudnn_version=_get(torch.backends.cudnn.version) if cuda else None,
        cudnn_allow_tf32=_get(lambda: torch.backends.cudnn.allow_tf32),
        matmul_allow_tf32=_get(lambda: torch.backends.cuda.matmul.allow_tf32),
        float32_matmul_precision=_get(torch.get_float32_matmul_precision),
        import_and_init_s=None)
    torch.zeros(1, device=dev)
    sync()
    res["machine"]["import_and_init_s"] = time.perf_counter() - t_start
    save()

    # Device-to-device copy: bytes read + written per second.
    try:
        n = max(1, copy_bytes // 4)
        src = torch.ones(n, dtype=torch.float32, device=dev)
        dst = torch.empty_like(src)
        r = _timed(lambda: dst.copy_(src), sync, min_calls, min(case_cap_s, max(left(), 0.0)))
        if r["status"] == "ok":
            moved = 2 * n * 4
            r.update(bytes_moved=moved, bytes_per_s_median=moved / (r["median_ms"] / 1e3),
                     bytes_per_s_best=moved / (r["min_ms"] / 1e3))
        res["copy"] = r
        del src, dst
    except Exception as e:  # noqa: BLE001 - recorded, the GRU rows still run
        res["copy"] = dict(status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
    save()

    rows = []
    res["gru"] = rows
    for t in ts:
        row: Dict[str, Any] = dict(T=t, name="torch.nn.GRU (cuDNN)" if cuda else "torch.nn.GRU (cpu)")
        rows.append(row)
        if left() <= 0:
            row.update(status="skipped", reason="torch budget spent")
            continue
        try:
            torch.manual_seed(0)
            gru = torch.nn.GRU(d, d, batch_first=True).to(dev)
            x = torch.randn(batch, t, d, device=dev, requires_grad=True)
            g = torch.randn(batch, t, d, device=dev)
            inputs = [x, *gru.parameters()]

            def call(gru=gru, x=x, g=g, inputs=inputs):
                y, _ = gru(x)
                return torch.autograd.grad(y, inputs, g)

            row.update(_timed(call, sync, min_calls, min(case_cap_s, left())))
            del gru, x, g, inputs
        except Exception as e:  # noqa: BLE001 - one T failing keeps the others
            row.update(status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
        save()
    res["status"] = "done"
    res["wall_s"] = time.perf_counter() - t_start
    save()
    return res


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write (required)")
    p.add_argument("--T", type=int, nargs="+", required=True,
                   help="sequence lengths (required)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default: %(default)s)")
    p.add_argument("--d", type=int, default=256,
                   help="input and hidden width (default: %(default)s)")
    p.add_argument("--min-calls", type=int, default=20,
                   help="timed calls per T at least, after two warm-up calls "
                        "(default: %(default)s)")
    p.add_argument("--copy-bytes", type=int, default=1 << 30,
                   help="bytes of the device-to-device copy (default: %(default)s, 1 GiB)")
    p.add_argument("--budget-s", type=float, default=60.0,
                   help="seconds for the whole run (default: %(default)s)")
    p.add_argument("--case-cap-s", type=float, default=10.0,
                   help="most seconds of timed calls per T (default: %(default)s)")
    a = p.parse_args(argv)
    run(a.T, a.batch, a.d, a.min_calls, a.copy_bytes, a.budget_s, a.out, a.case_cap_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
