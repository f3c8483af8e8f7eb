"""Autoregressive generation with a recurrent LM: parallel prefill, O(1) decode.

:func:`generate` runs, inside one ``jax.jit``-compiled function:

1. *prefill*: the whole right-padded prompt in one parallel call with
   ``seq_lengths = prompt_lengths``; the returned carry is each row's state
   after its last prompt token, and ``logits[b, L_b - 1]`` predicts the first
   new token;
2. *decode*: a ``jax.lax.scan`` over the new tokens; each step feeds one token
   ``(batch, 1)`` and the carry through the model (``O(1)`` time and memory
   per token, whatever the length so far) and samples the next token with
   :func:`sample_logits`.

Memory is the carry plus the output buffer ``(batch, max_new_tokens)`` (and
``(batch, max_new_tokens, vocab)`` logits only with ``return_logits=True``).
The decode step is traced once per compilation; the compiled function is
cached on (model, shapes, ``max_new_tokens``, which filters are on), so
different prompts, seeds, temperatures, ``top_k``/``top_p`` values and
``eos_id`` values reuse it; ``bucket_lengths=True`` lets different prompt
lengths and ``max_new_tokens`` reuse it too (:func:`bucket_length`).

The model is any object with ``apply(variables, tokens, carry, seq_lengths=None)
-> (carry, logits)`` accepting ``carry=None`` (e.g. :class:`flax_minrnn.lm.LM`).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax_minrnn.ops import checks

Array = jax.Array

__all__ = ["GenerateOutput", "bucket_length", "generate", "sample_logits"]


class GenerateOutput(NamedTuple):
    """What :func:`generate` returns (always three fields).

    Attributes:
      tokens: int32 ``(batch, max_new_tokens)``: the new tokens only (not the
        prompt).  After a row's ``eos_id`` the rest is ``pad_id``.
      lengths: int32 ``(batch,)``: number of generated tokens of each row,
        the ``eos_id`` token included (``max_new_tokens`` if none).
      logits: float32 ``(batch, max_new_tokens, vocab)``, the raw logits each
        token was sampled from, when ``return_logits=True``; else ``None``.
    """

    tokens: Array
    lengths: Array
    logits: Optional[Array]


# ----------------------------------------------------------------------------
# Sampling.


def _concrete(x):
    return checks.concrete_or_none(x)  # pylint: disable=protected-access


def _check_sampling(temperature, top_k, top_p) -> None:
    t, k, p = _concrete(temperature), _concrete(top_k), _concrete(top_p)
    if t is not None and (not np.all(np.isfinite(t)) or np.any(t < 0)):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if k is not None and (not np.issubdtype(k.dtype, np.integer) or np.any(k < 0)):
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if p is not None and (not np.all(np.isfinite(p)) or np.any(p <= 0) or np.any(p > 1)):
        raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {top_p!r}")


def _filter(scaled: Array, top_k: Array, top_p: Array, use_top_k: bool,
            use_top_p: bool) -> Array:
    """``scaled`` with tokens outside the top-k / nucleus set to ``-inf``."""
    if not (use_top_k or use_top_p):
        return scaled
    vocab = scaled.shape[-1]
    neg_inf = jnp.full((), -jnp.inf, scaled.dtype)
    ranked = -jnp.sort(-scaled, axis=-1)  # descending
    rank = jnp.arange(vocab, dtype=jnp.int32).reshape((1,) * (scaled.ndim - 1) + (vocab,))
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab).astype(jnp.int32)
    keep_ranked = jnp.broadcast_to(rank < k, ranked.shape)
    if use_top_p:
        probs = jax.nn.softmax(jnp.where(keep_ranked, ranked, neg_inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of better tokens
        keep_ranked = keep_ranked & (before < top_p.astype(probs.dtype))
    n_keep = jnp.sum(keep_ranked.astype(jnp.int32), axis=-1, keepdims=True)  # >= 1
    threshold = jnp.take_along_axis(ranked, n_keep - 1, axis=-1)
    return jnp.where(scaled >= threshold, scaled, neg_inf)


def sample_logits(logits: Array, rng: Array, temperature=1.0, top_k=0, top_p=1.0) -> Array:
    """Samples one token per row of ``logits``; a pure function.

    With ``s = logits / temperature``:

    * top-k (``top_k > 0``): keep the ``k`` largest ``s`` (ties with the k-th
      are kept too);
    * top-p (``top_p < 1``, after top-k): with ``pi`` the softmax of the kept
      ``s`` sorted in decreasing order, keep the smallest prefix with
      ``sum pi >= top_p`` (token ``j`` is kept iff the mass of better tokens
      ``sum_{i<j} pi_i < top_p``; the best token always is);
    * draw ``jax.random.categorical(rng, s')`` with ``s' = s`` on kept
      tokens and ``-inf`` elsewhere.

    ``temperature == 0`` is greedy: ``argmax(logits)``.

    Args:
      logits: float ``(..., vocab)`` (computed in float32).
      rng: a PRNG key.
      temperature: ``>= 0``.
      top_k: integer ``>= 0`` (0: off).
      top_p: in ``(0, 1]`` (1: off).

    Returns:
      int32 ``(...)`` token ids.

    Raises:
      ValueError: an argument out of range (checked when concrete), naming it.
    """
    _check_sampling(temperature, top_k, top_p)
    static_k, static_p = _concrete(top_k), _concrete(top_p)
    use_top_k = static_k is None or bool(static_k > 0)
    use_top_p = static_p is None or bool(static_p < 1)
    return _sample(logits, rng, jnp.asarray(temperature, jnp.float32),
                   jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32),
                   use_top_k, use_top_p)


def _sample(logits, rng, temperature, top_k, top_p, use_top_k, use_top_p) -> Array:
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.where(temperature > 0, temperature, jnp.float32(1.0))
    scaled = _filter(scaled, top_k, top_p, use_top_k, use_top_p)
    sampled = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


# ----------------------------------------------------------------------------
# Generation.


class _Sampling(NamedTuple):
    temperature: Array
    top_k: Array
    top_p: Array
    eos_id: Array
    pad_id: Array


class _Flags(NamedTuple):
    use_top_k: bool
    use_top_p: bool
    use_eos: bool
    return_logits: bool


def _choose(logits, key, done, lengths, s: _Sampling, flags: _Flags):
    """Samples the next tokens; finished rows emit ``pad_id``."""
    tok = _sample(logits, key, s.temperature, s.top_k, s.top_p, flags.use_top_k,
                  flags.use_top_p)
    tok = jnp.where(done, s.pad_id, tok)
    lengths = lengths + (~done).astype(jnp.int32)
    if flags.use_eos:
        done = done | (tok == s.eos_id)
    return tok, done, lengths


def _decode_step(model, variables, state, step, sampling: _Sampling, flags: _Flags):
    """One decode step: feed the previous token, sample the next.

    ``state = (carry, token, done, lengths)``; returns the new state and
    ``(token, logits or None)``.
    """
    carry, tok, done, lengths = state
    carry, logits = model.apply(variables, tok[:, None], carry)
    logits = logits[:, 0].astype(jnp.float32)
    tok, done, lengths = _choose(logits, step, done, lengths, sampling, flags)
    return (carry, tok, done, lengths), (tok, logits if flags.return_logits else None)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "flags"))
def _generate(model, variables, prompt, prompt_lengths, rng, sampling: _Sampling, *,
              max_new_tokens: int, flags: _Flags):
    carry, logits = model.apply(variables, prompt, None, seq_lengths=prompt_lengths)
    idx = jnp.maximum(prompt_lengths - 1, 0)[:, None, None]
    logits = jnp.take_along_axis(logits, idx, axis=1)[:, 0].astype(jnp.float32)
    batch = prompt.shape[0]
    done = jnp.zeros((batch,), bool)
    lengths = jnp.zeros((batch,), jnp.int32)
    tok, done, lengths = _choose(logits, jax.random.fold_in(rng, 0), done, lengths,
                                 sampling, flags)

    def body(state, i):
        return _decode_step(model, variables, state, jax.random.fold_in(rng, i),
                            sampling, flags)

    steps = jnp.arange(1, max_new_tokens, dtype=jnp.int32)
    (_, _, _, lengths), (toks, all_logits) = jax.lax.scan(
        body, (carry, tok, done, lengths), steps)
    tokens = jnp.concatenate([tok[:, None], jnp.swapaxes(toks, 0, 1)], axis=1)
    if flags.return_logits:
        all_logits = jnp.concatenate([logits[:, None], jnp.swapaxes(all_logits, 0, 1)], axis=1)
    return tokens, lengths, all_logits


def _as_variables(params) -> Mapping[str, Any]:
    if isinstance(params, Mapping) and set(params.keys()) == {"params"}:
        return params
    return {"params": params}


# ----------------------------------------------------------------------------
# Length buckets.


def bucket_length(n: int, limit: Optional[int] = None) -> int:
    """The length ``n`` is padded to with length bucketing.

    The smallest of 16, 24, 32, 48, 64, 96, ... (``2**k`` and ``1.5 * 2**k``
    from 16) that is ``>= n``, but at most ``max(n, limit)``.  Lengths
    ``1..N`` fall into about ``2 * log2(N / 16) + 1`` buckets (one compiled
    function each instead of ``N``); above 16 the padding is less than half
    of ``n``.

    Raises:
      ValueError: ``n < 1``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"the length to bucket must be an integer >= 1, got {n!r}")
    size = 16
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size if limit is None else min(size, max(int(n), int(limit)))


def _pad_prompt(prompt, length: int):
    """``prompt`` right-padded with token 0 to ``length`` (on the host when
    concrete, and moved with ``device_put``, so that nothing is compiled per
    prompt length)."""
    extra = length - prompt.shape[1]
    if extra <= 0:
        return prompt
    value = _concrete(prompt)
    if value is None:
        return jnp.pad(prompt, ((0, 0), (0, extra)))
    return jax.device_put(np.pad(value, ((0, 0), (0, extra))))


def _first(x, n: int):
    """``x[:, :n]`` (on the host when concrete, as in :func:`_pad_prompt`)."""
    if x is None or x.shape[1] == n:
        return x
    value = _concrete(x)
    return x[:, :n] if value is None else jax.device_put(np.ascontiguousarray(value[:, :n]))


def generate(model, params, prompt: Array, max_new_tokens: int, *, rng: Array,
             prompt_lengths: Optional[Array] = None, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: Optional[int] = None,
             return_logits: bool = False, pad_id: Optional[int] = None,
             bucket_lengths: bool = False) -> GenerateOutput:
    """Continues each prompt by ``max_new_tokens`` tokens.

    Token ``n`` of row ``b`` is ``sample_logits(logits_{b,n}, fold_in(rng, n),
    temperature, top_k, top_p)`` (one key per step, shared by the rows), so
    a seed reproduces its output exactly.

    Args:
      model: e.g. an :class:`flax_minrnn.lm.LM` (hashable; see module docstring).
      params: the parameter dict (``variables['params']``) or ``{'params': ...}``.
      prompt: int ``(batch, P)`` token ids, right-padded.
      max_new_tokens: number of tokens to generate (``>= 0``).
      rng: a PRNG key.
      prompt_lengths: int ``(batch,)`` in ``[1, P]``; ``None``: all ``P``.
      temperature: ``>= 0``; ``0`` is greedy decoding.
      top_k: ``>= 0``; ``0`` disables top-k.
      top_p: in ``(0, 1]``; ``1`` disables nucleus sampling.
      eos_id: a row stops after emitting it (later tokens are ``pad_id``).
      return_logits: also return the raw logits of every step.
      pad_id: filler after ``eos_id`` (default ``eos_id``).
      bucket_lengths: pad the prompt to ``bucket_length(P)`` (the padding is
        masked by ``prompt_lengths``) and decode ``bucket_length(
        max_new_tokens)`` tokens, returning the first ``max_new_tokens``:
        calls with many different lengths then share a few compiled
        functions.  The tokens and logits are those of the unbucketed call
        (the prefill runs over a longer, masked time axis, so logits agree to
        float rounding; the scan implementation ``'auto'`` picks for the
        padded length is used); the extra decode steps cost time.

    Returns:
      A :class:`GenerateOutput` ``(tokens, lengths, logits)``.

    Raises:
      ValueError: bad ``temperature``/``top_k``/``top_p``/``max_new_tokens``,
        prompt ids outside the vocabulary, ``prompt_lengths`` outside
        ``[1, P]``, or (learned positions) a prompt plus new tokens longer
        than ``max_seq_length``; each names the argument.
    """
    _check_sampling(temperature, top_k, top_p)
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if np.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
    if np.ndim(top_k) != 0 or not np.issubdtype(np.asarray(top_k).dtype, np.integer):
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not hasattr(prompt, "ndim") or prompt.ndim != 2 or prompt.shape[1] < 1 \
            or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError("prompt must be an integer array of shape (batch, P >= 1), got "
                         f"{getattr(prompt, 'shape', type(prompt).__name__)}")
    batch, plen = prompt.shape
    if prompt_lengths is None:
        prompt_lengths = jnp.full((batch,), plen, jnp.int32)
    prompt_lengths = checks.check_seq_lengths(prompt_lengths, batch, plen).astype(jnp.int32)
    lengths_value = _concrete(prompt_lengths)
    if lengths_value is not None and lengths_value.size and lengths_value.min() < 1:
        raise ValueError("prompt_lengths must be >= 1 (a prompt needs a token), got "
                         f"{lengths_value.min()}")
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    prompt_value = _concrete(prompt)
    if vocab is not None and prompt_value is not None:
        valid = np.arange(plen)[None, :] < (plen if lengths_value is None
                                            else lengths_value[:, None])
        ids = prompt_value[valid]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"prompt ids must lie in [0, vocab_size={vocab}), got values "
                             f"in [{ids.min()}, {ids.max()}]")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 0
                                  or (vocab is not None and value >= vocab)):
            raise ValueError(f"{name} must be a token id in [0, vocab_size), got {value!r}")
    if getattr(config, "positional_encoding", None) == "learned" and max_new_tokens > 0:
        longest = plen if lengths_value is None else int(lengths_value.max())
        # The last new token is never fed back, so positions reach
        # longest + max_new_tokens - 2.
        if longest + max_new_tokens - 1 > config.max_seq_length:
            raise ValueError(
                f"prompt length {longest} + max_new_tokens {max_new_tokens} - 1 exceeds "
                f"max_seq_length={config.max_seq_length} (learned positions)")
    if max_new_tokens == 0:
        empty = jnp.zeros((batch, 0), jnp.int32)
        return GenerateOutput(empty, jnp.zeros((batch,), jnp.int32),
                              jnp.zeros((batch, 0, vocab or 0), jnp.float32)
                              if return_logits else None)

    fill = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    sampling = _Sampling(jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
                         jnp.asarray(top_p, jnp.float32),
                         jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32),
                         jnp.asarray(fill, jnp.int32))
    flags = _Flags(use_top_k=int(top_k) > 0, use_top_p=float(top_p) < 1.0,
                   use_eos=eos_id is not None, return_logits=bool(return_logits))
    steps = int(max_new_tokens)
    if bucket_lengths:
        limit = config.max_seq_length if getattr(
            config, "positional_encoding", None) == "learned" else None
        longest = plen if lengths_value is None else int(lengths_value.max())
        prompt = _pad_prompt(prompt, bucket_length(plen, limit))
        steps = bucket_length(steps, None if limit is None else limit - longest + 1)
    tokens, lengths, logits = _generate(model, _as_variables(params),
                                        prompt.astype(jnp.int32), prompt_lengths, rng,
                                        sampling, max_new_tokens=steps,
                                        flags=flags)
    if steps != max_new_tokens:  # Bucketed: drop the extra steps.
        tokens, logits = _first(tokens, max_new_tokens), _first(logits, max_new_tokens)
        lengths = jnp.minimum(lengths, jnp.int32(max_new_tokens))
    return GenerateOutput(tokens, lengths, logits if return_logits else None)
