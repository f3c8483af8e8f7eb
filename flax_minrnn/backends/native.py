"""Compiled XLA:CPU kernels for the gates of MinGRU and MinLSTM (``scan_impl="native"``).

An opt-in backend: nothing reaches it unless ``scan_impl="native"`` is named
(the trainer's ``train.cpu_kernels`` config field names it).
``csrc/gates.cc`` holds XLA FFI handlers for the gates and recurrence of
MinGRU and MinLSTM: a forward pass over the whole sequence (bias, gates,
candidate and recurrence in one pass after one product ``x @ W``) and the
adjoint of one tile (the gates' and the recurrence's adjoint in one pass,
then ``dx_t = dpre_t W^T`` and ``dW += x_t^T dpre_t``).  The gate equations
are those of :mod:`flax_minrnn.nn.gates`, which the tests compare the
kernels against; everything the kernels do not cover (masks, resets,
GatedLinearRNN's output gate, float16, other candidate activations, bodies
of ``shard_map``, no compiler) runs ``"chunked"``, bit for bit.

The source is compiled on first use with the system's C++ compiler (``$CXX``,
which may hold a launcher or flags, as ``"ccache g++"``; else ``g++``; ``-O3
-march=native``, a few seconds) into a cache directory (``$FLAX_MINRNN_CACHE``,
else ``$XDG_CACHE_HOME/flax_minrnn`` or ``~/.cache/flax_minrnn``), keyed by
the source, the flags, the compiler's version, the jaxlib version and the CPU
(model and flags), and loaded from there afterwards.  The library's SHA-256
is written beside it, and a library without a matching one (cut short by a
crash, say) is built again rather than loaded; the library is readable by
every user, and a cache directory that cannot be written is passed over for
one in the temporary directory.  Where no compiler is found or the build
fails, :func:`available` is ``False`` (one warning names the cause) and
``"native"`` runs ``"chunked"``.  ``FLAX_MINRNN_NATIVE=0`` turns the kernels
off.

Transformations: ``jit``, ``grad``/``vjp``, ``jvp`` and ``linearize`` (whose
tangents run the pure-JAX tile loop), ``vmap``, ``jax.checkpoint`` and
``eval_shape`` work.  Second derivatives (Hessian-vector products, ``grad``
of ``grad``) raise :class:`flax_minrnn.ops.linear.SecondOrderError`, and
``jax.export`` raises ``ValueError`` (the kernels live in this process):
both name ``scan_impl="chunked"``, which computes the same function.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
import functools
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from flax_minrnn.ops import gated as gated_lib
from flax_minrnn.ops import scan as scan_lib
from flax_minrnn.ops.linear import SecondOrderError, linear_op, refuse_export

__all__ = ["available", "unavailable_reason", "gated", "GATE_KINDS", "CANDIDATES"]

Array = jax.Array

_SOURCE = Path(__file__).with_name("csrc") / "gates.cc"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-Wno-return-type")
_TARGETS = {"flax_minrnn_native_gates_forward": "FmrGatesForward",
            "flax_minrnn_native_gates_backward": "FmrGatesBackward",
            "flax_minrnn_native_empty": "FmrEmpty"}

# The gate functions the kernels implement (``kind`` in gates.cc), and the
# candidate activations (``cand``).
GATE_KINDS = {"mingru": 0, "minlstm": 1, "minlstm_unnormalized": 2}
CANDIDATES = {"identity": 0, "g": 1}


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


def _compiler() -> Optional[Sequence[str]]:
    """``$CXX`` (else ``g++``) as a command: its first word resolved on the
    PATH, the rest kept (``CXX="ccache g++"``); ``None`` when not found."""
    words = shlex.split(os.environ.get("CXX", "g++"))
    found = shutil.which(words[0]) if words else None
    return None if found is None else [found, *words[1:]]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """``path`` gets ``data`` whole or not at all: written to a unique file in
    its directory, flushed to disk, given ``mode``, then renamed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _cached(lib: Path) -> bool:
    """Whether ``lib`` is a complete build: it has the SHA-256 recorded next
    to it when it was written.  (Loading a truncated library can kill the
    process with SIGBUS, so nothing else is loaded.)"""
    digest = lib.with_name(lib.name + ".sha256")
    try:
        return digest.read_text(encoding="ascii").strip() == _sha256(lib)
    except (OSError, UnicodeDecodeError):
        return False


def _build(cxx: Sequence[str]) -> Path:
    """Compiles the kernels (or finds them in the cache); returns the library."""
    import jaxlib  # pylint: disable=g-import-not-at-top
    version = subprocess.run([*cxx, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    key = hashlib.sha256("\0".join([
        _SOURCE.read_text(encoding="utf-8"), " ".join(_FLAGS), " ".join(cxx[1:]), version,
        jaxlib.__version__, _cpu_id()]).encode()).hexdigest()[:20]
    name = f"gates-{key}.so"
    caches = [_cache_dir(), Path(tempfile.gettempdir()) / "flax_minrnn"]
    for cache in caches:
        if _cached(cache / name):
            return cache / name
    errors = []
    for cache in caches:
        # The first cache that takes the files; a read-only one (shared, or
        # another user's) is skipped.
        try:
            cache.mkdir(parents=True, exist_ok=True)
            return _compile(cxx, cache / name)
        except OSError as e:
            errors.append(f"{cache}: {e}")
    raise OSError("no writable cache directory for the compiled kernels: " + "; ".join(errors))


def _compile(cxx: Sequence[str], lib: Path) -> Path:
    """Compiles the source into ``lib``, then records its SHA-256 beside it
    (:func:`_cached`).  Both are written under unique names and renamed, so
    concurrent processes (pytest workers) never see a half-written file;
    the library is readable by everyone (a cache may be shared)."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        cmd = [*cxx, *_FLAGS, "-I", jax.ffi.include_dir(), str(_SOURCE), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        data = Path(tmp).read_bytes()
    finally:
        os.remove(tmp)
    _write_atomically(lib, data, 0o755)
    _write_atomically(lib.with_name(lib.name + ".sha256"),
                      hashlib.sha256(data).hexdigest().encode("ascii"), 0o644)
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
                          f"{_state['error']}); scan_impl='native' runs 'chunked'",
                          RuntimeWarning, stacklevel=_caller_stacklevel())
        _state.update(checked=True, ok=ok)
        return ok


def _caller_stacklevel() -> int:
    """``stacklevel`` for a warning raised by its caller that points at the
    first frame outside flax_minrnn, JAX and Flax (the user's call)."""
    internal = tuple(os.path.dirname(m.__file__) + os.sep
                     for m in (sys.modules.get(name) for name in ("flax_minrnn", "jax", "flax"))
                     if m is not None and getattr(m, "__file__", None))
    frame, level = sys._getframe(1), 1  # pylint: disable=protected-access
    while frame.f_back is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


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


def _require() -> None:
    """Raises unless the kernels are registered (:func:`available`)."""
    if not available():
        raise RuntimeError(f"the compiled CPU kernels are unavailable ({_state['error']}); "
                           "flax_minrnn.backends.native.available() says whether they are, "
                           "and scan_impl='chunked' computes the same function in plain JAX")


def empty(shape: Sequence[int], dtype) -> Array:
    """An array of ``shape`` and ``dtype`` with unspecified contents (XLA
    allocates it; nothing writes it).  Only for buffers the caller then
    writes completely."""
    _require()
    return jax.ffi.ffi_call("flax_minrnn_native_empty", jax.ShapeDtypeStruct(tuple(shape), dtype),
                            vmap_method="broadcast_all")()


def _attrs(spec, reverse: bool):
    return dict(kind=np.int32(GATE_KINDS[spec.kind]),
                cand=np.int32(CANDIDATES[spec.candidate]), reverse=np.int32(bool(reverse)))


def gates_forward(spec, pre: Array, bias: Array, h0: Array,
                  reverse: bool) -> Tuple[Array, Array]:
    """The recurrence on ``pre`` ``(B, T, n*D)`` (unbiased projections,
    float32 or bfloat16) from the float32 state ``h0`` ``(B, D)``; ``bias``
    float32.  Returns float32 ``(h_last, h)`` with ``h`` ``(B, T, D)``."""
    _require()
    batch, seq_len, _ = pre.shape
    out = (jax.ShapeDtypeStruct(h0.shape, jnp.float32),
           jax.ShapeDtypeStruct((batch, seq_len, h0.shape[1]), jnp.float32))
    call = jax.ffi.ffi_call("flax_minrnn_native_gates_forward", out, vmap_method="sequential")
    return call(pre, bias, h0, **_attrs(spec, reverse))


def gates_backward(spec, pre_buf: Array, bias: Array, h_buf: Array, h0: Array,
                   g: Array, dh: Array, start, length: int,
                   reverse: bool) -> Tuple[Array, Array, Array]:
    """The adjoint of :func:`gates_forward` for the tile of ``length`` steps
    at ``start``: ``g`` ``(B, T, D)`` the states' cotangents, ``dh`` the
    cotangent of the state after the tile (in scan order).  Returns ``(d pre
    (B, L, n*D) in pre_buf's dtype, cotangent of the state before the tile,
    d bias (n*D,) float32)``."""
    _require()
    batch, _, width = pre_buf.shape
    out = (jax.ShapeDtypeStruct((batch, length, width), pre_buf.dtype),
           jax.ShapeDtypeStruct(dh.shape, jnp.float32),
           jax.ShapeDtypeStruct((width,), jnp.float32))
    call = jax.ffi.ffi_call("flax_minrnn_native_gates_backward", out, vmap_method="sequential")
    return call(pre_buf, bias, h_buf, h0, g, dh, jnp.asarray(start, jnp.int32),
                **_attrs(spec, reverse))


# ----------------------------------------------------------------------------
# The limits, with errors that name the way out.

_SECOND_ORDER = ("scan_impl='native' has first derivatives only (its kernels are not "
                 "differentiable); use scan_impl='chunked' (the same function in plain JAX) "
                 "for second derivatives such as Hessian-vector products or grad of grad")
_EXPORT = ("scan_impl='native' cannot be exported with jax.export (its compiled kernels "
           "live in this process); use scan_impl='chunked', the same function in plain JAX")

# ----------------------------------------------------------------------------
# The layers' entry point (flax_minrnn.ops.gated.run, impl="native").


class _Spec(NamedTuple):
    kind: str
    candidate: str

    @property
    def blocks(self) -> int:
        return 2 if self.kind == "mingru" else 3


def _bias(params, width: int) -> Array:
    bias = params[0]
    return jnp.zeros((width,), jnp.float32) if bias is None else bias  # float32 (_applies)


@jax.custom_jvp
def _nondifferentiable(x):
    return x


@_nondifferentiable.defjvp
def _nondifferentiable_jvp(primals, tangents):
    raise SecondOrderError(_SECOND_ORDER)


def _forward(spec: _Spec, x, kernel, params, h0, reverse: bool):
    """``(h_last, h, pre)``: one product for the whole sequence (its output is
    kept for the backward pass anyway) and one kernel call."""
    pre = jnp.einsum("bti,io->bto", x, kernel)
    h_last, h = gates_forward(spec, refuse_export(pre, _EXPORT), _bias(params, kernel.shape[1]),
                              h0, reverse)
    return h_last, h, pre


def _backward(spec: _Spec, reverse: bool, tile: int, x, kernel, params, h0, h, pre, g,
              g_last):
    """``(dx, dkernel, dparams, dh0)``: the tile loop of ``"chunked"``'s adjoint,
    with the gates' and the recurrence's adjoint of each tile in one kernel call."""
    # The kernel reads g whole: a g that XLA could compute in the loop (the
    # broadcast cotangent of a sum, say) is materialised once, not per tile.
    g = jax.lax.optimization_barrier(g)
    seq_len = x.shape[1]
    bias = _bias(params, kernel.shape[1])
    num_full, rem, full_start, rem_start = scan_lib.blocks(seq_len, tile, not reverse)

    def run_tile(dh, dx, dkernel, dbias, start, length):
        dpre, dh, db = gates_backward(spec, pre, bias, h, h0, g, dh, start, length, reverse)
        x_t = jax.lax.dynamic_slice_in_dim(x, start, length, 1)
        dx_t = jnp.einsum("bto,io->bti", dpre, kernel)
        dk_t = jnp.einsum("bti,bto->io", x_t, dpre, preferred_element_type=jnp.float32)
        dx = jax.lax.dynamic_update_slice_in_dim(dx, gated_lib._stored(dx_t), start, 1)  # pylint: disable=protected-access
        return dh, dx, dkernel + dk_t, dbias + db

    def body(i, carry):
        return run_tile(*carry, full_start(i), tile)

    stored = jnp.uint16 if x.dtype == jnp.bfloat16 else x.dtype
    carry = (g_last, empty(x.shape, stored), jnp.zeros(kernel.shape, jnp.float32),
             jnp.zeros(bias.shape, jnp.float32))
    carry = jax.lax.fori_loop(0, num_full, body, carry)
    if rem:
        carry = run_tile(*carry, rem_start, rem)
    dh0, dx, dkernel, dbias = carry
    dx = gated_lib._loaded(dx, x.dtype)  # pylint: disable=protected-access
    d_rec_bias = None if params[0] is None else dbias.astype(params[0].dtype)
    dparams = (d_rec_bias,) + tuple(jax.tree.map(jnp.zeros_like, p) for p in params[1:])
    return dx, dkernel.astype(kernel.dtype), dparams, dh0


def _tangent(static, res, lin):
    """Forward mode: the tangent loop of ``"chunked"``, from the kernel's
    states and projection."""
    coeffs, reverse, tile = static
    x, kernel, consts, params, h0, h, pre = res
    return gated_lib.tiles_tangent(coeffs, None, x, kernel, consts, params, h0, h, (pre,), None,
                                   *lin, reverse, tile, 0, x.shape[1])


def _adjoint(spec, static, res, ct):
    _, reverse, tile = static
    x, kernel, _, params, h0, h, pre = res
    g_last, g = ct
    return _backward(spec, reverse, tile, x, kernel, params, h0, h, pre, g, g_last)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 7, 8))
def _native(spec, coeffs, x, kernel, consts, params, h0, reverse: bool, tile: int):
    h_last, h, _ = _forward(spec, x, kernel, params, h0, reverse)
    return h_last, h


@_native.defjvp
def _native_jvp(spec, coeffs, reverse, tile, primals, tangents):
    x, kernel, consts, params, h0 = primals
    dx, dkernel, _, dparams, dh0 = tangents
    # The kernels are not differentiable: a second derivative stops here.
    guard = lambda tree: jax.tree.map(_nondifferentiable, tree)
    h_last, h, pre = _forward(spec, guard(x), guard(kernel), guard(params), guard(h0), reverse)
    static = (coeffs, reverse, tile)
    tangent = linear_op(functools.partial(_tangent, static),
                        functools.partial(_adjoint, spec, static),
                        (x, kernel, consts, params, h0, h, pre), (dx, dkernel, dparams, dh0),
                        no_second_order=_SECOND_ORDER)
    return (h_last, h), tangent


def _applies(spec, x, kernel, consts, params, h0, n_side) -> bool:
    """Whether the kernels can run these arguments (else ``"chunked"`` does)."""
    if spec is None or kernel is None or n_side:
        return False
    if spec.kind not in GATE_KINDS or spec.candidate not in CANDIDATES:
        return False
    if any(c is not None for c in consts):
        return False
    f32 = jnp.dtype(jnp.float32)
    if x.dtype != kernel.dtype or x.dtype not in (f32, jnp.dtype(jnp.bfloat16)):
        return False
    if h0.dtype != f32 or h0.ndim != 2:
        return False
    if kernel.shape[1] != spec.blocks * h0.shape[1]:
        return False
    bias = params[0] if isinstance(params, tuple) and params else None
    if bias is not None and (bias.dtype != f32 or bias.shape != (kernel.shape[1],)):
        return False
    return usable()


def gated(gate_name, coeffs, readout, x, kernel, consts, params, h0, reverse: bool, tile: int,
          n_side: int):
    """The layers' recurrence with the kernels, or ``None`` where they do not apply.

    ``gate_name`` is ``(kind, candidate)`` (:data:`GATE_KINDS`,
    :data:`CANDIDATES`) naming ``coeffs``, whose bias is ``params[0]``; the
    arguments are those of :func:`flax_minrnn.ops.gated.tiles_forward`.
    Returns ``(h_last, h)``, or ``(h_last, y)`` with ``readout``.
    """
    spec = None if gate_name is None else _Spec(*gate_name)
    if not _applies(spec, x, kernel, consts, params, h0, n_side):
        return None
    h_last, h = _native(spec, coeffs, x, kernel, consts, params, h0, reverse, tile)
    if readout is None:
        return h_last, h
    # A readout without side columns (out_proj) on the whole sequence,
    # recomputed in the backward pass (h is kept anyway).
    return h_last, jax.checkpoint(readout)(h, None, consts, params)
