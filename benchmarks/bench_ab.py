"""Interleaved A/B of this checkout's layers against another commit's, in one process.

Run::

    python -m benchmarks.bench_ab --base 93fcfe8            # vs that commit's scan_impl="auto"
    python -m benchmarks.bench_ab --base HEAD~3 --T 1024 4096 --rounds 9
    python -m benchmarks.bench_ab --base HEAD~1 --transform jvp   # forward mode

The package of ``--base`` is exported with ``git archive`` into a temporary
folder and imported under another name (``flax_minrnn_base``), so both
versions run side by side in the same plain process (nothing tuned unless
``--malloc tuned``).  Per layer and T, forward+backward (``value_and_grad``
of ``sum(y)`` w.r.t. parameters and input: the loss and its gradients, as
training computes them; B = 8, d = 256, float32) of:

* ``head[auto]`` and ``head[native]``: this checkout;
* ``base[auto]``: the base commit's default;
* the naive minGRU of :mod:`benchmarks.bench_layers` (one fused ``Dense`` and
  ``lax.scan``; issue 17's baseline for all three layers), in every layer's
  rounds, so that ``naive / head`` divides two times of the same rounds;
* ``nn.RNN(GRUCell)`` of the same width, in the MinGRU rounds only (it is
  several times slower than the rest, and timing it three times per length
  would triple the run).  The MinLSTM and GatedLinearRNN rows' GRU ratios
  divide by that time, taken in other rounds than theirs: the report marks
  them "(from the MinGRU rounds)";
* ``own naive``: the naive version of the same layer, written the same way
  (the MinGRU's is the naive minGRU);
* ``products``: the layer's input-projection products alone (``x W``, ``g
  W^T``, ``x^T g`` for a fixed cotangent ``g``), as the chunked scan's tile
  loop runs them and nothing else (:func:`products_fwdbwd`).  ``naive /
  products`` is what ``naive / head`` would be if the layer spent no time
  outside those products *in that tiling*: a reference for the chunked
  scan, not a bound on every implementation (another tiling, or a kernel
  that fuses the products with the scan, could run them faster).

With ``--transform jvp`` every variant runs forward mode instead
(``jax.jvp`` of ``y`` for fixed random tangents of the parameters and the
input), and there is no ``products`` column.

The rounds are interleaved (every variant once per round, in an order that
changes from round to round so that no variant always follows the same one:
:func:`benchmarks.harness.interleaved`) and the report gives medians and
ratios, and each variant's trace + compile time (one fresh compile).
Parameters are shared (the param trees are identical across the versions).
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from benchmarks.bench_layers import make_input, naive_layer
from flax_minrnn.ops import gated as gated_lib

REPO = harness.REPO
BASE_PACKAGE = "flax_minrnn_base"


class BaseRefError(RuntimeError):
    """``--base`` names no commit whose ``flax_minrnn/`` git can export."""


def _git_error(result) -> str:
    """git's message: the first line of its stderr (the rest are hints)."""
    lines = [l.strip() for l in (result.stderr or "").splitlines() if l.strip()]
    return lines[0] if lines else f"git exited with status {result.returncode}"


def resolve_commit(ref: str) -> str:
    """The full hash of the commit ``ref`` names (``git rev-parse``); raises
    :class:`BaseRefError` with git's message."""
    if ref.startswith("-"):
        raise BaseRefError(f"{ref!r} is not a commit (it starts with '-')")
    try:
        out = harness.git("rev-parse", f"{ref}^{{commit}}")
    except (OSError, subprocess.SubprocessError) as e:
        raise BaseRefError(f"cannot run git: {e}") from e
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 1:
        raise BaseRefError(f"{ref!r} is not a commit of {REPO}: {_git_error(out)}")
    return lines[0]


def export_base(commit: str, dest: pathlib.Path) -> str:
    """Exports ``flax_minrnn/`` of ``commit`` as the package ``flax_minrnn_base``
    (importable once ``dest`` is on ``sys.path``)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "flax_minrnn"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise BaseRefError(f"git archive {commit} flax_minrnn: "
                           f"{archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    src, out = dest / "flax_minrnn", dest / BASE_PACKAGE
    src.rename(out)
    for path in out.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        path.write_text(re.sub(r"\bflax_minrnn\b", BASE_PACKAGE, text), encoding="utf-8")
    return BASE_PACKAGE


def _forget_base() -> None:
    """Drops the imported base package, so that a later export imports afresh."""
    for name in [m for m in sys.modules
                 if m == BASE_PACKAGE or m.startswith(BASE_PACKAGE + ".")]:
        del sys.modules[name]


# Columns of in_proj per family (d_h = d): MinGRU [z, h~], MinLSTM [f, i, h~],
# GatedLinearRNN (tied gates) [candidate, input gate, output gate].
PROJECTED = {"MinGRU": 2, "MinLSTM": 3, "GatedLinearRNN": 3}


def products_fwdbwd(b: int, t: int, d: int, n: int):
    """``f(x, kernel, g) -> (pre, dx, dkernel)``: the products of a layer's
    forward+backward alone, ``x @ kernel`` (kernel ``(d, n)``), ``dx = g @
    kernel.T`` and ``dkernel = x.T @ g``, as the chunked scan runs them: the
    forward for the whole sequence, one product per ``d``-wide block of
    columns, the backward tile by tile (same tile size, or one tile when
    ``t`` is not a multiple of it), visiting the tiles in reverse and
    accumulating ``dkernel``.

    As in the layers (``flax_minrnn.ops.gated.tiles_backward``), ``dx`` is
    written tile by tile over the first ``d``-wide block of the forward
    product, with no buffer of its own and no fill of zeros; ``pre`` is the
    tuple of the other blocks.  Where the blocks are not ``d`` wide (``n``
    not a multiple of ``d``) ``dx`` starts from zeros, as the layers' does
    then."""
    tile = gated_lib.tile_size(b * n * 4, t)
    if t % tile:
        tile = t
    tiles = t // tile
    width = d if n % d == 0 else n

    def run(x, kernel, g):
        pre = tuple(jnp.einsum("bti,io->bto", x, kernel[:, lo:lo + width])
                    for lo in range(0, n, width))

        def backward(i, carry):
            dx, dk = carry
            start = (tiles - 1 - i) * tile
            x_t = jax.lax.dynamic_slice_in_dim(x, start, tile, 1)
            g_t = jax.lax.dynamic_slice_in_dim(g, start, tile, 1)
            dx = jax.lax.dynamic_update_slice_in_dim(
                dx, jnp.einsum("bto,io->bti", g_t, kernel), start, 1)
            return dx, dk + jnp.einsum("bti,bto->io", x_t, g_t)

        reuse = pre[0].shape == x.shape
        dx = pre[0] if reuse else jnp.zeros_like(x)
        dx, dk = jax.lax.fori_loop(0, tiles, backward, (dx, jnp.zeros_like(kernel)))
        return (pre[1:] if reuse else pre), dx, dk

    return jax.jit(run)


def _output(module, pair: bool):
    """``(params, x) -> y``: the output of ``module.apply`` (its second element
    when ``pair``: our layers return ``(carry, y)``, the peers ``y`` alone)."""
    def apply(params, x):
        out = module.apply(params, x)
        return out[1] if pair else out
    return apply


def fwdbwd(module, pair: bool = True):
    """Jitted ``value_and_grad`` of ``sum(y)`` w.r.t. parameters and input
    (``y`` as in :func:`_output`): ``(loss, (d params, d x))``.  The loss is
    returned, as a training step has it, so that XLA keeps the forward
    products only ``y`` needs (an output projection's ``z W``)."""
    apply = _output(module, pair)
    return jax.jit(jax.value_and_grad(
        lambda params, x: jnp.sum(apply(params, x).astype(jnp.float32)), argnums=(0, 1)))


def forward_mode(module, pair: bool = True):
    """Jitted ``jax.jvp`` of ``y`` (as in :func:`_output`) at ``(params, x)``
    along the tangents ``(d_params, d_x)``: ``(y, dy)``."""
    apply = _output(module, pair)
    return jax.jit(lambda params, x, d_params, d_x: jax.jvp(apply, (params, x),
                                                             (d_params, d_x)))


TRANSFORMS = {"grad": fwdbwd, "jvp": forward_mode}


def _tangents(params, x):
    """Fixed random tangents like ``(params, x)``."""
    leaves, tree = jax.tree.flatten((params, x))
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, v.shape, v.dtype)
                                     for k, v in zip(keys, leaves)])


def run(base_commit: str, ts: Sequence[int], rounds: int, b: int = 8, d: int = 256,
        log=print, transform: str = "grad") -> Dict:
    """Times every variant; ``base_commit`` is any ref git resolves (raises
    :class:`BaseRefError` before any work when it names no commit).  The
    exported package lives in a temporary folder, removed on return or error."""
    resolved = resolve_commit(base_commit)
    with tempfile.TemporaryDirectory(prefix="bench_ab_") as tmp:
        _forget_base()
        sys.path.insert(0, tmp)
        importlib.invalidate_caches()
        try:
            base = importlib.import_module(export_base(resolved, pathlib.Path(tmp)))
            return _run(base, base_commit, resolved, ts, rounds, b, d, log, transform)
        finally:
            sys.path.remove(tmp)
            _forget_base()


def _run(base, base_ref: str, base_commit: str, ts: Sequence[int], rounds: int, b: int,
         d: int, log, transform: str) -> Dict:
    head = importlib.import_module("flax_minrnn")
    # machine: the head's commit (git_commit) and whether its tree was dirty.
    results = {"machine": harness.machine_info(), "base": base_ref,
               "base_commit": base_commit, "B": b, "D": d,
               "rounds": rounds, "transform": transform, "rows": []}
    build = TRANSFORMS[transform]
    for t in ts:
        x = make_input(b, t, d)
        for family in ("MinGRU", "MinLSTM", "GatedLinearRNN"):
            kw = dict(d_h=d, d_model=d) if family == "GatedLinearRNN" else dict(d_h=d)
            variants = {
                "head[auto]": build(getattr(head, family)(scan_impl="auto", **kw)),
                "base[auto]": build(getattr(base, family)(scan_impl="auto", **kw)),
            }
            if family != "GatedLinearRNN":
                variants["head[native]"] = build(getattr(head, family)(scan_impl="native",
                                                                         **kw))
            n_cols = PROJECTED[family] * d
            if transform == "grad":
                variants["products"] = products_fwdbwd(b, t, d, n_cols)
            # The naive minGRU in every family's rounds (the baseline of all
            # three); the GRU in the MinGRU rounds only (see the docstring).
            peers = {"naive": naive_layer("MinGRU", d)}
            if family == "MinGRU":
                peers["gru"] = nn.RNN(nn.GRUCell(features=d))
            else:
                peers["own_naive"] = naive_layer(family, d)
            for k, module in peers.items():
                variants[k] = build(module, pair=False)
            params = getattr(head, family)(**kw).init(jax.random.PRNGKey(0), x[:, :4])
            peer_params = {k: module.init(jax.random.PRNGKey(0), x[:, :4])
                           for k, module in peers.items()}
            args = {k: (peer_params.get(k, params), x) for k in variants}
            if transform == "jvp":
                args = {k: v + _tangents(*v) for k, v in args.items()}
            else:
                args["products"] = (x, make_input(1, d, n_cols, seed=1)[0],
                                    make_input(b, t, n_cols, seed=2))
            compiled, compile_s = {}, {}
            for k, f in variants.items():
                t0 = time.perf_counter()
                compiled[k] = f.lower(*args[k]).compile()
                compile_s[k] = time.perf_counter() - t0
                jax.block_until_ready(compiled[k](*args[k]))
                log(f"T={t} {family} {k}: traced and compiled in {compile_s[k]:.2f} s")
            times = harness.interleaved({k: (compiled[k], args[k]) for k in variants}, rounds)
            med = {k: float(np.median(v)) for k, v in times.items()}
            row = dict(T=t, family=family, median_ms=med, all_ms=times, compile_s=compile_s)
            results["rows"].append(row)
            log(f"T={t} {family}: " + "  ".join(f"{k} {v:.1f} ms" for k, v in med.items()))
    # After the timings: whether head[native] (and the base's kernels, where
    # its version has them) ran compiled kernels or fell back to chunked.
    results["native_kernels"] = harness.native_kernels(head.__name__)
    results["base_native_kernels"] = harness.native_kernels(base.__name__)
    return results


def report(results: Dict) -> str:
    what = {"grad": "fwd+bwd", "jvp": "jvp"}[results.get("transform", "grad")]
    base = results["base"]
    if results.get("base_commit") and not results["base_commit"].startswith(base):
        base = f"{base} ({results['base_commit'][:12]})"
    lines = [f"# A/B against {base} (B={results['B']}, d={results['D']}, "
             f"{what}, median of {results['rounds']} interleaved rounds, "
             f"malloc {results['machine'].get('malloc')})", "",
             f"Machine: {results['machine']['cpu_model']} ({results['machine']['cpu_count']} "
             f"CPUs), jax {results['machine']['jax_version']}; head: "
             f"{harness.run_stamp(results['machine'])}; head "
             f"{harness.native_note(results.get('native_kernels'))}; base "
             f"{harness.native_note(results.get('base_native_kernels'), 'its fallback ran')}"
             ".", "",
             "`products`: the layer's input-projection products alone, as the chunked "
             "scan's tile loop runs them; naive/products and GRU/products are what "
             "naive/head and GRU/head would be if the layer spent no time outside those "
             "products in that tiling (a reference, not a bound on every implementation). "
             "`naive`: the naive minGRU (the baseline for every layer), timed in every "
             "row's rounds; `own naive`: the naive version of the same layer. The GRU "
             "runs in the MinGRU rounds only: a ratio marked † divides by that time, "
             "from other rounds than the row's (as does a naive ratio marked †, in "
             "results from before the naive minGRU ran in every row's rounds).", "",
             "| T | layer | head auto ms | base auto ms | head/base | head native ms | "
             "naive ms | naive/head | own naive ms | own naive/head | GRU ms | GRU/head | "
             "products ms | naive/products | GRU/products |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    naive = {r["T"]: r["median_ms"].get("naive") for r in results["rows"]
             if r["family"] == "MinGRU"}
    gru = {r["T"]: r["median_ms"].get("gru") for r in results["rows"]
           if r["family"] == "MinGRU"}
    for r in results["rows"]:
        m = r["median_ms"]
        head_ms = m["head[auto]"]
        # A dagger: the divisor was timed in the MinGRU rounds, not this row's.
        nv, n_mark = m.get("naive"), ""
        if nv is None:
            nv, n_mark = naive.get(r["T"]), "†"
        gv, g_mark = m.get("gru"), ""
        if gv is None:
            gv, g_mark = gru.get(r["T"]), "†"
        speedup = "–" if nv is None else f"{nv / head_ms:.2f}{n_mark}"
        gru_ratio = "–" if gv is None else f"{gv / head_ms:.1f}{g_mark}"
        prod = m.get("products")
        bound = "–" if nv is None or prod is None else f"{nv / prod:.2f}{n_mark}"
        gru_bound = "–" if gv is None or prod is None else f"{gv / prod:.1f}{g_mark}"
        own = m.get("own_naive", m.get("naive"))
        own_ratio = "–" if own is None else f"{own / head_ms:.2f}"
        lines.append(harness.md_row([
            r["T"], r["family"], f"{head_ms:.1f}", f"{m['base[auto]']:.1f}",
            f"{head_ms / m['base[auto]']:.2f}", harness.fmt_ms(m.get("head[native]")),
            harness.fmt_ms(nv), speedup, harness.fmt_ms(own), own_ratio, harness.fmt_ms(gv),
            gru_ratio, harness.fmt_ms(prod), bound, gru_bound]))
    lines += ["", "Trace + compile of each variant (`jit(f).lower(...).compile()`, one fresh "
              "compile, s):", "",
              "| T | layer | head auto | base auto | head/base | own naive |",
              "|---:|---|---:|---:|---:|---:|"]
    for r in results["rows"]:
        c = r.get("compile_s", {})
        if "head[auto]" not in c:
            continue
        naive_s = c.get("own_naive", c.get("naive"))
        lines.append(harness.md_row([
            r["T"], r["family"], f"{c['head[auto]']:.2f}", f"{c['base[auto]']:.2f}",
            f"{c['head[auto]'] / c['base[auto]']:.2f}",
            "–" if naive_s is None else f"{naive_s:.2f}"]))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True,
                   help="the commit to compare against: any ref git resolves (required; "
                        "the JSON keeps it as typed and its full hash)")
    p.add_argument("--rounds", type=harness.positive_int, default=12,
                   help="interleaved rounds per length and layer (default: 12)")
    p.add_argument("--transform", choices=sorted(TRANSFORMS), default="grad",
                   help="what every variant runs: grad (forward+backward, the default) or "
                        "jvp (forward mode)")
    harness.add_report_flags(p, "bench_ab")
    args = p.parse_args(argv)
    harness.apply_malloc(args.malloc)
    try:
        results = run(args.base, args.T, args.rounds, transform=args.transform)
    except BaseRefError as e:
        print(f"bench_ab: error: --base {args.base}: {e}", file=sys.stderr)
        return 2
    harness.emit_report(results, report(results), args.out, "bench_ab")
    return 0


if __name__ == "__main__":
    sys.exit(main())
