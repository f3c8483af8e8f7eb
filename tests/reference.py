"""Independent float64 NumPy references, written for the tests only.

Nothing here imports flax_minrnn: these loops are the ground truth the library
is compared against.  The two log-space forms of the minGRU paper live here
as references too (the library keeps only linear-space scans: they cover
every sign of the inputs and keep their precision as T grows).
"""

import jax
import jax.numpy as jnp
import numpy as np


def scan_steps(batch, seq_len, *, reset=None, mask=None, reverse=False):
    """The valid ``(t, i, restart)`` of a recurrence in scan order: ``restart``
    when a document boundary lies before step ``t`` of row ``i`` (reversed,
    a reset at ``t + 1``), or lay before skipped steps since the last valid
    one."""
    order = range(seq_len - 1, -1, -1) if reverse else range(seq_len)
    pending = [False] * batch
    for t in order:
        for i in range(batch):
            boundary = reset is not None and bool(
                reset[i, t] if not reverse else (t + 1 < seq_len and reset[i, t + 1]))
            if mask is not None and not mask[i, t]:
                pending[i] = pending[i] or boundary
                continue
            yield t, i, boundary or pending[i]
            pending[i] = False


def linear_recurrence(a, b, h0=None, *, reset=None, mask=None, reverse=False):
    """h_t = a_t h_{t-1} + b_t, one step at a time in float64.

    reset[t]: the state restarts from zero at t (documents never mix, in either
    direction). mask[t] False: the step is skipped (state unchanged, output 0);
    a boundary that falls on a skipped step zeroes the state before the next
    step that is not skipped. Returns (h_last, h).
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    batch, seq_len = a.shape[:2]
    h = np.zeros((batch,) + a.shape[2:]) if h0 is None else np.array(h0, np.float64)
    out = np.zeros_like(a)
    for t, i, restart in scan_steps(batch, seq_len, reset=reset, mask=mask, reverse=reverse):
        if restart:
            h[i] = 0.0
        h[i] = a[i, t] * h[i] + b[i, t]
        out[i, t] = h[i]
    return h, out


def linear_recurrence_vjp(a, h0, h, g, g_last, *, reverse=False):
    """Gradients (da, db, dh0) of sum(g * h) + sum(g_last * h_last), float64.

    Plain (no reset/mask) recurrence; h are the forward states.
    """
    a = np.asarray(a, np.float64)
    seq_len = a.shape[1]
    lam = np.array(g_last, np.float64)
    da = np.zeros_like(a)
    db = np.zeros_like(a)
    order = range(seq_len) if reverse else range(seq_len - 1, -1, -1)
    nxt = None
    for t in order:
        if nxt is not None:
            lam = lam * a[:, nxt]
        lam = lam + g[:, t]
        db[:, t] = lam
        if reverse:
            h_prev = h[:, t + 1] if t + 1 < seq_len else h0
        else:
            h_prev = h[:, t - 1] if t > 0 else h0
        da[:, t] = lam * h_prev
        nxt = t
    dh0 = lam * a[:, nxt]
    return da, db, dh0


@jax.jit
def log_space_scan(a, b, h0=None):
    """The paper's log-space scan (forward, float32): an associative scan of
    ``(log a, log h)`` with a ``logaddexp`` combine.  Domain: ``a, b, h0 >= 0``;
    outside it the result is NaN.  Returns the states."""
    def combine(x, y):
        (la1, lb1), (la2, lb2) = x, y
        return la1 + la2, jnp.logaddexp(la2 + lb1, lb2)

    la, lb = jnp.log(a), jnp.log(b)
    if h0 is not None:
        lb = lb.at[:, 0].set(jnp.logaddexp(lb[:, 0], la[:, 0] + jnp.log(h0)))
    return jnp.exp(jax.lax.associative_scan(combine, (la, lb), axis=1)[1])


@jax.jit
def heinsen_scan(a, b):
    """The minGRU paper appendix's form (Heinsen): ``cumsum(log a)`` plus a
    ``logcumsumexp``, forward, from a zero state.  Domain ``a > 0, b >= 0``;
    its float32 error grows with T (the cumulative sum loses digits)."""
    a_star = jnp.cumsum(jnp.log(a), axis=1)
    return jnp.exp(a_star + jax.lax.cumlogsumexp(jnp.log(b) - a_star, axis=1))


def central_difference(loss, arr, eps=1e-6):
    """d loss() / d arr by central differences, float64.

    ``loss`` takes no argument and reads ``arr``, which is perturbed in place
    (and restored).
    """
    out = np.zeros(arr.shape)
    for idx in np.ndindex(arr.shape):
        orig = arr[idx]
        arr[idx] = orig + eps
        up = loss()
        arr[idx] = orig - eps
        out[idx] = (up - loss()) / (2 * eps)
        arr[idx] = orig
    return out


def rel_err(x, ref):
    """Norm-wise relative error max|x - ref| / max|ref|."""
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


# ----------------------------------------------------------------------------
# Layers, from the papers' equations, one step at a time in float64.

def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _dense(x, p):
    y = x @ np.asarray(p["kernel"], np.float64)
    if "bias" in p:
        y = y + np.asarray(p["bias"], np.float64)
    return y


def layer_step_coeffs(kind, pre, d_h, *, tied=True, normalize=True, g=False):
    """(a, b, o) of one step from the pre-activations, per the papers."""
    cand_act = (lambda v: np.where(v >= 0, v + 0.5, _sigmoid(v))) if g else (lambda v: v)
    if kind == "mingru":
        z = _sigmoid(pre[..., :d_h])
        return 1.0 - z, z * cand_act(pre[..., d_h:]), None
    if kind == "minlstm":
        f = _sigmoid(pre[..., :d_h])
        i = _sigmoid(pre[..., d_h:2 * d_h])
        if normalize:
            f, i = f / (f + i), i / (f + i)
        return f, i * cand_act(pre[..., 2 * d_h:]), None
    cand = np.tanh(pre[..., :d_h])
    gates = _sigmoid(pre[..., d_h:])
    if tied:
        i, o = gates[..., :d_h], gates[..., d_h:]
        f = 1.0 - i
    else:
        i, f, o = gates[..., :d_h], gates[..., d_h:2 * d_h], gates[..., 2 * d_h:]
    return f, i * cand, o


def layer_forward(kind, params, x, h0=None, *, true_recurrence=False, **kw):
    """A recurrent layer in float64: returns (h_last, y)."""
    x = np.asarray(x, np.float64)
    batch, seq_len, _ = x.shape
    pre_all = _dense(x, params["in_proj"])
    n_proj = {"mingru": 2, "minlstm": 3}.get(kind, 3 if kw.get("tied", True) else 4)
    d_h = pre_all.shape[-1] // n_proj
    h = np.zeros((batch, d_h)) if h0 is None else np.asarray(h0, np.float64)
    ys = []
    for t in range(seq_len):
        pre = pre_all[:, t]
        if true_recurrence:
            pre = pre + h @ np.asarray(params["recurrent_kernel"], np.float64)
        a, b, o = layer_step_coeffs(kind, pre, d_h, **kw)
        h = a * h + b
        ys.append(np.tanh(h) * o if kind == "glrnn" else h)
    y = np.stack(ys, 1)
    if "out_proj" in params:
        y = _dense(y, params["out_proj"])
    return h, y
