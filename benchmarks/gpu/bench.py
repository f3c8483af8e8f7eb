"""Issue #21's GPU measurements in one run: correctness, speed, LM training, paper runs.

Run from the repository root (``benchmarks/gpu/run.sh`` does this on the GPU
machine, with the pure-Python wheels it lacks)::

    python3 -m benchmarks.gpu.bench --out OUT                # the GPU run (~7 min)
    python3 -m benchmarks.gpu.bench --quick --out /tmp/q     # tiny sizes, any backend
    python3 -m benchmarks.gpu.bench --summary OUT/results.json   # reprint the summary

Sections, in this order, each with a time cap (``CAPS``, scaled to
``--budget-s``); a case that does not fit in its section's time left is
skipped and recorded with the reason, never run past the deadline.  Time a
section does not use passes on to the next ones; a section never eats into
the caps of the sections after it.

``setup``
    Machine (GPU name and driver from ``nvidia-smi``, jax/jaxlib/flax/torch
    versions), the scan implementations found in
    :class:`flax_minrnn.ScanImpl` (``native``, compiled CPU kernels, is
    skipped off the CPU), what ``auto`` resolves to per ``T``, and the copy
    bandwidth of the device: a jitted ``x + 1`` over a 1 GiB float32 array
    (bytes read + written per second); PyTorch's device-to-device
    ``copy_`` is measured in the ``layers`` section.
``correctness``
    Every implementation against ``sequential`` on the device: forward
    outputs and gradients (``jax.vjp`` with random cotangents on every
    output, carry included), float32 under
    ``jax.default_matmul_precision("highest")`` and bfloat16 inputs with a
    float32 state (the carry's dtype is checked).  ``linear_scan`` (the
    Pallas kernel with it, forward and reverse, one- and multi-chunk
    shapes) and each layer (MinGRU, MinLSTM, GatedLinearRNN, with an
    initial carry).  Error: ``max |x - ref| / max |ref|`` per output, the
    worst over outputs; tolerances in ``TOL``.
``scan``
    ``linear_scan(a, b)`` alone at ``(8, T, 256)`` float32, forward and
    forward+backward, per implementation: time and achieved bandwidth
    (minimum bytes: forward reads ``a, b`` and writes ``h``, ``3 B T D``
    floats; the backward pass reads ``g, a, h`` and writes ``da, db``, 5
    more) as a fraction of the copy bandwidth.
``layers``
    One layer, ``B = 8, d = 256``, forward+backward (``jax.vjp`` of the
    output with a random cotangent, gradients of the parameters and the
    input), ``T = 512 .. 16384``: MinGRU, MinLSTM, GatedLinearRNN with
    every implementation in float32, ``auto`` in bfloat16 too, against
    ``flax.linen.RNN(GRUCell)`` and ``torch.nn.GRU`` with cuDNN (in a
    subprocess, :mod:`benchmarks.gpu.torch_baseline`), and the byte floor
    of each layer (:func:`layer_min_bytes`) at the best copy bandwidth
    measured in this run.
``lm``
    Tokens/s of the trainer's step (:func:`flax_minrnn.training.train.
    make_train_step`, its AdamW) for an LM at d_model 512, T = 2048,
    batch 16, 4 blocks.
``paper``
    The first 200 steps of ``configs/shakespeare_equal_params.py:<mixing>,
    large`` and ``configs/selective_copying_ablation.py:<mixing>,3,gpu``
    (T = 4096) with the trainer's own step, dataset and optimizer (its
    learning-rate schedule for the full run), one evaluation pass timed;
    the estimate of the full run is ``first step (compile) + (num_steps -
    1) x median step + evaluations`` (checkpoints and the final sample not
    included).

Timing everywhere: ``jax.jit(f).lower(...).compile()`` timed apart, one
warm-up call, then the median of at least ``MIN_CALLS`` calls, each ended by
``block_until_ready`` (PyTorch: ``torch.cuda.synchronize()``), side by side
in this one process and run; the speed sections use the default matmul
precision of each framework.

Output, flat in ``--out``: ``results.json`` (everything, rewritten after
every section), ``time_vs_T.png`` (log-log time against T per layer and
implementation, floors dashed), ``summary.md`` (the summary table, also
printed last).  ``run.sh`` adds ``run.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

PROCESS_START = time.perf_counter()

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

RESULTS_JSON = "results.json"
PLOT_PNG = "time_vs_T.png"
SUMMARY_MD = "summary.md"

LAYERS = ("MinGRU", "MinLSTM", "GatedLinearRNN")
GRUCELL = "nn.RNN(GRUCell)"
CUDNN = "torch.nn.GRU (cuDNN)"
MIN_CALLS = 20
# Worst error, relative to the reference's largest magnitude, over every
# output and gradient.  float32: both sides run the same math in float32 at
# "highest" matmul precision, only the order of the additions differs.
# bfloat16: the projections, outputs and input gradients are bfloat16 (8 bits
# of mantissa), so one rounding flip is 2^-8 = 3.9e-3 of an element.
TOL = {"float32": 1e-4, "bfloat16": 2e-2}
# Section -> time cap in seconds at the default --budget-s (scaled with it).
CAPS = (("setup", 15.0), ("correctness", 95.0), ("scan", 40.0), ("layers", 180.0),
        ("lm", 30.0), ("paper", 80.0), ("finish", 10.0))
DEFAULT_BUDGET_S = sum(c for _, c in CAPS)
# Assumptions of the printed plan and of the skip decisions (seconds); the
# JSON records the measured compile and call times to correct them.
EST = dict(
    compile_s=1.5,             # one jit of a small fwd(+bwd) program (the 1-3 s)
    compile_pallas_s=3.0,      # the same through Triton
    compile_lm_s=10.0,         # the trainer's step of a 4-block d_model-512 LM
    compile_paper_s=22.0,      # init + train step + eval step of a paper config
    parallel_bytes_per_s=0.5e12,  # far below an H200's copy bandwidth: pessimistic
    loop_step_s=5e-6,          # per time step, sequential/chunked loops, fwd+bwd
    grucell_step_s=1e-4,       # per time step, nn.RNN(GRUCell), fwd+bwd
    call_s=3e-4,               # the fastest call (dispatch and launches)
    torch_s=30.0,              # the torch subprocess: import, init, copy, GRU x T
    lm_step_s=0.1,
    paper_step_s=0.05,
    paper_eval_s=1.5,
)
PAPER_CONFIGS = (  # (name, config path:arg), in priority order
    ("shakespeare_large_mingru", "configs/shakespeare_equal_params.py:mingru,large"),
    ("selective_copying_T4096_mingru_3", "configs/selective_copying_ablation.py:mingru,3,gpu"),
    ("selective_copying_T4096_minlstm_3", "configs/selective_copying_ablation.py:minlstm,3,gpu"),
    ("shakespeare_large_glrnn", "configs/shakespeare_equal_params.py:glrnn,large"),
    ("shakespeare_large_minlstm", "configs/shakespeare_equal_params.py:minlstm,large"),
)
LM_CASES = (("mingru", "float32"), ("mingru", "bfloat16"), ("minlstm", "float32"),
            ("glrnn", "float32"))
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Implementations whose parallel depth is O(log T) or a GPU kernel (for the
# plan's call-time estimate only); the others loop over time.
PARALLEL_IMPLS = ("auto", "associative", "pallas")
# Implementations defined for positive states only (a, b, h0 >= 0), checked
# on inputs in that domain (positive b and h0; layers with the positive
# candidate g() and a positive carry).  None today: the log-space scans are
# test references (tests/reference.py), not implementations.
POSITIVE_IMPLS = ()
# The implementations the issue names; any other one found in ScanImpl is
# measured after them (tier "extra"), in the time left.
CORE_IMPLS = ("auto", "associative", "sequential", "chunked", "pallas")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one run (``FULL`` on the GPU, ``QUICK`` to check the code)."""

    quick: bool
    batch: int
    d: int
    ts: Tuple[int, ...]
    scan_ts_all_impls: Tuple[int, ...]   # T at which every impl runs the scan alone
    layer_ts_all_impls: Tuple[int, ...]  # first T of MinLSTM/GLRNN's other impls
    min_calls: int
    copy_bytes: int
    corr_scan: Tuple[Tuple[Tuple[int, int, int], bool, str], ...]  # (shape, reverse, dtype)
    corr_layer: Tuple[int, int, int]      # (B, T, d)
    lm: Dict[str, int]
    lm_steps: int
    paper_steps: int
    case_cap_s: float                     # most seconds of timed calls per case
    torch_cap_s: float
    lm_cases: Tuple[Tuple[str, str], ...] = LM_CASES
    paper_configs: Tuple[Tuple[str, str], ...] = PAPER_CONFIGS
    impls: Optional[Tuple[str, ...]] = None  # None: every ScanImpl the backend runs


FULL = Settings(
    quick=False, batch=8, d=256, ts=(512, 1024, 2048, 4096, 8192, 16384),
    scan_ts_all_impls=(4096, 16384), layer_ts_all_impls=(512, 4096, 16384),
    min_calls=MIN_CALLS, copy_bytes=1 << 30,
    corr_scan=(((2, 1000, 96), False, "float32"), ((2, 1000, 96), True, "float32"),
               ((3, 17, 8), False, "float32"), ((2, 1000, 96), False, "bfloat16")),
    corr_layer=(3, 520, 64),
    lm=dict(batch=16, seq_len=2048, d_model=512, n_layer=4, vocab=256),
    lm_steps=20, paper_steps=200, case_cap_s=10.0, torch_cap_s=45.0)

QUICK = Settings(
    quick=True, batch=2, d=8, ts=(16, 32), scan_ts_all_impls=(32,), layer_ts_all_impls=(16,),
    min_calls=2, copy_bytes=1 << 20,
    corr_scan=(((2, 24, 8), False, "float32"), ((2, 24, 8), True, "float32"),
               ((3, 7, 4), False, "float32"), ((2, 24, 8), False, "bfloat16")),
    corr_layer=(2, 20, 8),
    lm=dict(batch=2, seq_len=32, d_model=16, n_layer=1, vocab=32),
    lm_steps=2, paper_steps=3, case_cap_s=10.0, torch_cap_s=60.0)


# ----------------------------------------------------------------------------
# Time budget.


def now() -> float:
    return time.perf_counter()


class Schedule:
    """Deadlines of the sections: the caps scaled to ``total_s``.

    Section ``k`` may run until ``end - sum(caps of the later sections)``:
    unused time passes forward, and no section takes the later ones' caps.
    """

    def __init__(self, total_s: float, start: float, caps=CAPS):
        scale = total_s / sum(c for _, c in caps)
        self.caps = [(name, cap * scale) for name, cap in caps]
        self.start, self.end = start, start + total_s

    def cap(self, name: str) -> float:
        return dict(self.caps).get(name, 0.0)

    def deadline(self, name: str) -> float:
        names = [n for n, _ in self.caps]
        later = sum(c for _, c in self.caps[names.index(name) + 1:])
        return self.end - later


class Section:
    """One section's deadline, its case counts and its log."""

    def __init__(self, name: str, deadline: float, log: Callable[[str], None]):
        self.name, self.deadline, self.log = name, deadline, log
        self.started = now()
        self.counts: Dict[str, int] = {}

    def left(self) -> float:
        return self.deadline - now()

    def run(self, rec: Dict[str, Any], est_s: float, body: Callable[[Dict[str, Any]], None]
            ) -> Dict[str, Any]:
        """Runs ``body(rec)`` unless ``est_s`` does not fit; records the outcome.

        ``rec["status"]``: ``ok``, ``mismatch`` (set by the body), ``skipped``
        (with ``reason``) or ``error`` (with the exception); an error never
        stops the section.
        """
        rec["est_s"] = round(est_s, 2)
        if est_s > self.left():
            rec.update(status="skipped",
                       reason=f"{self.name} budget: {max(self.left(), 0):.0f} s left, "
                              f"case estimated at {est_s:.1f} s")
        else:
            t0 = now()
            try:
                body(rec)
                rec.setdefault("status", "ok")
            except Exception as e:  # noqa: BLE001 - recorded per case
                rec.update(status="error", error=f"{type(e).__name__}: {str(e)[:500]}",
                           where=_where(e))
            rec["wall_s"] = round(now() - t0, 3)
        self.counts[rec["status"]] = self.counts.get(rec["status"], 0) + 1
        if rec["status"] not in ("ok",):
            self.log(f"  {self.name}: {_label(rec)}: {rec['status'].upper()} "
                     f"{rec.get('reason') or rec.get('error') or rec.get('worst_part', '')}")
        return rec

    def record(self) -> Dict[str, Any]:
        return dict(wall_s=round(now() - self.started, 2), counts=dict(self.counts),
                    deadline_left_s=round(self.left(), 2))


def _where(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in frames[-3:][::-1])


def _label(rec: Dict[str, Any]) -> str:
    keys = ("kind", "name", "layer", "impl", "dtype", "T", "shape", "reverse", "mixing", "config")
    return " ".join(f"{rec[k]}" for k in keys if k in rec)


# ----------------------------------------------------------------------------
# Timing.


def compile_fn(fn: Callable, args: Sequence[Any], rec: Dict[str, Any], key: str = "compile_s"):
    """``jax.jit(fn).lower(*args).compile()``, its seconds in ``rec[key]``."""
    t0 = now()
    compiled = jax.jit(fn).lower(*args).compile()
    rec[key] = round(now() - t0, 3)
    return compiled


def measure(fn: Callable, args: Sequence[Any], sec: Section, settings: Settings,
            target_s: float = 0.3, max_calls: int = 200) -> Dict[str, Any]:
    """Median ms of ``fn(*args)`` (each call ended by ``block_until_ready``).

    One warm-up call first.  At least ``settings.min_calls`` calls (more, up
    to ``max_calls``, while they take under ``target_s``); when that many
    calls of the warm-up's length do not fit in ``settings.case_cap_s`` or
    the section's time left, nothing more runs: ``status: skipped`` with the
    warm-up call's time (``first_call_ms``).
    """
    t0 = now()
    jax.block_until_ready(fn(*args))
    first = now() - t0
    room = min(settings.case_cap_s, sec.left())
    if settings.min_calls * first > room:
        return dict(status="skipped", first_call_ms=first * 1e3,
                    reason=f"{settings.min_calls} calls of {first:.2f} s exceed {room:.1f} s "
                           f"(case cap {settings.case_cap_s:.0f} s, section left "
                           f"{max(sec.left(), 0):.0f} s)")
    n = int(min(max_calls, max(settings.min_calls, target_s / max(first, 1e-6))))
    times = []
    for _ in range(n):
        t0 = now()
        jax.block_until_ready(fn(*args))
        times.append((now() - t0) * 1e3)
    return dict(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times),
                n=n, first_call_ms=first * 1e3)


# ----------------------------------------------------------------------------
# What the run measures: byte floors and estimates.


def layer_widths(layer: str) -> Dict[str, int]:
    """Projection blocks and whether the layer has an output projection."""
    return {"MinGRU": dict(n_proj=2, out_proj=0), "MinLSTM": dict(n_proj=3, out_proj=0),
            "GatedLinearRNN": dict(n_proj=3, out_proj=1),
            GRUCELL: dict(n_proj=3, out_proj=0), CUDNN: dict(n_proj=3, out_proj=0)}[layer]


def layer_min_bytes(layer: str, b: int, t: int, d: int, dtype: str) -> int:
    """Bytes one layer's forward+backward must move through HBM, at least.

    Input and output width ``d``, state width ``d``; ``e`` bytes per element
    of the compute dtype, the state float32 (4 bytes)::

        forward:  read x (e), write the state (4) that the backward pass needs
        backward: read x again (e), the state (4) and the cotangent g (e);
                  write dx (e)
        weights:  read in both passes, their gradient written (float32)

    ``B T d (4 e + 8) + 3 * 4 * params``.  The backward pass runs in the
    opposite time direction, so the states cross HBM once each way; gates
    and projections are assumed recomputed from ``x`` on chip.  A floor: no
    implementation can move fewer bytes, the matrix products' time is not
    counted.
    """
    e = jnp.dtype(DTYPES.get(dtype, jnp.float32)).itemsize
    w = layer_widths(layer)
    params = d * (w["n_proj"] * d) + w["n_proj"] * d + w["out_proj"] * (d * d + d)
    if layer in (GRUCELL, CUDNN):
        params = 2 * (3 * d * d) + 6 * d
    return b * t * d * (4 * e + 8) + 3 * 4 * params


def scan_min_bytes(b: int, t: int, d: int, mode: str) -> int:
    """``linear_scan`` float32: fwd reads a, b and writes h (3 arrays); the
    backward pass reads g, a, h and writes da, db (5 more)."""
    return b * t * d * 4 * (3 if mode == "fwd" else 8)


def _call_est(layer: str, impl: str, t: int, settings: Settings, dtype: str = "float32") -> float:
    if settings.quick:
        return 0.01
    if layer == GRUCELL:
        return t * EST["grucell_step_s"]
    if impl in PARALLEL_IMPLS:
        byts = layer_min_bytes(layer if layer in LAYERS else "MinGRU", settings.batch, t,
                               settings.d, dtype)
        return max(EST["call_s"], 3 * byts / EST["parallel_bytes_per_s"])
    return t * EST["loop_step_s"]


def _timed_est(compile_s: float, call_s: float, settings: Settings, n_compiles: int = 1) -> float:
    """Compile(s) + warm-up + the timed calls (at most the case cap)."""
    return n_compiles * compile_s + call_s + min(settings.min_calls * call_s + 0.3,
                                                 settings.case_cap_s)


def _compile_est(impl: str, settings: Settings) -> float:
    if settings.quick:
        return 1.0
    return EST["compile_pallas_s"] if impl == "pallas" else EST["compile_s"]


# ----------------------------------------------------------------------------
# Inputs.


def _rand(shape, seed: int, dtype=jnp.float32, low=None, high=None, positive=False):
    rng = np.random.default_rng(seed)
    if low is not None:
        v = rng.uniform(low, high, shape)
    else:
        v = rng.standard_normal(shape)
        if positive:
            v = np.abs(v) + 0.1
    return jnp.asarray(v.astype(np.float32), dtype)


def _leaves(tree) -> Dict[str, np.ndarray]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


# ----------------------------------------------------------------------------
# Comparison (correctness).


def compare(out: Any, ref: Any, tol: float) -> Dict[str, Any]:
    """Worst ``max |out - ref| / max |ref|`` over the leaves of two pytrees.

    A leaf whose shape or dtype differs from the reference's, or whose error
    is not finite, is a mismatch; so is any error above ``tol``.  Returns
    ``status`` (``ok``/``mismatch``), ``worst_rel_err``, ``worst_part``,
    ``n_compared`` (elements), ``ref_max_abs`` (the largest reference
    magnitude, to show that real values were compared) and per-leaf errors.
    """
    o_leaves, r_leaves = _leaves(out), _leaves(ref)
    parts: Dict[str, Any] = {}
    problems = []
    if set(o_leaves) != set(r_leaves):
        problems.append(f"outputs differ: {sorted(set(o_leaves) ^ set(r_leaves))[:4]}")
    worst, worst_part, n, ref_max = 0.0, "", 0, 0.0
    for k in sorted(set(o_leaves) & set(r_leaves)):
        o, r = np.asarray(o_leaves[k]), np.asarray(r_leaves[k])
        if o.shape != r.shape or o.dtype != r.dtype:
            problems.append(f"{k}: {o.dtype}{o.shape} vs reference {r.dtype}{r.shape}")
            continue
        o64, r64 = o.astype(np.float64), r.astype(np.float64)
        scale = float(np.max(np.abs(r64))) if r64.size else 0.0
        diff = float(np.max(np.abs(o64 - r64))) if r64.size else 0.0
        err = diff / max(scale, 1e-30)
        finite = bool(np.all(np.isfinite(o64))) and math.isfinite(err)
        parts[k] = dict(rel_err=err if finite else None, ref_max_abs=scale, n=int(r.size))
        if not finite or not np.all(np.isfinite(r64)):
            problems.append(f"{k}: non-finite values")
            continue
        n += int(r.size)
        ref_max = max(ref_max, scale)
        if err >= worst:
            worst, worst_part = err, k
    if worst > tol:
        problems.append(f"{worst_part}: rel err {worst:.2e} > {tol:.0e}")
    return dict(status="mismatch" if problems else "ok", worst_rel_err=worst,
                worst_part=worst_part, n_compared=n, ref_max_abs=ref_max, tol=tol,
                problems=problems, parts=parts)


def _precision(dtype: str):
    """float32 comparisons run at "highest" matmul precision (no TF32)."""
    if dtype == "float32":
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()


def scan_fwd_bwd(impl: str, reverse: bool) -> Callable:
    """``(a, b, h0, g, g_last) -> outputs and gradients`` of ``fm.linear_scan``."""
    import flax_minrnn as fm  # pylint: disable=g-import-not-at-top

    def f(a, b, h0, g, g_last):
        (h_last, h), vjp = jax.vjp(
            lambda a, b, h0: fm.linear_scan(a, b, h0, impl=impl, reverse=reverse), a, b, h0)
        da, db, dh0 = vjp((g_last.astype(h_last.dtype), g.astype(h.dtype)))
        return dict(h_last=h_last, h=h, da=da, db=db, dh0=dh0)
    return f


def layer_module(layer: str, impl: str, dtype: str, d: int, positive: bool = False):
    """The layer with width ``d``; ``positive``: its candidate is ``g() > 0``."""
    import flax_minrnn as fm  # pylint: disable=g-import-not-at-top
    cls = {"MinGRU": fm.MinGRU, "MinLSTM": fm.MinLSTM, "GatedLinearRNN": fm.GatedLinearRNN}[layer]
    kw = {}
    if positive:
        kw = ({"input_activation": fm.g_activation} if layer == "GatedLinearRNN"
              else {"candidate_activation": fm.g_activation})
    return cls(d_h=d, scan_impl=impl, dtype=DTYPES[dtype], **kw)


def layer_fwd_bwd(module) -> Callable:
    """``(params, x, c0, g, g_carry) -> outputs and gradients`` of one layer."""
    def f(params, x, c0, g, g_carry):
        (carry, y), vjp = jax.vjp(lambda p, x, c: module.apply(p, x, c), params, x, c0)
        dp, dx, dc0 = vjp((g_carry.astype(carry.dtype), g.astype(y.dtype)))
        return dict(carry=carry, y=y, dparams=dp, dx=dx, dcarry0=dc0)
    return f


def layer_grad(apply: Callable) -> Callable:
    """``(params, x, g) -> (loss, (d params, d x))`` of ``loss = sum(apply(params,
    x) * g)`` (in float32).  The loss is returned, as a training step has it:
    with the gradients alone XLA drops the forward products that only ``y``
    needs (an output projection's ``z W``)."""
    def f(params, x, g):
        y, vjp = jax.vjp(apply, params, x)
        loss = jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32))
        return loss, vjp(g.astype(y.dtype))
    return f


# ----------------------------------------------------------------------------
# The run.


class Run:
    """One run: settings, schedule, results (written after every section)."""

    def __init__(self, settings: Settings, out: str, budget_s: float = DEFAULT_BUDGET_S,
                 log=print, sections: Optional[Sequence[str]] = None, argv: Sequence[str] = (),
                 start: Optional[float] = None):
        self.s = settings
        self.out = out
        self.log_fn = log
        self.sections = [n for n, _ in CAPS if sections is None or n in sections or n == "finish"]
        # The caps of the sections that run, scaled to the budget.
        self.schedule = Schedule(budget_s, now() if start is None else start,
                                 [(n, c) for n, c in CAPS if n in self.sections])
        self.res: Dict[str, Any] = dict(
            meta=dict(argv=list(argv), quick=settings.quick, budget_s=budget_s,
                      settings=dataclasses.asdict(settings), caps_s=dict(self.schedule.caps),
                      est_assumptions=EST, tolerances=TOL, min_calls=settings.min_calls,
                      started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
            sections={})
        self.impls: List[str] = []
        self.assume_backend: Optional[str] = None
        self._params: Dict[Any, Any] = {}
        self._inputs: Dict[Any, Any] = {}

    # -- logging and output ---------------------------------------------------

    def log(self, msg: str) -> None:
        self.log_fn(f"[{now() - self.schedule.start:6.1f}s] {msg}")

    def save(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        path = os.path.join(self.out, RESULTS_JSON)
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(_jsonable(self.res), fh, indent=1)
        os.replace(tmp, path)

    def section(self, name: str) -> Section:
        sec = Section(name, self.schedule.deadline(name), self.log)
        self.log(f"== {name} (until {sec.deadline - self.schedule.start:.0f} s, "
                 f"{sec.left():.0f} s left) ==")
        return sec

    def close(self, name: str, sec: Section) -> None:
        self.res["sections"][name] = sec.record()
        self.res["total_wall_s"] = None  # set at the end: None means stopped early
        self.log(f"   {name} done in {now() - sec.started:.1f} s: {sec.counts}")
        self.save()

    # -- main -----------------------------------------------------------------

    def run(self) -> Dict[str, Any]:
        self.res["plan"] = self.plan()
        self.print_plan()
        for name in self.sections:
            if name == "finish":
                continue
            sec = self.section(name)
            try:
                getattr(self, f"sec_{name}")(sec)
            except Exception as e:  # noqa: BLE001 - a broken section keeps the others
                self.res["sections"][name + "_error"] = f"{type(e).__name__}: {e}"
                self.log(f"   section {name} FAILED: {type(e).__name__}: {e}\n"
                         + traceback.format_exc()[-1500:])
            self.close(name, sec)
            if name == "layers":
                self.finish(final=False)
        self.finish(final=True)
        return self.res

    # -- the plan -------------------------------------------------------------

    def _discover(self) -> Tuple[List[str], Dict[str, str]]:
        import flax_minrnn as fm  # pylint: disable=g-import-not-at-top
        backend = self.assume_backend or jax.default_backend()
        impls, skipped = [], {}
        for member in fm.ScanImpl:
            name = member.value
            if self.s.impls is not None and name not in self.s.impls:
                skipped[name] = "not asked for (--impls)"
                continue
            if name == "native" and backend != "cpu":
                skipped[name] = "compiled CPU kernels: not run off the CPU"
                continue
            impls.append(name)
        return impls, skipped

    def _others(self) -> List[str]:
        """The implementations but ``auto``: the GPU ones first."""
        order = ["pallas", "associative", "sequential", "chunked"]
        return sorted((i for i in self.impls if i != "auto"),
                      key=lambda i: (order.index(i) if i in order else 9, i))

    def scan_cases(self) -> List[Dict[str, Any]]:
        """``auto`` at every T; Pallas and associative at the longest T (core),
        every implementation at ``scan_ts_all_impls`` (extra)."""
        c = lambda impl, t, tier: dict(kind="scan", impl=impl, T=t, tier=tier)
        cases = [c("auto", t, "core") for t in self.s.ts]
        longest = max(self.s.scan_ts_all_impls)
        for impl in self._others():
            cases += [c(impl, t, "core" if impl in ("pallas", "associative") and t == longest
                        else "extra") for t in self.s.scan_ts_all_impls]
        return _core_first(cases)

    def layer_cases(self) -> List[Dict[str, Any]]:
        """Every layer case, most important first (what a short budget keeps).

        Core: MinGRU ``auto`` float32 and bfloat16 and the GRU baselines at
        every T (the headline ratios; nn.RNN(GRUCell) up to T = 4096, where
        its 20 calls take seconds each); every other series at
        ``layer_ts_all_impls`` (512, 4096, 16384).  Extra: the other T.
        """
        s, others = self.s, self._others()
        c = lambda layer, impl, dtype, t, tier="core": dict(
            kind="layer", layer=layer, impl=impl, dtype=dtype, T=t, tier=tier)
        some = [t for t in s.ts if t in s.layer_ts_all_impls]
        rest = [t for t in s.ts if t not in s.layer_ts_all_impls]
        gru_ts = [t for t in s.ts if t <= 2048 or s.quick]
        cases = [c("MinGRU", "auto", "float32", t) for t in s.ts]
        cases += [c(GRUCELL, "-", "float32", gru_ts[0])]
        cases += [c("MinGRU", "auto", "bfloat16", t) for t in s.ts]
        cases += [c(GRUCELL, "-", "float32", t) for t in gru_ts[1:]]
        cases += [c("MinGRU", i, "float32", t) for i in others for t in some]
        for layer in LAYERS[1:]:
            cases += [c(layer, "auto", dt, t) for dt in ("float32", "bfloat16") for t in some]
        cases += [c(layer, i, "float32", t) for layer in LAYERS[1:] for i in others for t in some]
        cases += [c(GRUCELL, "-", "float32", t, "extra") for t in s.ts if t not in gru_ts]
        cases += [c("MinGRU", i, "float32", t, "extra") for i in others for t in rest]
        for layer in LAYERS[1:]:
            cases += [c(layer, "auto", dt, t, "extra") for dt in ("float32", "bfloat16")
                      for t in rest]
        cases += [c(layer, i, "float32", t, "extra") for layer in LAYERS[1:] for i in others
                  for t in rest]
        return _core_first(cases)

    def corr_cases(self) -> List[Dict[str, Any]]:
        """Every implementation but the reference, ``auto`` and the GPU ones first."""
        cases = []
        impls = ["auto"] * ("auto" in self.impls) + [i for i in self._others()
                                                      if i != "sequential"]
        for impl in impls:
            for shape, reverse, dtype in self.s.corr_scan:
                cases.append(dict(kind="linear_scan", impl=impl, shape=list(shape),
                                  reverse=reverse, dtype=dtype))
        for dtype in ("float32", "bfloat16"):
            for layer in LAYERS:
                for impl in impls:
                    cases.append(dict(kind="layer", layer=layer, impl=impl, dtype=dtype,
                                      shape=list(self.s.corr_layer)))
        return _core_first(cases)

    def est_corr(self, case) -> float:
        return _compile_est(case["impl"], self.s) + (0.0 if self.s.quick else 0.1)

    def est_scan(self, case) -> float:
        call = _call_est("MinGRU", case["impl"], case["T"], self.s)
        return _timed_est(_compile_est(case["impl"], self.s), call, self.s) * 2

    def est_layer(self, case) -> float:
        call = _call_est(case["layer"], case["impl"], case["T"], self.s, case["dtype"])
        comp = 2.0 if case["layer"] == GRUCELL and not self.s.quick else _compile_est(
            case["impl"], self.s)
        return _timed_est(comp, call, self.s)

    def est_lm(self) -> float:
        if self.s.quick:
            return 5.0
        return EST["compile_lm_s"] + (self.s.lm_steps + 2) * EST["lm_step_s"]

    def est_paper(self) -> float:
        if self.s.quick:
            return 10.0
        return (EST["compile_paper_s"] + self.s.paper_steps * EST["paper_step_s"]
                + 2 * EST["paper_eval_s"])

    def lm_cases(self) -> List[Dict[str, Any]]:
        return [dict(kind="lm", mixing=m, dtype=dt, tier="core" if i < 2 else "extra",
                     **self.s.lm) for i, (m, dt) in enumerate(self.s.lm_cases)]

    def paper_cases(self) -> List[Dict[str, Any]]:
        return [dict(kind="paper", name=n, config=c, tier="core" if i < 2 else "extra")
                for i, (n, c) in enumerate(self.s.paper_configs)]

    def plan(self) -> Dict[str, Any]:
        """Cases, compiles and estimated seconds per section (core and extra).

        Core cases come first in every section and are what the caps are
        sized for; extra cases run in whatever time is left.
        """
        self.impls, self.impls_skipped = self._discover()
        n_refs = len(self.s.corr_scan) + 2 * len(LAYERS)
        per = {
            "correctness": (self.corr_cases(), self.est_corr, 1),
            "scan": (self.scan_cases(), self.est_scan, 2),
            "layers": (self.layer_cases(), self.est_layer, 1),
            "lm": (self.lm_cases(), lambda c: self.est_lm(), 1),
            "paper": (self.paper_cases(), lambda c: self.est_paper(), 3),
        }
        sections: Dict[str, Any] = {"setup": dict(core=1, extra=0, compiles=1,
                                                  est_core_s=5.0 if self.s.quick else 10.0,
                                                  est_extra_s=0.0)}
        for name, (cases, est, compiles) in per.items():
            core = [c for c in cases if c["tier"] == "core"]
            extra = [c for c in cases if c["tier"] == "extra"]
            sections[name] = dict(core=len(core), extra=len(extra),
                                  compiles=compiles * len(cases),
                                  est_core_s=sum(est(c) for c in core),
                                  est_extra_s=sum(est(c) for c in extra))
        sections["correctness"]["compiles"] += n_refs
        sections["correctness"]["est_core_s"] += n_refs * _compile_est("sequential", self.s)
        sections["layers"]["est_core_s"] += 5.0 if self.s.quick else EST["torch_s"]
        sections["finish"] = dict(core=0, extra=0, compiles=0, est_core_s=3.0, est_extra_s=0.0)
        for name, v in sections.items():
            v["cap_s"] = round(self.schedule.cap(name), 1)
            v["est_core_s"] = round(v["est_core_s"], 1)
            v["est_extra_s"] = round(v["est_extra_s"], 1)
            v["run"] = name in self.sections
        run = [v for v in sections.values() if v["run"]]
        return dict(impls=self.impls, impls_skipped=self.impls_skipped, sections=sections,
                    est_core_total_s=round(sum(v["est_core_s"] for v in run), 1),
                    est_extra_total_s=round(sum(v["est_extra_s"] for v in run), 1),
                    budget_s=round(self.schedule.end - self.schedule.start, 1))

    def print_plan(self) -> None:
        p = self.res["plan"]
        lines = [f"plan: impls {p['impls']} (skipped: {p['impls_skipped'] or 'none'})",
                 f"estimates assume {EST['compile_s']} s per compile ({EST['compile_pallas_s']} "
                 "s Pallas); core cases first, extras only in time left; hard caps",
                 f"{'section':12s} {'core':>5s} {'extra':>5s} {'compiles':>8s} "
                 f"{'est core s':>10s} {'est extra s':>11s} {'cap s':>6s}"]
        for name, v in p["sections"].items():
            if v["run"]:
                lines.append(f"{name:12s} {v['core']:5d} {v['extra']:5d} {v['compiles']:8d} "
                             f"{v['est_core_s']:10.1f} {v['est_extra_s']:11.1f} "
                             f"{v['cap_s']:6.1f}")
        lines.append(f"{'total':12s} {'':5s} {'':5s} {'':8s} {p['est_core_total_s']:10.1f} "
                     f"{p['est_extra_total_s']:11.1f} {p['budget_s']:6.1f}")
        for line in lines:
            self.log(line)

    # -- setup ------------------------------------------------------------------

    def sec_setup(self, sec: Section) -> None:
        self.res["machine"] = machine_info()
        m = self.res["machine"]
        self.log(f"device: {m.get('device_kind')} ({m.get('backend')}), "
                 f"nvidia-smi: {m.get('nvidia_smi', {}).get('gpus', '-')}")
        self.log("versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
        try:
            import flax_minrnn as fm  # pylint: disable=g-import-not-at-top
            self.res["auto_resolves_to"] = {str(t): str(getattr(fm.default_impl(t), "value",
                                                                fm.default_impl(t)))
                                            for t in sorted(set(self.s.ts) | {self.s.corr_layer[1]})}
        except Exception as e:  # noqa: BLE001 - informative only
            self.res["auto_resolves_to"] = f"unavailable: {type(e).__name__}: {e}"
        self.log(f"auto resolves to: {self.res['auto_resolves_to']}")
        rec: Dict[str, Any] = dict(kind="copy", name="jax x + 1")

        def body(rec):
            n = max(1, self.s.copy_bytes // 4)
            x = jnp.ones((n,), jnp.float32)
            f = compile_fn(lambda v: v + 1.0, (x,), rec)
            rec.update(measure(f, (x,), sec, self.s))
            moved = 2 * n * 4
            rec.update(bytes_moved=moved, bytes_per_s_median=moved / (rec["median_ms"] / 1e3),
                       bytes_per_s_best=moved / (rec["min_ms"] / 1e3))
            self.log(f"copy bandwidth (jax x + 1, {n * 4 >> 20} MiB): "
                     f"{rec['bytes_per_s_median'] / 1e9:.0f} GB/s median, "
                     f"{rec['bytes_per_s_best'] / 1e9:.0f} GB/s best")

        self.res["bandwidth"] = dict(jax=sec.run(rec, 2.0, body))

    # -- correctness ------------------------------------------------------------

    def sec_correctness(self, sec: Section) -> None:
        cases = self.corr_cases()
        self.res["correctness"] = dict(tolerances=TOL, reference="sequential",
                                       metric="max |x - ref| / max |ref|, worst over outputs "
                                              "and gradients", cases=cases)
        refs: Dict[Any, Any] = {}
        for case in cases:
            sec.run(case, self.est_corr(case), lambda rec: self._corr_case(rec, refs))
        ok = [c for c in cases if c["status"] == "ok"]
        self.log(f"   correctness: {len(ok)}/{len(cases)} ok; worst float32 "
                 f"{_worst(cases, 'float32'):.2e}, bfloat16 {_worst(cases, 'bfloat16'):.2e}")

    def _corr_inputs(self, rec) -> Tuple[Callable, Tuple, Any]:
        dtype = DTYPES[rec["dtype"]]
        positive = rec["impl"] in POSITIVE_IMPLS  # their documented domain
        if rec["kind"] == "linear_scan":
            bsz, t, d = rec["shape"]
            a = _rand((bsz, t, d), 1, dtype, 0.5, 1.0)
            b = _rand((bsz, t, d), 2, dtype, positive=positive)
            h0 = _rand((bsz, d), 3, jnp.float32, positive=positive)
            g = _rand((bsz, t, d), 4)
            gl = _rand((bsz, d), 5)
            key = ("scan", tuple(rec["shape"]), rec["reverse"], rec["dtype"], positive)
            return (lambda impl: scan_fwd_bwd(impl, rec["reverse"])), (a, b, h0, g, gl), key
        bsz, t, d = rec["shape"]
        x = _rand((bsz, t, d), 6, dtype)
        c0 = _rand((bsz, d), 7, positive=positive)
        g = _rand((bsz, t, d), 8)
        gc = _rand((bsz, d), 9)
        params = self._layer_params(rec["layer"], rec["dtype"], d)
        key = ("layer", rec["layer"], rec["dtype"], tuple(rec["shape"]), positive)
        rec["positive_domain"] = positive
        make = lambda impl: layer_fwd_bwd(layer_module(rec["layer"], impl, rec["dtype"], d,
                                                       positive))
        return make, (params, x, c0, g, gc), key

    def _corr_case(self, rec, refs) -> None:
        make, args, key = self._corr_inputs(rec)
        with _precision(rec["dtype"]):
            if key not in refs:
                r: Dict[str, Any] = {}
                compiled = compile_fn(make("sequential"), args, r)
                refs[key] = (jax.device_get(compiled(*args)), r["compile_s"])
            ref, rec["ref_compile_s"] = refs[key]
            compiled = compile_fn(make(rec["impl"]), args, rec)
            out = jax.device_get(compiled(*args))
        result = compare(out, ref, TOL[rec["dtype"]])
        if rec["dtype"] == "bfloat16":
            state = "carry" if rec["kind"] == "layer" else "h_last"
            rec["state_dtype"] = str(np.asarray(out[state]).dtype)
            if rec["state_dtype"] != "float32":
                result["status"] = "mismatch"
                result["problems"].append(f"state dtype {rec['state_dtype']}, not float32")
        rec.update(result)

    def _layer_params(self, layer: str, dtype: str, d: int):
        key = (layer, dtype, d)
        if key not in self._params:
            module = layer_module(layer, "sequential", dtype, d)
            x = jnp.zeros((1, 4, d), DTYPES[dtype])
            self._params[key] = jax.jit(module.init)(jax.random.key(0), x)
        return self._params[key]

    # -- scan alone -------------------------------------------------------------

    def sec_scan(self, sec: Section) -> None:
        import flax_minrnn as fm  # pylint: disable=g-import-not-at-top
        rows = self.scan_cases()
        self.res["scan"] = dict(batch=self.s.batch, d=self.s.d, dtype="float32", rows=rows)
        for row in rows:
            def body(rec, impl=row["impl"], t=row["T"]):
                shape = (self.s.batch, t, self.s.d)
                a = _rand(shape, 11, jnp.float32, 0.5, 1.0)
                b = _rand(shape, 12)
                g = _rand(shape, 13)
                fwd = lambda a, b: fm.linear_scan(a, b, impl=impl)[1]
                bwd = lambda a, b, g: jax.vjp(fwd, a, b)[1](g)
                for mode, fn, args in (("fwd", fwd, (a, b)), ("fwdbwd", bwd, (a, b, g))):
                    r: Dict[str, Any] = {}
                    compiled = compile_fn(fn, args, r)
                    r.update(measure(compiled, args, sec, self.s))
                    r["min_bytes"] = scan_min_bytes(self.s.batch, t, self.s.d, mode)
                    rec[mode] = r
                    if "median_ms" not in r:
                        rec.update(status="skipped", reason=r.get("reason"))
                        return
                self.log(f"  scan {impl:12s} T={t:6d} fwd {rec['fwd']['median_ms']:8.3f} ms  "
                         f"fwd+bwd {rec['fwdbwd']['median_ms']:8.3f} ms")
            sec.run(row, self.est_scan(row), body)

    # -- layers -----------------------------------------------------------------

    def sec_layers(self, sec: Section) -> None:
        rows = self.layer_cases()
        self.res["layers"] = dict(batch=self.s.batch, d=self.s.d, rows=rows)
        torch_budget = min(self.s.torch_cap_s, max(sec.left() - 20.0, 0.0))
        self.res["torch"] = self._torch(torch_budget)
        for row in rows:
            sec.run(row, self.est_layer(row), lambda rec: self._layer_case(rec, sec))
            if sec.left() <= 0:
                break
        for row in rows:
            if "status" not in row:
                row.update(status="skipped", reason="layers budget spent")
                sec.counts["skipped"] = sec.counts.get("skipped", 0) + 1

    def _torch(self, budget_s: float) -> Dict[str, Any]:
        """:mod:`benchmarks.gpu.torch_baseline` in a subprocess (its own CUDA libs)."""
        if budget_s < 5.0:
            return dict(status="skipped", reason=f"{budget_s:.0f} s left for torch")
        fd, path = tempfile.mkstemp(prefix="torch_baseline_", suffix=".json")
        os.close(fd)
        cmd = [sys.executable, "-m", "benchmarks.gpu.torch_baseline", "--out", path,
               "--T", *map(str, self.s.ts), "--batch", str(self.s.batch), "--d", str(self.s.d),
               "--min-calls", str(self.s.min_calls), "--copy-bytes", str(self.s.copy_bytes),
               "--case-cap-s", str(self.s.case_cap_s), "--budget-s", str(max(budget_s - 5.0, 1.0))]
        self.log(f"  torch subprocess ({budget_s:.0f} s): {' '.join(cmd[1:4])} ...")
        t0 = now()
        res: Dict[str, Any] = {}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget_s,
                                  check=False)
            res["returncode"] = proc.returncode
            if proc.returncode != 0:
                res["stderr_tail"] = proc.stderr[-2000:]
        except subprocess.TimeoutExpired:
            res["returncode"] = "timeout"
        try:
            with open(path) as fh:
                res.update(json.load(fh))
        except (OSError, ValueError) as e:
            res.setdefault("status", "error")
            res["error"] = f"no result file: {e}"
        finally:
            if os.path.exists(path):
                os.remove(path)
        res["wall_s"] = round(now() - t0, 2)
        copy = res.get("copy", {})
        if copy.get("status") == "ok":
            self.log(f"  torch copy_ (device to device): "
                     f"{copy['bytes_per_s_median'] / 1e9:.0f} GB/s median")
        for r in res.get("gru", []):
            self.log(f"  {r.get('name')} T={r['T']}: "
                     + (f"{r['median_ms']:.3f} ms" if "median_ms" in r else
                        f"{r.get('status')} {r.get('reason') or r.get('error', '')}"))
        if res.get("status") not in ("done",):
            self.log(f"  torch: {res.get('status')} {res.get('reason') or res.get('error') or ''}"
                     f" {res.get('stderr_tail', '')[-300:]}")
        return res

    def _xg(self, t: int, dtype: str):
        key = (t, dtype)
        if key not in self._inputs:
            shape = (self.s.batch, t, self.s.d)
            self._inputs[key] = (_rand(shape, 21, DTYPES[dtype]), _rand(shape, 22, DTYPES[dtype]))
        return self._inputs[key]

    def _layer_case(self, rec, sec: Section) -> None:
        t, d = rec["T"], self.s.d
        x, g = self._xg(t, rec["dtype"])
        if rec["layer"] == GRUCELL:
            import flax.linen as nn  # pylint: disable=g-import-not-at-top
            module = nn.RNN(nn.GRUCell(features=d))
            key = (GRUCELL, "float32", d)
            if key not in self._params:
                self._params[key] = jax.jit(module.init)(jax.random.key(0), x[:, :4])
            params = self._params[key]
            apply = module.apply
        else:
            module = layer_module(rec["layer"], rec["impl"], rec["dtype"], d)
            params = self._layer_params(rec["layer"], rec["dtype"], d)
            apply = lambda p, x, m=module: m.apply(p, x)[1]
        fn = layer_grad(apply)
        compiled = compile_fn(fn, (params, x, g), rec)
        rec.update(measure(compiled, (params, x, g), sec, self.s))
        rec["min_bytes"] = layer_min_bytes(rec["layer"], self.s.batch, t, d, rec["dtype"])
        if "median_ms" in rec:
            self.log(f"  {rec['layer']:14s} {rec['impl']:11s} {rec['dtype']:8s} T={t:6d} "
                     f"{rec['median_ms']:9.3f} ms (compile {rec['compile_s']:.1f} s)")
        else:
            rec["status"] = "skipped"

    # -- LM training step -------------------------------------------------------

    def sec_lm(self, sec: Section) -> None:
        rows = self.lm_cases()
        self.res["lm"] = dict(rows=rows, optimizer="the trainer's (clip + AdamW, decay mask)",
                              data="random tokens, one fixed batch")
        for row in rows:
            sec.run(row, self.est_lm(), lambda rec: self._lm_case(rec, sec))

    def _lm_case(self, rec, sec: Section) -> None:
        from flax_minrnn.training import config as config_lib  # pylint: disable=g-import-not-at-top
        from flax_minrnn.training import train as train_lib  # pylint: disable=g-import-not-at-top
        lm = self.s.lm
        config = config_lib.apply_overrides(config_lib.default_config(), [
            f"model.time_mixing={rec['mixing']}", f"model.d_model={lm['d_model']}",
            f"model.n_layer={lm['n_layer']}", f"model.dtype={rec['dtype']}",
            f"data.seq_len={lm['seq_len']}", f"data.batch_size={lm['batch']}"])
        model = train_lib.build_model(config, lm["vocab"])
        # Jitted: one compile instead of running the init op by op.
        params = jax.jit(lambda: train_lib.initial_params(
            config, model, np.zeros((1, 16), np.int32)))()
        rec["n_params"] = int(sum(np.size(p) for p in jax.tree.leaves(params)))
        tx = train_lib.make_optimizer(config, params)
        opt_state = tx.init(params)
        step = train_lib.make_train_step(model, tx, jax.random.key(1))
        rng = np.random.default_rng(0)
        shape = (lm["batch"], lm["seq_len"])
        batch = dict(inputs=jnp.asarray(rng.integers(0, lm["vocab"], shape), jnp.int32),
                     targets=jnp.asarray(rng.integers(0, lm["vocab"], shape), jnp.int32),
                     weights=jnp.ones(shape, jnp.float32))
        t0 = now()
        compiled = step.lower(params, opt_state, batch, np.int32(0)).compile()
        rec["compile_s"] = round(now() - t0, 3)
        times, losses = [], []
        for i in range(self.s.lm_steps + 1):
            if times and sec.left() < 2 * statistics.median(times):
                rec["stopped_early"] = f"section budget at step {i}"
                break
            t0 = now()
            params, opt_state, m = compiled(params, opt_state, batch, np.int32(i))
            jax.block_until_ready((params, m))
            dt = now() - t0
            losses.append(float(m["loss"]))
            if i == 0:
                rec["first_step_s"] = dt
            else:
                times.append(dt)
        med = statistics.median(times)
        rec.update(steps_timed=len(times), median_step_ms=med * 1e3, min_step_ms=min(times) * 1e3,
                   tokens_per_step=lm["batch"] * lm["seq_len"],
                   tokens_per_s=lm["batch"] * lm["seq_len"] / med, loss_first=losses[0],
                   loss_last=losses[-1], finite=bool(np.all(np.isfinite(losses))))
        self.log(f"  LM {rec['mixing']:7s} {rec['dtype']:8s} {rec['tokens_per_s']:12,.0f} tokens/s "
                 f"({med * 1e3:.1f} ms/step, compile {rec['compile_s']:.1f} s)")

    # -- paper experiments ------------------------------------------------------

    def sec_paper(self, sec: Section) -> None:
        rows = self.paper_cases()
        self.res["paper"] = dict(rows=rows, steps=self.s.paper_steps)
        for row in rows:
            sec.run(row, self.est_paper(), lambda rec: self._paper_case(rec, sec))

    def _paper_case(self, rec, sec: Section) -> None:
        from flax_minrnn.training import config as config_lib  # pylint: disable=g-import-not-at-top
        from flax_minrnn.training import train as train_lib  # pylint: disable=g-import-not-at-top
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        config = config_lib.load_config(os.path.join(root, rec["config"]))
        if self.s.quick:
            config = config_lib.shrink(config)
            if config.data.name == "selective_copying":
                config = config_lib.apply_overrides(config, [
                    "data.task_kwargs.noise_length=8", "data.task_kwargs.num_tokens_to_memorize=4"])
        c = config
        dataset = train_lib.build_dataset(c)
        model = train_lib.build_model(c, dataset.vocab_size)
        rec.update(T=int(dataset.seq_len), batch=int(c.data.batch_size),
                   n_layer=int(c.model.n_layer), d_model=int(c.model.d_model),
                   time_mixing=c.model.time_mixing, num_steps=int(c.train.num_steps),
                   eval_every=int(c.train.eval_every), eval_batches=int(c.data.eval_batches))
        t0 = now()
        # The trainer's init (same key and params), jitted: one compile instead of
        # running it op by op.
        params = jax.jit(lambda: train_lib.initial_params(
            c, model, np.zeros((1, min(64, rec["T"])), np.int32)))()
        tx = train_lib.make_optimizer(c, params)
        opt_state = tx.init(params)
        rec["init_s"] = round(now() - t0, 3)
        rec["n_params"] = int(sum(np.size(p) for p in jax.tree.leaves(params)))
        # The trainer's dropout stream: fold_in(key(seed), 1).
        train_step = train_lib.make_train_step(
            model, tx, jax.random.fold_in(jax.random.key(c.seed), 1))
        steps = min(self.s.paper_steps, rec["num_steps"])
        times, data_times, losses = [], [], []
        for step in range(steps):
            if len(times) > 1 and sec.left() < 25.0 + statistics.median(times[1:]):
                rec["stopped_early"] = f"section budget at step {step}"
                break
            t0 = now()
            batch = dataset.train_batch(step)
            t1 = now()
            params, opt_state, m = train_step(params, opt_state, batch, np.int32(step))
            m = jax.device_get(m)
            times.append(now() - t0)
            data_times.append(t1 - t0)
            losses.append(float(m["loss"]))
            if not bool(m["finite"]):
                raise FloatingPointError(f"non-finite loss at step {step + 1}")
        steady = times[1:] or times
        med = statistics.median(steady)
        rec.update(steps_done=len(times), first_step_s=times[0], median_step_s=med,
                   median_data_s=statistics.median(data_times[1:] or data_times),
                   tokens_per_s=rec["batch"] * rec["T"] / med,
                   loss_first=losses[0], loss_last10=float(np.mean(losses[-10:])))
        eval_step = train_lib.make_eval_step(model)
        eval_data = dataset.eval_batches(c.data.eval_batches)
        t0 = now()
        train_lib.evaluate_batches(eval_step, params, eval_data)
        rec["eval_first_s"] = now() - t0
        t0 = now()
        metrics = train_lib.evaluate_batches(eval_step, params, eval_data)
        rec["eval_s"] = now() - t0
        rec["eval_after_steps"] = metrics
        n_evals = 1 + -(-rec["num_steps"] // rec["eval_every"])
        rec["n_evals_full"] = n_evals
        rec["est_full_run_s"] = (rec["first_step_s"] + (rec["num_steps"] - 1) * med
                                 + rec["eval_first_s"] + (n_evals - 1) * rec["eval_s"])
        rec["est_note"] = ("first step (compile) + (num_steps - 1) x median step + evaluations; "
                           "checkpoint saves and the final sample are not included")
        self.log(f"  {rec['name']}: {len(times)} steps, {med * 1e3:.1f} ms/step "
                 f"({rec['tokens_per_s']:,.0f} tokens/s, data {rec['median_data_s'] * 1e3:.1f} ms), "
                 f"loss {losses[0]:.3f} -> {rec['loss_last10']:.3f}; full run of "
                 f"{rec['num_steps']} steps ~ {rec['est_full_run_s'] / 60:.1f} min")

    # -- derived numbers, plot, summary -----------------------------------------

    def finish(self, final: bool) -> None:
        t0 = now()
        try:
            self.res["derived"] = derive(self.res)
        except Exception as e:  # noqa: BLE001 - the raw results still get written
            self.res["derived"] = dict(error=f"{type(e).__name__}: {e}")
        self.res["total_wall_s"] = round(now() - self.schedule.start, 2)
        self.save()
        try:
            plot(self.res, os.path.join(self.out, PLOT_PNG))
        except Exception as e:  # noqa: BLE001
            self.res["plot_error"] = f"{type(e).__name__}: {e}"
        if final:
            text = summary(self.res)
            with open(os.path.join(self.out, SUMMARY_MD), "w") as fh:
                fh.write(text + "\n")
            self.res["sections"]["finish"] = dict(wall_s=round(now() - t0, 2))
            self.res["total_wall_s"] = round(now() - self.schedule.start, 2)
            self.save()
            self.log_fn("\n" + text)


def _core_first(cases: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Marks cases of implementations outside ``CORE_IMPLS`` extra; core first."""
    for c in cases:
        c.setdefault("tier", "core")
        if c.get("impl", "auto") not in CORE_IMPLS + ("-",):
            c["tier"] = "extra"
    return ([c for c in cases if c["tier"] == "core"]
            + [c for c in cases if c["tier"] != "core"])


def _worst(cases, dtype) -> float:
    errs = [c.get("worst_rel_err", 0.0) for c in cases if c.get("dtype") == dtype
            and c.get("status") in ("ok", "mismatch")]
    return max(errs) if errs else float("nan")


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if isinstance(o, (str, int, bool)) or o is None:
        return o
    return str(o)


# ----------------------------------------------------------------------------
# Machine description.


def _nvidia_smi() -> Dict[str, Any]:
    """GPU name, driver, memory, clocks (the short field list if the long one fails)."""
    err: Dict[str, Any] = {}
    for fields in ("name,driver_version,memory.total,clocks.max.sm,clocks.max.memory,power.limit",
                   "name,driver_version,memory.total"):
        try:
            p = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return dict(error=f"{type(e).__name__}: {e}")
        if p.returncode == 0:
            return dict(fields=fields, gpus=[line.strip() for line in p.stdout.splitlines()
                                             if line.strip()])
        err = dict(error=(p.stderr or p.stdout).strip()[-300:], returncode=p.returncode)
    return err


def machine_info() -> Dict[str, Any]:
    from benchmarks import harness  # pylint: disable=g-import-not-at-top
    info = harness.machine_info()
    versions = {}
    for pkg in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax",
                "orbax-checkpoint", "chex", "numpy", "ml-collections", "matplotlib", "torch",
                "triton"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    info["python_executable"] = sys.executable
    info["hostname"] = platform.node()
    info["nvidia_smi"] = _nvidia_smi()
    dev = jax.devices()[0]
    info["device"] = str(dev)
    try:
        stats = dev.memory_stats() or {}
        info["device_bytes_limit"] = stats.get("bytes_limit")
    except Exception:  # noqa: BLE001 - not every backend has it
        pass
    try:
        info["jax_environment"] = jax.print_environment_info(return_string=True)[-3000:]
    except Exception as e:  # noqa: BLE001
        info["jax_environment"] = f"unavailable: {e}"
    return info


# ----------------------------------------------------------------------------
# Derived numbers and goals.


def _ok_ms(row) -> Optional[float]:
    return row.get("median_ms") if row.get("status") == "ok" else None


def derive(res: Dict[str, Any]) -> Dict[str, Any]:
    """Copy bandwidth, floors, ratios and the issue's goals from the raw rows."""
    bw_jax = res.get("bandwidth", {}).get("jax", {})
    bw_torch = res.get("torch", {}).get("copy", {})
    cands = {"jax x + 1": bw_jax.get("bytes_per_s_best"),
             "torch copy_": bw_torch.get("bytes_per_s_best") if bw_torch.get("status") == "ok"
             else None}
    cands = {k: v for k, v in cands.items() if v}
    out: Dict[str, Any] = {}
    copy_bw = max(cands.values()) if cands else None
    out["copy_bytes_per_s"] = copy_bw
    out["copy_source"] = max(cands, key=cands.get) if cands else None
    out["copy_candidates"] = cands

    layers = res.get("layers", {})
    rows = layers.get("rows", [])
    times: Dict[Tuple[str, str, str, int], float] = {}
    for r in rows:
        ms = _ok_ms(r)
        if ms is not None:
            times[(r["layer"], r["impl"], r["dtype"], r["T"])] = ms
    for r in res.get("torch", {}).get("gru", []):
        if r.get("status") == "ok" and "cuDNN" in r.get("name", ""):
            times[(CUDNN, "-", "float32", r["T"])] = r["median_ms"]
    ts = sorted({k[3] for k in times})
    b, d = layers.get("batch"), layers.get("d")
    per_t = []
    for t in ts:
        e: Dict[str, Any] = dict(T=t)
        ours = times.get(("MinGRU", "auto", "float32", t))
        e["MinGRU_auto_ms"] = ours
        e["MinGRU_auto_bf16_ms"] = times.get(("MinGRU", "auto", "bfloat16", t))
        e["GRUCell_ms"] = times.get((GRUCELL, "-", "float32", t))
        e["cuDNN_ms"] = times.get((CUDNN, "-", "float32", t))
        if ours:
            if e["GRUCell_ms"]:
                e["GRUCell_over_MinGRU"] = e["GRUCell_ms"] / ours
            if e["cuDNN_ms"]:
                e["cuDNN_over_MinGRU"] = e["cuDNN_ms"] / ours
        for layer in LAYERS:
            f32 = times.get((layer, "auto", "float32", t))
            bf = times.get((layer, "auto", "bfloat16", t))
            if f32 and bf:
                e[f"{layer}_f32_over_bf16"] = f32 / bf
        if copy_bw and b and d:
            for dtype in ("float32", "bfloat16"):
                e[f"floor_ms_{dtype}"] = layer_min_bytes("MinGRU", b, t, d, dtype) / copy_bw * 1e3
            if ours:
                e["MinGRU_auto_floor_fraction"] = e["floor_ms_float32"] / ours
        per_t.append(e)
    out["per_T"] = per_t
    if copy_bw:
        for r in rows:
            if r.get("status") == "ok" and "min_bytes" in r:
                r["floor_ms"] = r["min_bytes"] / copy_bw * 1e3
                r["floor_fraction"] = r["floor_ms"] / r["median_ms"]
        for r in res.get("scan", {}).get("rows", []):
            for mode in ("fwd", "fwdbwd"):
                m = r.get(mode, {})
                if "median_ms" in m:
                    m["achieved_bytes_per_s"] = m["min_bytes"] / (m["median_ms"] / 1e3)
                    m["fraction_of_copy"] = m["achieved_bytes_per_s"] / copy_bw

    goals: Dict[str, Any] = {}
    big = [r for r in res.get("scan", {}).get("rows", []) if r.get("impl") == "auto"
           and r.get("T", 0) >= 4096 and "fraction_of_copy" in r.get("fwd", {})]
    if big:
        fb = {str(r["T"]): r["fwdbwd"].get("fraction_of_copy") for r in big}
        goals["scan_auto_fraction_of_copy_T>=4096"] = dict(
            target=">= 0.6", fwd={str(r["T"]): r["fwd"]["fraction_of_copy"] for r in big},
            fwdbwd=fb, met_fwd=all(r["fwd"]["fraction_of_copy"] >= 0.6 for r in big),
            met_fwdbwd=all(v is not None and v >= 0.6 for v in fb.values()))
    t512 = next((e for e in per_t if e["T"] == 512), None)
    if t512 and "GRUCell_over_MinGRU" in t512:
        goals["MinGRU_vs_GRUCell_T512"] = dict(target=">= 100", ratio=t512["GRUCell_over_MinGRU"],
                                               met=t512["GRUCell_over_MinGRU"] >= 100)
    if t512 and "cuDNN_over_MinGRU" in t512:
        goals["MinGRU_vs_cuDNN_T512"] = dict(paper=175, ratio=t512["cuDNN_over_MinGRU"])
    bf = {f"{layer} T={e['T']}": e[f"{layer}_f32_over_bf16"] for layer in LAYERS for e in per_t
          if e["T"] >= 4096 and f"{layer}_f32_over_bf16" in e}
    if bf:
        goals["bf16_speedup_T>=4096"] = dict(target=">= 1.5", ratio=bf,
                                             met=all(v >= 1.5 for v in bf.values()))
    corr = res.get("correctness", {}).get("cases", [])
    if corr:
        goals["correctness"] = dict(
            ok=sum(c.get("status") == "ok" for c in corr), total=len(corr),
            mismatch=[_label(c) for c in corr if c.get("status") == "mismatch"],
            error=[_label(c) for c in corr if c.get("status") == "error"],
            skipped=sum(c.get("status") == "skipped" for c in corr))
    out["goals"] = goals
    return out


# ----------------------------------------------------------------------------
# Plot and summary.


def plot(res: Dict[str, Any], path: str) -> None:
    """Log-log median fwd+bwd ms against T: one panel per layer, plus the scan."""
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    rows = res.get("layers", {}).get("rows", [])
    torch_rows = [r for r in res.get("torch", {}).get("gru", []) if r.get("status") == "ok"]
    per_t = res.get("derived", {}).get("per_T", [])
    scan_rows = res.get("scan", {}).get("rows", [])
    names = sorted({r["impl"] for r in rows if r["layer"] in LAYERS}
                   | {r["impl"] for r in scan_rows})
    palette = plt.get_cmap("tab10").colors
    color = {impl: palette[i % len(palette)] for i, impl in enumerate(names)}
    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    for ax, layer in zip(axes.flat, LAYERS):
        series: Dict[Tuple[str, str], List[Tuple[int, float]]] = {}
        for r in rows:
            if r["layer"] == layer and _ok_ms(r) is not None:
                series.setdefault((r["impl"], r["dtype"]), []).append((r["T"], r["median_ms"]))
        for (impl, dtype), pts in sorted(series.items()):
            pts.sort()
            bf16 = dtype == "bfloat16"
            ax.plot(*zip(*pts), "--" if bf16 else "-", marker="o", ms=3, color=color[impl],
                    lw=2.5 if impl == "auto" else 1.2,
                    label=f"{layer}[{impl}]" + (" bfloat16" if bf16 else ""))
        gru = sorted((r["T"], r["median_ms"]) for r in rows
                     if r["layer"] == GRUCELL and _ok_ms(r) is not None)
        if gru:
            ax.plot(*zip(*gru), "-", color="gray", marker="s", ms=4, label=GRUCELL)
        if torch_rows:
            ax.plot([r["T"] for r in torch_rows], [r["median_ms"] for r in torch_rows], "-",
                    color="black", marker="^", ms=4, label=torch_rows[0].get("name", CUDNN))
        for dtype, floor_color in (("float32", "black"), ("bfloat16", "dimgray")):
            fl = [(e["T"], e[f"floor_ms_{dtype}"]) for e in per_t if f"floor_ms_{dtype}" in e]
            if fl:
                ax.plot(*zip(*fl), ":", color=floor_color, lw=2, label=f"HBM byte floor {dtype}")
        ax.set_title(f"{layer}, B={res.get('layers', {}).get('batch')}, "
                     f"d={res.get('layers', {}).get('d')}: fwd+bwd")
        _loglog(ax)
    ax = axes.flat[3]
    bw = res.get("derived", {}).get("copy_bytes_per_s")
    for impl in sorted({r["impl"] for r in scan_rows}):
        for mode, style in (("fwd", "-"), ("fwdbwd", "--")):
            pts = sorted((r["T"], r[mode]["median_ms"]) for r in scan_rows
                         if r["impl"] == impl and r.get("status") == "ok"
                         and "median_ms" in r.get(mode, {}))
            if pts:
                ax.plot(*zip(*pts), style, marker="o", ms=3, color=color[impl],
                        lw=2.5 if impl == "auto" else 1.2, label=f"{impl} {mode}")
    if bw and scan_rows:
        ts = sorted({r["T"] for r in scan_rows})
        b, d = res["scan"]["batch"], res["scan"]["d"]
        for mode, style in (("fwd", ":"), ("fwdbwd", "-.")):
            ax.plot(ts, [scan_min_bytes(b, t, d, mode) / bw * 1e3 for t in ts], style,
                    color="black", lw=2, label=f"byte floor {mode}")
    ax.set_title("linear_scan alone, float32")
    _loglog(ax)
    m = res.get("machine", {})
    fig.suptitle(f"{m.get('device_kind', '?')} ({m.get('backend', '?')}), jax "
                 f"{m.get('versions', {}).get('jax', '?')}: median ms against T")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _loglog(ax) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T")
    ax.set_ylabel("median ms")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _f(v, fmt="{:.3g}") -> str:
    return "-" if v is None else fmt.format(v)


def summary(res: Dict[str, Any]) -> str:
    """The short markdown summary printed last (and written to summary.md)."""
    m = res.get("machine", {})
    der = res.get("derived", {})
    smi = m.get("nvidia_smi", {}).get("gpus") or [m.get("nvidia_smi", {}).get("error", "-")]
    out = [f"# GPU run summary: {m.get('device_kind', '?')} ({m.get('backend', '?')})", "",
           f"nvidia-smi: {'; '.join(smi)}  ",
           "versions: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()) + "  ",
           (f"total {res['total_wall_s']:.0f} s" if res.get("total_wall_s") is not None
            else "stopped before the end") + f" (budget {res['meta']['budget_s']:.0f} s); "
           f"copy bandwidth {_f((der.get('copy_bytes_per_s') or 0) / 1e9, '{:.0f}')} GB/s "
           f"({der.get('copy_source')}; candidates "
           + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in der.get("copy_candidates", {}).items())
           + ")", ""]
    out += ["| section | wall s | cap s | ok | skipped | error | mismatch |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    caps = res["meta"]["caps_s"]
    for name, v in res.get("sections", {}).items():
        if isinstance(v, dict) and "counts" in v:
            c = v["counts"]
            out.append(f"| {name} | {v['wall_s']:.0f} | {caps.get(name, 0):.0f} | {c.get('ok', 0)} "
                       f"| {c.get('skipped', 0)} | {c.get('error', 0)} | {c.get('mismatch', 0)} |")
    corr = res.get("correctness", {}).get("cases", [])
    if corr:
        bad = [c for c in corr if c.get("status") in ("mismatch", "error")]
        out += ["", f"Correctness vs sequential: {sum(c.get('status') == 'ok' for c in corr)}/"
                f"{len(corr)} ok; worst rel err float32 {_worst(corr, 'float32'):.1e} "
                f"(tol {TOL['float32']:.0e}), bfloat16 {_worst(corr, 'bfloat16'):.1e} "
                f"(tol {TOL['bfloat16']:.0e})"]
        for c in bad[:12]:
            out.append(f"- {c['status'].upper()} {_label(c)}: "
                       f"{(c.get('problems') or [c.get('error', '')])[0][:160]}")
    per_t = der.get("per_T", [])
    if per_t:
        lay = res.get("layers", {})
        out += ["", f"One layer B={lay.get('batch')} d={lay.get('d')} fwd+bwd, median ms "
                "(ratios: baseline / MinGRU[auto]; floor: HBM bytes at the copy bandwidth)", "",
                "| T | MinGRU auto f32 | bf16 | f32/bf16 | GRUCell | ratio | cuDNN GRU | ratio "
                "| floor f32 | floor/auto |", "|" + "---:|" * 10]
        for e in per_t:
            out.append(
                f"| {e['T']} | {_f(e.get('MinGRU_auto_ms'))} | {_f(e.get('MinGRU_auto_bf16_ms'))} "
                f"| {_f(e.get('MinGRU_f32_over_bf16'), '{:.2f}')} | {_f(e.get('GRUCell_ms'))} "
                f"| {_f(e.get('GRUCell_over_MinGRU'), '{:.0f}x')} | {_f(e.get('cuDNN_ms'))} "
                f"| {_f(e.get('cuDNN_over_MinGRU'), '{:.0f}x')} | {_f(e.get('floor_ms_float32'))} "
                f"| {_f(e.get('MinGRU_auto_floor_fraction'), '{:.0%}')} |")
    layer_rows = res.get("layers", {}).get("rows", [])
    best = {}
    for r in layer_rows:
        if _ok_ms(r) is not None and r["dtype"] == "float32" and r["layer"] in LAYERS:
            k = (r["layer"], r["T"])
            if k not in best or r["median_ms"] < best[k][1]:
                best[k] = (r["impl"], r["median_ms"])
    if best:
        out += ["", "Fastest float32 implementation per layer and T: " + "; ".join(
            f"{layer} " + ", ".join(f"{t}:{best[(layer, t)][0]}" for t in sorted(
                t for (l, t) in best if l == layer)) for layer in LAYERS
            if any(l == layer for l, _ in best))]
    scan_rows = [r for r in res.get("scan", {}).get("rows", []) if r.get("status") == "ok"]
    if scan_rows:
        sc = res.get("scan", {})
        out += ["", f"linear_scan alone ({sc.get('batch')}, T, {sc.get('d')}) float32: median ms "
                "and achieved bytes/s as a fraction of the copy bandwidth", "",
                "| impl | T | fwd ms | fwd bw | fwd+bwd ms | fwd+bwd bw |", "|---|---:|---:|---:|---:|---:|"]
        for r in scan_rows:
            fw, fb = r["fwd"], r["fwdbwd"]
            out.append(f"| {r['impl']} | {r['T']} | {_f(fw.get('median_ms'))} | "
                       f"{_f(fw.get('fraction_of_copy'), '{:.0%}')} | {_f(fb.get('median_ms'))} | "
                       f"{_f(fb.get('fraction_of_copy'), '{:.0%}')} |")
    lm_rows = res.get("lm", {}).get("rows", [])
    if lm_rows:
        r0 = lm_rows[0]
        out += ["", f"LM training step (the trainer's, d_model {r0['d_model']}, T {r0['seq_len']}, "
                f"batch {r0['batch']}, {r0['n_layer']} blocks): " + "; ".join(f"{r['mixing']} {r['dtype']}: "
                            + (f"{r['tokens_per_s']:,.0f} tokens/s" if r.get("status") == "ok"
                               else r.get("status", "?")) for r in lm_rows)]
    paper = res.get("paper", {}).get("rows", [])
    if paper:
        out += ["", "| paper config | T | steps | ms/step | tokens/s | loss first -> last | "
                "est. full run |", "|---|---:|---:|---:|---:|---|---:|"]
        for r in paper:
            if r.get("status") == "ok":
                out.append(f"| {r['name']} | {r['T']} | {r['steps_done']} | "
                           f"{r['median_step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
                           f"{r['loss_first']:.2f} -> {r['loss_last10']:.2f} | "
                           f"{r['est_full_run_s'] / 60:.1f} min ({r['num_steps']} steps) |")
            else:
                out.append(f"| {r['name']} | | | {r.get('status')} | | "
                           f"{(r.get('reason') or r.get('error') or '')[:80]} | |")
    goals = der.get("goals", {})
    if goals:
        out += ["", "Goals:"]
        for k, v in goals.items():
            out.append(f"- {k}: {json.dumps(_jsonable(v), default=str)[:300]}")
    return "\n".join(out)


# ----------------------------------------------------------------------------
# Command line.


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="results folder (files directly in it); required unless "
                                 "--summary or --plan-only (default: none)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and 2 calls per case: checks every code path (any backend; "
                        "default: off, the full run)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help="seconds for the whole run from process start; the section caps "
                        f"{dict(CAPS)} are scaled to it (default: %(default)s)")
    p.add_argument("--sections", default="",
                   help=f"comma-separated subset of {[n for n, _ in CAPS if n != 'finish']} "
                        "(default: all)")
    p.add_argument("--impls", default="",
                   help="comma-separated scan implementations to run (default: every one the "
                        "backend runs)")
    p.add_argument("--summary", metavar="RESULTS_JSON",
                   help="print the summary of an earlier run's results.json and exit "
                        "(default: run)")
    p.add_argument("--plan-only", action="store_true",
                   help="print the plan (cases, compiles, estimated seconds per section) and "
                        "exit (default: off)")
    p.add_argument("--assume-backend", default=None,
                   help="with --plan-only: plan for this backend (e.g. gpu) instead of this "
                        "one (default: this one)")
    a = p.parse_args(argv)
    if a.summary:
        with open(a.summary) as fh:
            res = json.load(fh)
        if "derived" not in res:  # a run stopped before its end
            res["derived"] = derive(res)
        print(summary(res))
        return 0
    settings = QUICK if a.quick else FULL
    if a.impls:
        settings = dataclasses.replace(settings, impls=tuple(a.impls.split(",")))
    if a.plan_only:
        run = Run(settings, a.out or ".", a.budget_s, start=PROCESS_START)
        run.assume_backend = a.assume_backend
        run.res["plan"] = run.plan()
        run.print_plan()
        return 0
    if not a.out:
        p.error("--out is required")
    names = [n for n, _ in CAPS if n != "finish"]
    sections = [s for s in a.sections.split(",") if s] or None
    if sections and set(sections) - set(names):
        p.error(f"--sections: unknown {sorted(set(sections) - set(names))}; choose from {names}")
    if sections and "setup" not in sections:
        sections = ["setup"] + sections  # the machine and the copy bandwidth come with every run
    run = Run(settings, a.out, a.budget_s, sections=sections,
              argv=list(argv if argv is not None else sys.argv[1:]), start=PROCESS_START)
    res = run.run()
    bad = res.get("derived", {}).get("goals", {}).get("correctness", {})
    return 1 if bad.get("mismatch") else 0


if __name__ == "__main__":
    sys.exit(main())
