"""A Pallas (Triton) GPU kernel for the linear recurrence ``h_t = a_t h_{t-1} + b_t``.

An opt-in backend, reached only by naming it: ``impl="pallas"`` in
:func:`flax_minrnn.ops.scan.linear_scan` or ``scan_impl="pallas"`` in a
layer.  On a GPU it compiles with Triton; elsewhere it runs in Pallas's
interpreter (correct and slow: for tests).  The reference it must match is
``impl="sequential"``; ``tests/test_kernels.py`` compares the two (outputs
and gradients, interpreted on the CPU) and ``benchmarks/gpu/bench.py`` on a GPU.

Algorithm (chunked, three launches; ``c`` steps per chunk, ``n = T / c``):

1. ``chunk_summary`` kernel, grid ``(batch, d / block_d, n)``: every chunk is
   scanned from a zero state; it writes only the chunk's final state
   ``e_k`` and the product of its coefficients ``p_k`` (``(batch, n, d)``).
2. The ``n`` summaries are combined in plain JAX (a linear scan of length
   ``n``): the state entering chunk ``k`` is ``s_k = p_{k-1} s_{k-1} +
   e_{k-1}``, ``s_0 = h0``.
3. ``chunk_scan`` kernel, same grid: every chunk is rescanned from ``s_k``,
   writing ``h``.

Inside a program the time loop is sequential over ``block_d`` lanes, one row
of ``a`` and ``b`` per step (Triton pipelines the loads of later steps).  The
chunks give the parallelism that a batch times width of a few thousand lanes
cannot: on an H100 a single-pass kernel over ``8 x 256`` lanes would run 32
programs.  When ``batch * d / block_d`` alone fills the GPU (``n = 1``) pass 1
and 2 are skipped: one pass, reading ``a, b`` once and writing ``h`` once.

Derivatives: :mod:`flax_minrnn.ops.scan` differentiates every
implementation through its own rules (the tangent and the adjoint are linear
scans, which run on this kernel too, the adjoint with ``reverse=True``), so
the kernel itself is never differentiated: ``grad``, ``jvp``, ``vmap`` and
second derivatives all work.  ``jax.export`` does not (checked on an H200:
the Triton call has no compatibility guarantee) and raises an error that
names ``scan_impl='associative'``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from flax_minrnn.ops import checks
from flax_minrnn.ops import scan as scan_lib
from flax_minrnn.ops.linear import refuse_export

# jax.export refuses the Triton custom call (no compatibility guarantee), so
# the kernel refuses export everywhere, with the way out.
_EXPORT = ("scan_impl='pallas' cannot be exported with jax.export (its Triton kernel is a "
           "custom call without compatibility guarantees); use scan_impl='associative' "
           "(what 'auto' picks on GPU), the same function in plain JAX")

Array = jax.Array

__all__ = ["pallas_available", "linear_scan_pallas", "forward"]

# Programs wanted in flight before chunking stops paying: a few per SM of a
# 132-SM H100 (each program is latency-bound on its one row per step).
_TARGET_PROGRAMS = 1024
_MAX_BLOCK_D = 128


def pallas_available(backend: str | None = None) -> bool:
    """Whether the Pallas Triton kernel can compile for ``backend`` (a GPU)."""
    backend = backend or jax.default_backend()
    if backend not in ("gpu", "cuda", "rocm"):
        return False
    try:
        from jax.experimental.pallas import triton  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
        return False
    return True


def _block_d(d: int) -> int:
    """The largest power of two dividing ``d``, at most ``_MAX_BLOCK_D``."""
    return math.gcd(d, _MAX_BLOCK_D)


def _num_chunks(seq_len: int, lane_programs: int) -> int:
    """A power-of-two chunk count: enough programs, chunks of >= 16 steps."""
    n = 1
    while (lane_programs * n < _TARGET_PROGRAMS and seq_len % (2 * n) == 0
           and seq_len // (2 * n) >= 16):
        n *= 2
    return n


def _step(t, chunk: int, reverse: bool):
    return chunk - 1 - t if reverse else t


def _summary_kernel(a_ref, b_ref, e_ref, p_ref, *, chunk: int, reverse: bool):
    """Pass 1: final state from zero and product of ``a`` of one chunk."""
    def body(t, carry):
        h, p = carry
        s = _step(t, chunk, reverse)
        a_t = a_ref[0, pl.ds(s, 1), :]
        b_t = b_ref[0, pl.ds(s, 1), :]
        return a_t * h + b_t, a_t * p

    zeros = jnp.zeros(e_ref.shape[1:], e_ref.dtype)
    h, p = jax.lax.fori_loop(0, chunk, body, (zeros, jnp.ones_like(zeros)))
    e_ref[0] = h
    p_ref[0] = p


def _scan_kernel(a_ref, b_ref, h0_ref, h_ref, *, chunk: int, reverse: bool):
    """Pass 3: the chunk's states from its true initial state."""
    def body(t, h):
        s = _step(t, chunk, reverse)
        h = a_ref[0, pl.ds(s, 1), :] * h + b_ref[0, pl.ds(s, 1), :]
        h_ref[0, pl.ds(s, 1), :] = h
        return h

    jax.lax.fori_loop(0, chunk, body, h0_ref[0])


def _compiler_params(interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plt  # pylint: disable=g-import-not-at-top
    return plt.CompilerParams(num_warps=1, num_stages=4)


@functools.partial(jax.jit, static_argnames=("reverse", "interpret", "num_chunks"))
def linear_scan_pallas(a: Array, b: Array, h0: Array, *, reverse: bool = False,
                       interpret: bool = False, num_chunks: int | None = None):
    """``(h_last, h)`` of ``h_t = a_t h_{t-1} + b_t`` over axis 1 of ``(B, T, D)``.

    Args:
      a, b: float32 (or float64) ``(batch, time, d)``.
      h0: ``(batch, d)``, of the dtype of ``a`` and ``b``.
      reverse: scan from the last step to the first.
      interpret: run the kernels in Pallas's interpreter (any backend; for
        tests).
      num_chunks: chunks of the time axis, a positive int dividing ``time``;
        ``None`` picks enough for about ``_TARGET_PROGRAMS`` programs.

    Returns:
      ``(h_last, h)`` as :func:`flax_minrnn.ops.scan.linear_scan` (no masks or
      resets here: the caller folds them into ``a`` and ``b``).
    """
    if a.ndim != 3 or a.shape != b.shape or h0.shape != (a.shape[0], a.shape[2]):
        raise ValueError(
            "linear_scan_pallas needs a, b of shape (batch, time, d) and h0 of "
            f"shape (batch, d); got {a.shape}, {b.shape}, {h0.shape}")
    for name, x in (("a", a), ("b", b), ("h0", h0)):
        if x.dtype not in (jnp.float32, jnp.float64) or x.dtype != a.dtype:
            raise TypeError(
                "linear_scan_pallas needs a, b and h0 of one dtype, float32 or float64; "
                f"{name} is {x.dtype}{'' if name == 'a' else f' (a is {a.dtype})'}; "
                "linear_scan(impl='pallas') casts its inputs itself")
    if num_chunks is not None:
        checks.check_int_at_least("num_chunks", num_chunks, 1)
    batch, seq_len, d = a.shape
    block_d = _block_d(d)
    lane_blocks = d // block_d
    n = _num_chunks(seq_len, batch * lane_blocks) if num_chunks is None else int(num_chunks)
    if seq_len % n:
        raise ValueError(f"num_chunks={n} must divide the time axis {seq_len}")
    chunk = seq_len // n
    grid = (batch, lane_blocks, n)
    tile = pl.BlockSpec((1, chunk, block_d), lambda i, j, k: (i, k, j))
    row = pl.BlockSpec((1, 1, block_d), lambda i, j, k: (i, k, j))
    params = dict(interpret=interpret, compiler_params=_compiler_params(interpret))

    a, b, h0 = checks.same_varying(a, b, h0)
    if n == 1:
        h_init = h0[:, None]
    else:
        e, p = pl.pallas_call(
            functools.partial(_summary_kernel, chunk=chunk, reverse=reverse),
            out_shape=(checks.shape_like((batch, n, d), a.dtype, a),) * 2,
            grid=grid, in_specs=[tile, tile], out_specs=(row, row),
            name="linear_scan_chunk_summary", **params)(a, b)
        # Pass 2: the state entering each chunk, in scan order.
        _, after = scan_lib.core(p, e, h0, scan_lib.ScanImpl.ASSOCIATIVE, reverse)
        if reverse:
            h_init = jnp.concatenate([after[:, 1:], h0[:, None]], axis=1)
        else:
            h_init = jnp.concatenate([h0[:, None], after[:, :-1]], axis=1)
    h = pl.pallas_call(
        functools.partial(_scan_kernel, chunk=chunk, reverse=reverse),
        out_shape=checks.shape_like(a.shape, a.dtype, a),
        grid=grid, in_specs=[tile, tile, row], out_specs=tile,
        name="linear_scan_chunk_scan", **params)(a, b, h_init)
    return (h[:, 0] if reverse else h[:, -1]), h


def forward(a: Array, b: Array, h0: Array, reverse: bool):
    """``(h_last, h)`` for :mod:`flax_minrnn.ops.scan` (prepared inputs of any
    feature shape; compiled on a GPU, interpreted elsewhere)."""
    batch, seq_len = a.shape[:2]
    if batch == 0 or math.prod(a.shape[2:]) == 0:
        return jnp.zeros(h0.shape, a.dtype), jnp.zeros(a.shape, a.dtype)
    interpret = not pallas_available()
    if interpret and any(checks.varying_axes(x) for x in (a, b, h0)):
        raise NotImplementedError(
            "scan_impl='pallas' is interpreted off a GPU, and JAX's Pallas interpreter "
            "cannot run inside shard_map (with check_vma); use scan_impl='chunked' or "
            "'associative' there, or run on a GPU")
    flat = lambda x: refuse_export(x.reshape(batch, seq_len, -1), _EXPORT)
    h_last, h = linear_scan_pallas(flat(a), flat(b), h0.reshape(batch, -1), reverse=reverse,
                                   interpret=interpret)
    return h_last.reshape(h0.shape), h.reshape(a.shape)
