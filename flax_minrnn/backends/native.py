"""Compiled XLA:CPU kernels for the tile loop of :mod:`flax_minrnn.scan`.

``csrc/gates.cc`` holds XLA FFI handlers that run one tile of a MinGRU or
MinLSTM recurrence (gates, recurrence and the copies into the whole-sequence
buffers in one pass, and its adjoint in one pass), plus an "empty" buffer
that XLA allocates without the zero-fill of ``jnp.zeros``.  ``impl="native"``
(what ``"auto"`` picks on CPU when the kernels are available) uses them; the
pure-JAX tile loop (``impl="chunked"``) computes the same function and is the
reference the tests compare against.

The source is compiled on first use with the system's C++ compiler (``$CXX``,
else ``g++``; ``-O3 -march=native``, a few seconds) into a cache directory
(``$FLAX_MINRNN_CACHE``, else ``$XDG_CACHE_HOME/flax_minrnn`` or
``~/.cache/flax_minrnn``), keyed by the source, the flags, the compiler, the
jaxlib version and the CPU, and loaded from there afterwards.  Where no
compiler is found or the build fails, :func:`available` is ``False`` (with
one warning naming the cause) and ``"auto"`` uses ``"chunked"``.  Set
``FLAX_MINRNN_NATIVE=0`` to never build or use the kernels.

Limits: the kernels have a first derivative (the layers' hand-written
backward pass) but no second one, and a function that calls them cannot be
serialised with :mod:`jax.export` (the custom-call targets live in this
process); pass ``scan_impl="chunked"`` (or set ``FLAX_MINRNN_NATIVE=0``) for
``jax.grad`` of a gradient or for exported functions.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["available", "NativeGates", "GATE_KINDS", "CANDIDATES"]

Array = jax.Array

_SOURCE = Path(__file__).with_name("csrc") / "gates.cc"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-Wno-return-type")
_TARGETS = {"fmr_gates_forward": "FmrGatesForward",
            "fmr_gates_backward": "FmrGatesBackward",
            "fmr_empty": "FmrEmpty"}

# The gate functions the kernels implement (``kind`` in gates.cc), and the
# candidate activations (``cand``).
GATE_KINDS = {"mingru": 0, "minlstm": 1, "minlstm_unnormalized": 2}
CANDIDATES = {"identity": 0, "g": 1}


class NativeGates(NamedTuple):
    """Names the gate function of a recurrence for the compiled kernels.

    A layer passes it next to its (pure-JAX) coefficient function, which it
    must equal: ``kind`` one of :data:`GATE_KINDS`, ``candidate`` one of
    :data:`CANDIDATES`, and ``bias(params)`` the float32 bias ``(n * d_h,)``
    (or ``None``) that the coefficient function adds to the pre-activations.
    """

    kind: str
    candidate: str
    bias: object  # params -> Optional[Array]

    @property
    def blocks(self) -> int:
        return 2 if self.kind == "mingru" else 3


_lock = threading.Lock()
_state = {"checked": False, "ok": False, "error": None}


def _cache_dir() -> Path:
    if os.environ.get("FLAX_MINRNN_CACHE"):
        return Path(os.environ["FLAX_MINRNN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flax_minrnn"


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and its flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [l for l in f if l.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _compiler() -> Optional[str]:
    cxx = os.environ.get("CXX", "g++")
    return shutil.which(cxx)


def _build(cxx: str) -> Path:
    """Compiles the kernels (or finds them in the cache); returns the library."""
    import jaxlib  # pylint: disable=g-import-not-at-top
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    key = hashlib.sha256("\0".join([
        _SOURCE.read_text(encoding="utf-8"), " ".join(_FLAGS), version,
        jaxlib.__version__, _cpu_id()]).encode()).hexdigest()[:20]
    cache = _cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir()) / "flax_minrnn"
        cache.mkdir(parents=True, exist_ok=True)
    lib = cache / f"gates-{key}.so"
    if lib.exists():
        return lib
    # Built under a unique name, then renamed: concurrent processes (pytest
    # workers) never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        cmd = [cxx, *_FLAGS, "-I", jax.ffi.include_dir(), str(_SOURCE), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return lib


def available() -> bool:
    """Whether the compiled kernels are built, loaded and registered.

    The first call builds them (see the module docstring); ``False`` when
    ``FLAX_MINRNN_NATIVE=0``, when no C++ compiler is found, or when the build
    or the loading fails (one warning says why).
    """
    if _state["checked"]:
        return _state["ok"]
    with _lock:
        if _state["checked"]:
            return _state["ok"]
        ok = False
        if os.environ.get("FLAX_MINRNN_NATIVE", "1") in ("0", "false", "False", "no"):
            _state["error"] = "disabled by FLAX_MINRNN_NATIVE=0"
        elif _compiler() is None:
            _state["error"] = f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH"
        else:
            try:
                lib = ctypes.cdll.LoadLibrary(str(_build(_compiler())))
                for target, symbol in _TARGETS.items():
                    jax.ffi.register_ffi_target(
                        target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
                ok = True
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
                _state["error"] = f"{type(e).__name__}: {e}"
        if not ok and _state["error"] and not _state["error"].startswith("disabled"):
            warnings.warn("flax_minrnn: the compiled CPU kernels are unavailable ("
                          f"{_state['error']}); impl='auto' uses 'chunked'", RuntimeWarning,
                          stacklevel=2)
        _state.update(checked=True, ok=ok)
        return ok


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is ``False`` (``None`` when it is ``True``)."""
    available()
    return _state["error"]


def usable() -> bool:
    """Whether the kernels may run in the code being traced: they are built,
    the default backend is the CPU, and the trace is not inside
    ``shard_map`` (whose per-device types, varying or not along the manual
    mesh axes, the kernels' results would not carry)."""
    if jax.default_backend() != "cpu" or not available():
        return False
    try:
        manual = jax.sharding.get_abstract_mesh().manual_axes
    except AttributeError:  # a JAX without abstract meshes has no such types
        manual = ()
    return not manual


def empty(shape: Sequence[int], dtype) -> Array:
    """An array of ``shape`` and ``dtype`` with unspecified contents (XLA
    allocates it; nothing writes it).  Only for buffers the caller then
    writes completely."""
    return jax.ffi.ffi_call("fmr_empty", jax.ShapeDtypeStruct(tuple(shape), dtype),
                            vmap_method="broadcast_all")()


def _attrs(spec: NativeGates, reverse: bool):
    return dict(kind=np.int32(GATE_KINDS[spec.kind]),
                cand=np.int32(CANDIDATES[spec.candidate]), reverse=np.int32(bool(reverse)))


def gates_forward(spec: NativeGates, pre: Array, bias: Array, h0: Array,
                  reverse: bool) -> Tuple[Array, Array]:
    """The recurrence on ``pre`` ``(B, T, n*D)`` (unbiased projections,
    float32 or bfloat16) from the float32 state ``h0`` ``(B, D)``; ``bias``
    float32.  Returns float32 ``(h_last, h)`` with ``h`` ``(B, T, D)``."""
    batch, seq_len, _ = pre.shape
    out = (jax.ShapeDtypeStruct(h0.shape, jnp.float32),
           jax.ShapeDtypeStruct((batch, seq_len, h0.shape[1]), jnp.float32))
    call = jax.ffi.ffi_call("fmr_gates_forward", out, vmap_method="sequential")
    return call(pre, bias, h0, **_attrs(spec, reverse))


def gates_backward(spec: NativeGates, pre_buf: Array, bias: Array, h_buf: Array, h0: Array,
                   g: Array, dh: Array, start, length: int,
                   reverse: bool) -> Tuple[Array, Array, Array]:
    """The adjoint of :func:`gates_forward` for the tile of ``length`` steps
    at ``start``: ``g`` ``(B, T, D)`` the states' cotangents, ``dh`` the
    cotangent of the state after the tile (in scan order).  Returns ``(d pre
    (B, L, n*D) in pre_buf's dtype, cotangent of the state before the tile,
    d bias (n*D,) float32)``."""
    batch, _, width = pre_buf.shape
    out = (jax.ShapeDtypeStruct((batch, length, width), pre_buf.dtype),
           jax.ShapeDtypeStruct(dh.shape, jnp.float32),
           jax.ShapeDtypeStruct((width,), jnp.float32))
    call = jax.ffi.ffi_call("fmr_gates_backward", out, vmap_method="sequential")
    return call(pre_buf, bias, h_buf, h0, g, dh, jnp.asarray(start, jnp.int32),
                **_attrs(spec, reverse))
