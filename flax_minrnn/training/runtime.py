"""Process-level settings that make XLA:CPU faster for this library's shapes.

XLA:CPU allocates every large buffer (activations, gradients, the temporary
arena of a jitted call) with the C library's ``malloc`` and frees it when the
call ends.  glibc serves blocks above its mmap threshold (at most 32 MiB) with
a fresh ``mmap`` and returns them with ``munmap``, so each call touches brand
new pages and pays a page fault per 4 KiB: for a recurrent layer that streams
a few ``(B, T, D)`` arrays this costs as much as the arithmetic.
:func:`tune_cpu_malloc` keeps freed memory in one heap instead, so the next
call reuses pages that are already mapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import warnings

__all__ = ["tune_cpu_malloc", "MALLOC_SETTINGS", "apply_malloc_setting"]

# The values of the CLI's and the benchmarks' ``--malloc`` option.
MALLOC_SETTINGS = ("tuned", "default")

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_MAX_INT = 2 ** 31 - 1

_tuned = False


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API; assume the worst
        return True


def tune_cpu_malloc() -> bool:
    """Make glibc reuse freed memory instead of unmapping it (call it first).

    Sets three ``mallopt`` options for the whole process:

    * ``M_MMAP_MAX = 0``: large blocks come from the heap, not from ``mmap``;
    * ``M_TRIM_THRESHOLD = 2**31 - 1``: freed memory at the top of the heap is
      kept rather than given back to the system;
    * ``M_ARENA_MAX = 1``: XLA's worker threads share that heap.

    The effect: the buffers of the second and later calls of a jitted function
    land on pages that are already mapped, with no page faults; results are
    bit-identical.  Measured speed-ups are in ``benchmarks/README.md``
    (``--malloc tuned`` against ``--malloc default``).  The price: the process
    never returns freed memory to the system, so its resident size stays at
    its peak; and XLA may compile more slowly, its compiler threads sharing
    the one arena.

    The arena limit only binds threads that have not allocated yet, so call
    this before JAX's first computation (importing jax is fine).  The CLI
    calls it at start-up (``--malloc tuned``, its default) and the benchmarks
    with ``--malloc tuned``; a library import never does.

    Returns:
      True when the options were set; False (with a warning) when the C
      library is not glibc (macOS, musl) or JAX's backends are already running.
    """
    global _tuned
    if _tuned:
        return True
    if _backends_initialized():
        warnings.warn("tune_cpu_malloc(): JAX's backends are already initialised, so XLA's "
                      "threads keep their own malloc arenas; call it before the first JAX "
                      "computation. Nothing was changed.", RuntimeWarning, stacklevel=2)
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (glibc only)
    except (OSError, AttributeError, TypeError):
        warnings.warn(f"tune_cpu_malloc(): the C library ({name!r}) is not glibc; "
                      "nothing was changed.", RuntimeWarning, stacklevel=2)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _MAX_INT), (_M_ARENA_MAX, 1)))
    if not ok:
        warnings.warn("tune_cpu_malloc(): mallopt refused a setting.", RuntimeWarning,
                      stacklevel=2)
    _tuned = ok
    return ok


def apply_malloc_setting(setting: str) -> str:
    """Applies a ``--malloc`` value: ``"tuned"`` calls :func:`tune_cpu_malloc`,
    ``"default"`` leaves glibc alone.  Returns the setting in effect
    (``"default"`` when tuning did not take).

    Raises:
      ValueError: ``setting`` is not one of :data:`MALLOC_SETTINGS`.
    """
    if setting not in MALLOC_SETTINGS:
        raise ValueError(f"malloc setting must be one of {MALLOC_SETTINGS}, got {setting!r}")
    if setting == "tuned" and not tune_cpu_malloc():
        return "default"
    return setting
