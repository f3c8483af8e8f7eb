"""Timing, machine-floor and reporting helpers shared by the benchmark scripts.

Everything here is measured with ``jax.jit`` and ``block_until_ready``; a
timing is the median of repeated calls after one warm-up call (the warm-up
call is never counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from flax_minrnn.training import runtime as runtime

F32_BYTES = 4
REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------
# Repeat policy and timing.


@dataclasses.dataclass(frozen=True)
class Repeats:
    """How many timed calls to make after the warm-up call.

    At least ``min_n`` and at most ``max_n`` calls; after ``min_n`` calls the
    loop stops as soon as ``budget_s`` seconds of timed calls have been spent.
    """

    max_n: int = 10
    min_n: int = 3
    budget_s: float = 2.0


def time_calls(fn: Callable, args: Sequence[Any], repeats: Repeats) -> Dict[str, Any]:
    """Median wall time (ms) of ``fn(*args)`` after one warm-up call."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    warmup_s = time.perf_counter() - t0
    times = []
    spent = 0.0
    while len(times) < repeats.max_n:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if len(times) >= repeats.min_n and spent >= repeats.budget_s:
            break
    ms = [t * 1e3 for t in times]
    return dict(median_ms=statistics.median(ms), min_ms=min(ms), max_ms=max(ms),
                n=len(ms), warmup_ms=warmup_s * 1e3)


def interleaved(calls: Dict[Any, Tuple[Callable, Sequence[Any]]], rounds: int,
                clock: Callable[[], float] = time.perf_counter,
                warmup_rounds: int = 1) -> Dict[Any, List[float]]:
    """Wall times (ms) of ``rounds`` calls of each ``fn(*args)`` in ``calls``,
    every entry once per round, after ``warmup_rounds`` untimed rounds.

    Rounds ``2s`` and ``2s + 1`` run the entries rotated by ``s``, the second
    of them in reverse.  Over ``2 * len(calls)`` rounds every entry runs twice
    in every position, and every entry runs right after every other as often
    as right before it.  A fixed order charges one entry, every round, with
    what the entry before it leaves behind or warms up (caches, the
    allocator's free lists, the clock speed).  The untimed rounds let the
    process settle (thread pool, allocator) with every entry run once.
    """
    keys = list(calls)
    times: Dict[Any, List[float]] = {k: [] for k in keys}
    for r in range(-warmup_rounds, rounds):
        shift = (r // 2) % len(keys) if keys else 0
        order = keys[shift:] + keys[:shift]
        for k in (reversed(order) if r % 2 else order):
            fn, args = calls[k]
            t0 = clock()
            jax.block_until_ready(fn(*args))
            if r >= 0:
                times[k].append((clock() - t0) * 1e3)
    return times


def rounds_within(repeats: Repeats, call_ms: Sequence[float]) -> int:
    """Rounds of :func:`interleaved` that give each entry what
    :func:`time_calls` would: at least ``min_n`` and at most ``max_n``
    calls, and after ``min_n`` no more than ``budget_s`` seconds per entry
    on average, judged by ``call_ms`` (one call of each entry, in ms).
    0 without entries."""
    if not call_ms:
        return 0
    mean_s = sum(call_ms) / len(call_ms) / 1e3
    by_budget = math.ceil(repeats.budget_s / mean_s) if mean_s > 0 else repeats.max_n
    return max(repeats.min_n, min(repeats.max_n, by_budget))


def compile_timed(fn: Callable, *args) -> Tuple[Any, float]:
    """``jax.jit(fn).lower(*args).compile()`` and its wall time in seconds.

    ``fn`` should be a fresh Python function (a new closure) so that no jit
    cache of an earlier call is hit.
    """
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def memory_stats(compiled) -> Optional[Dict[str, int]]:
    """``compiled.memory_analysis()`` as a dict (``None`` if unavailable).

    ``peak_bytes`` = arguments + outputs + temporaries - aliased bytes: what
    the executable holds at most, buffers included (XLA's own estimate).
    """
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if ma is None:
        return None
    fields = ["temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes"]
    out = {f: int(getattr(ma, f, 0) or 0) for f in fields}
    out["peak_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                         + out["temp_size_in_bytes"] - out["alias_size_in_bytes"])
    return out


# ----------------------------------------------------------------------------
# Machine floor: memory bandwidth and matrix products timed alone.


def measure_bandwidth(n_bytes: int, repeats: Repeats) -> Dict[str, float]:
    """Streaming bandwidth of a jitted ``x + 1.0`` over a float32 array.

    Bytes moved per call = ``2 * n_bytes`` (read x, write the result), in two
    variants, both reported:

    * ``fresh``: ``y = x + 1.0`` into a newly allocated output every call (the
      plain jitted call).  On CPU this includes the first-touch page faults of
      the freshly mapped output buffer, which large outputs pay on every call.
    * ``inplace``: the same with ``donate_argnums=0`` (the output reuses the
      input's buffer): pure streaming, no new pages.

    ``bytes_per_s`` (what the floor uses) is the in-place bandwidth from the
    fastest call (the machine's capability: a floor); medians are reported too.
    """
    n = max(1, n_bytes // F32_BYTES)
    moved = 2 * n * F32_BYTES
    x = jnp.arange(n, dtype=jnp.float32)
    fresh = time_calls(jax.jit(lambda v: v + 1.0), (x,), repeats)
    del x
    step = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    y = step(jnp.zeros((n,), jnp.float32))  # warm-up (compile + first pages)
    jax.block_until_ready(y)
    times = []
    spent = 0.0
    while len(times) < repeats.max_n:
        t0 = time.perf_counter()
        y = step(y)
        jax.block_until_ready(y)
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if len(times) >= repeats.min_n and spent >= repeats.budget_s:
            break
    del y
    inplace_min, inplace_med = min(times), statistics.median(times)
    return dict(array_bytes=n * F32_BYTES, bytes_moved=moved,
                bytes_per_s=moved / inplace_min,
                inplace_min_ms=inplace_min * 1e3, inplace_median_ms=inplace_med * 1e3,
                inplace_bytes_per_s_median=moved / inplace_med,
                fresh_min_ms=fresh["min_ms"], fresh_median_ms=fresh["median_ms"],
                fresh_bytes_per_s=moved / (fresh["min_ms"] / 1e3),
                fresh_bytes_per_s_median=moved / (fresh["median_ms"] / 1e3),
                n=len(times))


_MATMUL_CACHE: Dict[Tuple[int, int, int, str], float] = {}


def matmul_ms(m: int, k: int, n: int, which: str, repeats: Repeats,
              dtype=jnp.float32) -> float:
    """Fastest (min) ms of one jitted matrix product of a ``(m, k) x (k, n)`` layer.

    The minimum over the repeats, not the median: this is a floor (what the
    machine can do), and the minimum is the least disturbed by other load.

    ``which``: ``"fwd"`` = ``x @ W`` (m,k)x(k,n); ``"dW"`` = ``x^T g``
    (k,m)x(m,n); ``"dx"`` = ``g W^T`` (m,n)x(n,k).  Cached per shape.
    """
    key = (m, k, n, which, jnp.dtype(dtype).name)
    if key in _MATMUL_CACHE:
        return _MATMUL_CACHE[key]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32), dtype)
    w = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32), dtype)
    g = jnp.asarray(rng.standard_normal((m, n), dtype=np.float32), dtype)
    if which == "fwd":
        f, args = jax.jit(lambda a, b: a @ b), (x, w)
    elif which == "dW":
        f, args = jax.jit(lambda a, b: a.T @ b), (x, g)
    elif which == "dx":
        f, args = jax.jit(lambda a, b: a @ b.T), (g, w)
    else:
        raise ValueError(which)
    ms = time_calls(f, args, repeats)["min_ms"]
    _MATMUL_CACHE[key] = ms
    return ms


# ----------------------------------------------------------------------------
# Allocator setting (flax_minrnn.training.runtime.tune_cpu_malloc).

_malloc_setting = "default"


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_report_flags(parser, stem: str, lengths: Sequence[int] = (1024, 4096)) -> None:
    """``--T``, ``--out`` and ``--malloc`` of a script that reports through
    :func:`emit_report` under the name ``stem``."""
    parser.add_argument("--T", type=positive_int, nargs="+", default=list(lengths),
                        help="sequence lengths (default: "
                             f"{' '.join(str(t) for t in lengths)})")
    parser.add_argument("--out", default=None,
                        help=f"write {stem}.json and {stem}.md here (default: print only)")
    add_malloc_flag(parser)


def add_malloc_flag(parser) -> None:
    """``--malloc {default,tuned}`` (default ``default``) on a benchmark's parser.

    The default measures what users get: a plain Python process, nothing
    tuned.  ``tuned`` is reported beside it, never instead of it.
    """
    parser.add_argument(
        "--malloc", choices=runtime.MALLOC_SETTINGS, default="default",
        help="default (the default): leave glibc as it is, as a user's process does; "
             "tuned: call flax_minrnn.tune_cpu_malloc() before the first JAX computation "
             "(freed memory is reused, no page faults on fresh buffers). Every row of one "
             "run uses the same setting. Default: default.")


def apply_malloc(setting: str) -> str:
    """Applies ``--malloc`` (call before any JAX computation); returns what took effect.

    ``tuned`` is only recorded as ``tuned`` when the settings took effect (glibc,
    backends not yet started); otherwise ``default``.  ``machine_info`` reports it.
    """
    global _malloc_setting
    _malloc_setting = runtime.apply_malloc_setting(setting)
    return _malloc_setting


# ----------------------------------------------------------------------------
# Machine description.


def git(*args: str, repo: os.PathLike = REPO, timeout_s: float = 30.0
        ) -> subprocess.CompletedProcess:
    """``git -C repo *args`` (text, output captured, no check); raises
    ``OSError`` when git cannot run and ``subprocess.TimeoutExpired``."""
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          timeout=timeout_s, check=False)


def git_state(repo: os.PathLike = REPO) -> Dict[str, Any]:
    """``git_commit`` (``git rev-parse HEAD``) and ``git_dirty`` (``git status
    --porcelain`` is not empty) of ``repo``; both ``None`` where git is
    missing or ``repo`` is not a git checkout."""
    try:
        head = git("rev-parse", "HEAD", repo=repo)
        if head.returncode != 0:
            return dict(git_commit=None, git_dirty=None)
        status = git("status", "--porcelain", repo=repo)
    except (OSError, subprocess.SubprocessError):
        return dict(git_commit=None, git_dirty=None)
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return dict(git_commit=head.stdout.strip() or None, git_dirty=dirty)


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (``2026-12-07T09:15:02+00:00``)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def machine_info() -> Dict[str, Any]:
    """The machine, the software, when (UTC) and at which commit of this
    repository (``git_commit``, ``git_dirty``: ``None`` without git)."""
    import flax

    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = jax.devices()[0]
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "utc_time": utc_now(),
        **git_state(),
        "processor": platform.processor(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "n_devices": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "malloc": _malloc_setting,
        "loadavg_at_start": load,
    }


# Where a version of the package keeps its compiled kernels' module: today's
# layout, then the flat one of earlier versions (93fcfe8, say).
_NATIVE_MODULES = ("backends.native", "native")


def native_kernels(package: str = "flax_minrnn") -> Dict[str, Any]:
    """Whether ``package``'s compiled CPU kernels (``backends.native``, or
    ``native`` in earlier versions) were built and loaded: ``{"available":
    bool, "reason": str or None}``.  Without them ``scan_impl="native"``
    (and an earlier version's ``auto``) runs pure JAX, so such a row says
    nothing about the kernels unless this is ``True``.  ``available`` is
    ``None`` when the package has no such module (or asking it failed).

    Call it after the timings: the first ``available()`` of a process builds
    the kernels when no row has yet."""
    import importlib  # pylint: disable=import-outside-toplevel
    native, errors = None, []
    for name in _NATIVE_MODULES:
        try:
            native = importlib.import_module(f"{package}.{name}")
            break
        except ImportError as e:
            errors.append(f"{type(e).__name__}: {e}")
    if native is None:
        return dict(available=None, reason="; ".join(errors))
    try:
        ok = bool(native.available())
    except Exception as e:  # noqa: BLE001 - a failed build
        return dict(available=None, reason=f"{type(e).__name__}: {e}")
    reason = None
    if not ok and hasattr(native, "unavailable_reason"):
        reason = native.unavailable_reason()
    return dict(available=ok, reason=reason)


def native_note(status: Optional[Dict[str, Any]],
                fallback: str = "`native` rows ran `chunked`") -> str:
    """One phrase for a report: whether the compiled kernels ran
    (``fallback``: what ran instead where they did not)."""
    if not status:
        return "compiled kernels: not recorded"
    if status.get("available"):
        return "compiled kernels: loaded"
    if status.get("available") is None:
        return f"compiled kernels: unknown ({status.get('reason')})"
    return f"compiled kernels: unavailable, {fallback} ({status.get('reason')})"


def machine_line(machine: Dict[str, Any], *, malloc: bool = True) -> str:
    """A report's header line from :func:`machine_info`: ``Machine: <cpu>
    (<n> CPUs), backend <b>, jax <v>, malloc <m>; <run_stamp>`` (without the
    malloc setting for a script that has none)."""
    m = machine
    line = (f"Machine: {m['cpu_model'] or m['processor']} ({m['cpu_count']} CPUs), backend "
            f"{m['backend']}, jax {m['jax_version']}")
    if malloc:
        line += f", malloc {m.get('malloc')}"
    return f"{line}; {run_stamp(m)}"


def run_stamp(machine: Dict[str, Any]) -> str:
    """When and at which commit a run was made, for a report's header, from
    :func:`machine_info` (older results lack the keys: "not recorded")."""
    when = machine.get("utc_time") or "date not recorded"
    commit = machine.get("git_commit")
    if not commit:
        return f"{when}, commit not recorded"
    dirty = " with local changes" if machine.get("git_dirty") else ""
    return f"{when}, commit {commit[:12]}{dirty}"


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as JSON to ``path``, creating its folder if needed."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=False, default=_json_default)


def write_report(res: Any, out_dir: str, stem: str, markdown: str) -> Dict[str, str]:
    """Writes ``{stem}.json`` (``res``) and ``{stem}.md`` into ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"{stem}.{k}") for k in ("json", "md")}
    write_json(paths["json"], res)
    with open(paths["md"], "w") as fh:
        fh.write(markdown + "\n")
    return paths


def emit_report(res: Any, markdown: str, out_dir: Optional[str], stem: str) -> None:
    """Prints ``markdown``; with ``out_dir``, also writes it and ``res``
    there (:func:`write_report`)."""
    print(markdown)
    if out_dir:
        paths = write_report(res, out_dir, stem, markdown)
        print(f"\nwrote {', '.join(paths.values())}")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def md_row(cells: Sequence[Any]) -> str:
    """One Markdown table row of ``cells``."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "–"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def fmt_ratio(r: Optional[float]) -> str:
    if r is None:
        return "–"
    if r >= 10:
        return f"{r:.0f}×"
    return f"{r:.1f}×"
