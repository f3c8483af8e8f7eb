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
-> (carry, logits)`` accepting ``carry=None`` (e.g. :class:`flax_minrnn.models.lm.LM`).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flax_minrnn.models import padding
from flax_minrnn.ops import checks

Array = jax.Array

__all__ = ["GenerateOutput", "bucket_length", "generate", "sample_logits"]


# Registered so that jax.export can serialize functions that take or return it.
@functools.partial(jax.export.register_namedtuple_serialization,
                   serialized_name="flax_minrnn.GenerateOutput")
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
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), "
                         f"got {temperature!r}")
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
      TypeError: ``logits`` is not a floating-point array.
      ValueError: ``logits`` has no vocab axis (0-d) or an empty one, or an
        argument is out of range (checked when concrete), naming it.
    """
    checks.check_float("logits", logits)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., vocab) with vocab >= 1, "
                         f"got {tuple(logits.shape)}")
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
    eos_id: Array  # int32 () or (n_eos,), -1 = none
    pad_id: Array
    # The Hugging Face options, off by default (NumPy defaults: no device work at import).
    repetition_penalty: Array = np.float32(1.0)
    min_new_tokens: Array = np.int32(0)
    stop: Array = np.zeros((0, 1), np.int32)  # (n_stop, longest), right-aligned, -1 = no token


class _Flags(NamedTuple):
    use_top_k: bool
    use_top_p: bool
    use_eos: bool
    return_logits: bool
    use_penalty: bool = False
    use_min_new: bool = False
    use_stop: bool = False


class _State(NamedTuple):
    """What the decode loop carries besides the model's carry."""

    token: Array  # int32 (batch,): the last chosen token
    done: Array  # bool (batch,)
    lengths: Array  # int32 (batch,): tokens generated so far (EOS / stop included)
    seen: Optional[Array]  # bool (batch, vocab): ids in the prompt or generated
    tail: Optional[Array]  # int32 (batch, longest stop): the last tokens, -1 before


def _process(logits, st: _State, step, s: _Sampling, flags: _Flags) -> Array:
    """Hugging Face's logits processors, in its order, before temperature:
    repetition penalty (``l / p`` if ``l > 0`` else ``l * p`` on seen ids),
    then EOS forbidden while ``step < min_new_tokens``."""
    if flags.use_penalty:
        penalised = jnp.where(logits > 0, logits / s.repetition_penalty,
                              logits * s.repetition_penalty)
        logits = jnp.where(st.seen, penalised, logits)
    if flags.use_min_new and flags.use_eos:
        vocab = logits.shape[-1]
        is_eos = jnp.any(jnp.arange(vocab, dtype=jnp.int32)[:, None]
                         == jnp.reshape(s.eos_id, (1, -1)), axis=-1)
        forbid = (step < s.min_new_tokens) & is_eos
        logits = jnp.where(forbid[None, :], jnp.float32(-jnp.inf), logits)
    return logits


def _choose(logits, key, step, st: _State, s: _Sampling, flags: _Flags) -> _State:
    """Samples the next tokens; finished rows emit ``pad_id``."""
    logits = _process(logits, st, step, s, flags)
    tok = _sample(logits, key, s.temperature, s.top_k, s.top_p, flags.use_top_k,
                  flags.use_top_p)
    tok = jnp.where(st.done, s.pad_id, tok)
    lengths = st.lengths + (~st.done).astype(jnp.int32)
    done = st.done
    if flags.use_eos:
        done = done | jnp.any(tok[:, None] == jnp.reshape(s.eos_id, (1, -1)), axis=-1)
    seen, tail = st.seen, st.tail
    if flags.use_penalty:
        seen = seen | (jnp.arange(seen.shape[1], dtype=jnp.int32)[None, :] == tok[:, None])
    if flags.use_stop:
        tail = jnp.concatenate([tail[:, 1:], tok[:, None]], axis=1)
        match = (s.stop[None] == tail[:, None, :]) | (s.stop[None] < 0)  # (batch, n_stop, L)
        done = done | (~st.done & jnp.any(jnp.all(match, axis=-1), axis=-1))
    return _State(tok, done, lengths, seen, tail)


def _decode_step(model, variables, state, step, key, sampling: _Sampling, flags: _Flags):
    """One decode step: feed the previous token, choose the next.

    ``state = (carry, _State)``; returns the new state and ``(token, logits
    or None)``.
    """
    carry, st = state
    carry, logits = model.apply(variables, st.token[:, None], carry)
    logits = logits[:, 0].astype(jnp.float32)
    st = _choose(logits, key, step, st, sampling, flags)
    return (carry, st), (st.token, logits if flags.return_logits else None)


def _initial_state(prompt, prompt_lengths, vocab: int, sampling: _Sampling,
                   flags: _Flags) -> _State:
    batch, plen = prompt.shape
    valid = checks.lengths_to_mask(prompt_lengths, plen)
    seen = tail = None
    if flags.use_penalty:
        hits = (prompt[:, :, None] == jnp.arange(vocab, dtype=jnp.int32)[None, None, :])
        seen = jnp.any(hits & valid[:, :, None], axis=1)
    if flags.use_stop:
        # The last `longest` valid prompt tokens, right-aligned (-1 before the prompt).
        longest = sampling.stop.shape[1]
        idx = prompt_lengths[:, None] - longest + jnp.arange(longest, dtype=jnp.int32)[None, :]
        taken = jnp.take_along_axis(prompt, jnp.clip(idx, 0, plen - 1), axis=1)
        tail = jnp.where(idx >= 0, taken, jnp.int32(-1))
    return _State(jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool),
                  jnp.zeros((batch,), jnp.int32), seen, tail)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "flags"))
def _generate(model, variables, prompt, prompt_lengths, rng, sampling: _Sampling, *,
              max_new_tokens: int, flags: _Flags):
    carry, logits = model.apply(variables, prompt, None, seq_lengths=prompt_lengths)
    idx = jnp.maximum(prompt_lengths - 1, 0)[:, None, None]
    logits = jnp.take_along_axis(logits, idx, axis=1)[:, 0].astype(jnp.float32)
    st = _initial_state(prompt, prompt_lengths, logits.shape[-1], sampling, flags)
    st = _choose(logits, jax.random.fold_in(rng, 0), jnp.int32(0), st, sampling, flags)

    def body(state, i):
        return _decode_step(model, variables, state, i, jax.random.fold_in(rng, i),
                            sampling, flags)

    steps = jnp.arange(1, max_new_tokens, dtype=jnp.int32)
    (_, last), (toks, all_logits) = jax.lax.scan(body, (carry, st), steps)
    tokens = jnp.concatenate([st.token[:, None], jnp.swapaxes(toks, 0, 1)], axis=1)
    if flags.return_logits:
        all_logits = jnp.concatenate([logits[:, None], jnp.swapaxes(all_logits, 0, 1)], axis=1)
    return tokens, last.lengths, all_logits


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


def generate(model, params, prompt: Array, max_new_tokens: Optional[int] = None, *,
             rng: Optional[Array] = None,
             prompt_lengths: Optional[Array] = None, temperature: float = 1.0,
             attention_mask: Optional[Array] = None, max_length: Optional[int] = None,
             do_sample: Optional[bool] = None, repetition_penalty: float = 1.0,
             min_new_tokens: int = 0, stop_sequences: Optional[Sequence[Sequence[int]]] = None,
             top_k: int = 0, top_p: float = 1.0, eos_id: Optional[int] = None,
             return_logits: bool = False, pad_id: Optional[int] = None,
             bucket_lengths: bool = False) -> GenerateOutput:
    """Continues each prompt by ``max_new_tokens`` tokens.

    Token ``n`` of row ``b`` is row ``b`` of ``sample_logits(l_n, fold_in(rng,
    n), temperature, top_k, top_p)``, ``l_n`` the ``(batch, vocab)`` logits
    of step ``n`` (one key per step, one draw for the whole batch: a row's
    token depends on the batch it is in), so a seed reproduces its output
    exactly.  ``l_{b,n}`` are the model's logits
    after Hugging Face's processors, in its order: the repetition penalty, then
    the EOS ban of ``min_new_tokens``.  A row stops after an EOS id or when its
    tokens (prompt included) end with a stop sequence; the stopping token is
    part of the output and of ``lengths``, later tokens are ``pad_id``.

    Args:
      model: e.g. an :class:`flax_minrnn.models.lm.LM` or :class:`flax_minrnn.Griffin`
        (hashable; see module docstring).
      params: the parameter dict (``variables['params']``) or ``{'params': ...}``.
      prompt: int ``(batch, P)`` token ids, right-padded (``prompt_lengths``),
        or padded on either side as ``attention_mask`` says.
      max_new_tokens: number of tokens to generate (``>= 0``; default
        ``None``); give it or ``max_length``, not both.
      rng: a PRNG key; needed only when sampling (default ``None``: greedy
        decoding must be asked for with ``do_sample=False`` or
        ``temperature=0``).
      prompt_lengths: int ``(batch,)`` in ``[1, P]``; ``None`` (default): all ``P``.
      temperature: ``>= 0`` (default 1.0); ``0`` is greedy decoding.
      attention_mask: ``(batch, P)`` 0/1 or bool, Hugging Face's: ones on the
        prompt tokens, one contiguous run per row (left padding, e.g. from a
        tokenizer with ``padding_side='left'``, or right padding); the
        continuation is that of the unpadded prompt.  Exclusive with
        ``prompt_lengths``.  Default ``None``.
      max_length: prompt width ``P`` plus new tokens, Hugging Face's
        ``max_length`` (so ``max_new_tokens = max_length - P``, ``>= 0``).
        Default ``None``.
      do_sample: ``False``: greedy (``argmax``) whatever ``temperature``,
        ``top_k`` and ``top_p``; ``True``: sample (``temperature`` must be
        ``> 0``); ``None`` (default): sample unless ``temperature == 0``.
      repetition_penalty: ``> 0`` (default 1.0, off): the logit ``l`` of every
        id already in the row (prompt or generated) becomes ``l / p`` if
        ``l > 0`` else ``l * p`` (Keskar et al. 2019, as in Hugging Face).
      min_new_tokens: ``>= 0`` (default 0): the EOS ids get logit ``-inf``
        while fewer than this many tokens have been generated.
      stop_sequences: token-id sequences (default ``None``); a row stops once
        its tokens end with one of them (it may begin in the prompt).
      top_k: ``>= 0`` (default 0); ``0`` disables top-k.
      top_p: in ``(0, 1]`` (default 1.0); ``1`` disables nucleus sampling.
      eos_id: an id or a sequence of ids (default ``None``); a row stops after
        emitting one (later tokens are ``pad_id``).  For a converted
        RecurrentGemma checkpoint: ``model.config.eos_token_id``.
      return_logits: also return the raw logits of every step (default False).
      pad_id: filler after ``eos_id`` (default ``None``: the first EOS id, else 0).
      bucket_lengths: (default False) pad the prompt to ``bucket_length(P)`` (the padding is
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
    for name, value in (("temperature", temperature), ("top_p", top_p),
                        ("repetition_penalty", repetition_penalty)):
        if np.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
    if np.ndim(top_k) != 0 or not np.issubdtype(np.asarray(top_k).dtype, np.integer):
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not hasattr(prompt, "ndim") or prompt.ndim != 2 or prompt.shape[1] < 1 \
            or not jnp.issubdtype(prompt.dtype, jnp.integer):
        got = (f"shape {tuple(prompt.shape)} and dtype {prompt.dtype}"
               if hasattr(prompt, "shape") and hasattr(prompt, "dtype")
               else type(prompt).__name__)
        raise ValueError(f"prompt must be an integer array of shape (batch, P >= 1), got {got}")
    batch, plen = prompt.shape
    max_new_tokens = _new_token_count(max_new_tokens, max_length, plen)
    if do_sample not in (None, True, False):
        raise ValueError(f"do_sample must be None, True or False, got {do_sample!r}")
    if do_sample and _concrete(temperature) is not None and float(temperature) == 0.0:
        raise ValueError("do_sample=True needs temperature > 0 (temperature=0 is greedy)")
    greedy = do_sample is False or (do_sample is None and _concrete(temperature) is not None
                                    and float(temperature) == 0.0)
    if rng is None:
        if not greedy:
            raise ValueError("rng must be a PRNG key when sampling; pass do_sample=False "
                             "(or temperature=0) for greedy decoding")
        rng = jax.random.key(0)  # unused by greedy decoding
    penalty = _concrete(repetition_penalty)
    if penalty is None or not np.isfinite(penalty) or penalty <= 0:
        raise ValueError(f"repetition_penalty must be a number > 0 (1 = off), "
                         f"got {repetition_penalty!r}")
    if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, (int, np.integer)) \
            or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
    if attention_mask is not None:
        if prompt_lengths is not None:
            raise ValueError("pass either attention_mask or prompt_lengths, not both")
        if tuple(getattr(attention_mask, "shape", ())) != (batch, plen):
            raise ValueError(f"attention_mask must have the prompt's shape {(batch, plen)}, "
                             f"got {getattr(attention_mask, 'shape', None)}")
        prompt_lengths, starts = padding.mask_to_lengths(attention_mask)
        prompt = padding.align_left(prompt, starts)
    if prompt_lengths is None:
        prompt_lengths = jnp.full((batch,), plen, jnp.int32)
    prompt_lengths = checks.check_seq_lengths(prompt_lengths, batch, plen,
                                              "prompt_lengths").astype(jnp.int32)
    lengths_value = _concrete(prompt_lengths)
    if lengths_value is not None and lengths_value.size and lengths_value.min() < 1:
        if attention_mask is not None:
            raise ValueError(f"attention_mask row {int(lengths_value.argmin())} has no "
                             "True entry (a prompt needs a token)")
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
    eos_ids = _token_ids("eos_id", eos_id, vocab)
    _token_ids("pad_id", pad_id, vocab, single=True)
    stop = _stop_array(stop_sequences, vocab)
    check_learned_positions(config, plen if lengths_value is None else
                            int(lengths_value.max()), max_new_tokens)
    if max_new_tokens == 0:
        empty = jnp.zeros((batch, 0), jnp.int32)
        return GenerateOutput(empty, jnp.zeros((batch,), jnp.int32),
                              jnp.zeros((batch, 0, vocab or 0), jnp.float32)
                              if return_logits else None)

    fill = pad_id if pad_id is not None else (eos_ids[0] if eos_ids else 0)
    sampling = _Sampling(jnp.asarray(0.0 if greedy else temperature, jnp.float32),
                         jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32),
                         jnp.asarray(eos_ids or [-1], jnp.int32), jnp.asarray(fill, jnp.int32),
                         jnp.asarray(penalty, jnp.float32),
                         jnp.asarray(min_new_tokens, jnp.int32), stop)
    flags = _Flags(use_top_k=int(top_k) > 0, use_top_p=float(top_p) < 1.0,
                   use_eos=bool(eos_ids), return_logits=bool(return_logits),
                   use_penalty=float(penalty) != 1.0,
                   use_min_new=min_new_tokens > 0 and bool(eos_ids),
                   use_stop=stop.shape[0] > 0)
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


def check_learned_positions(config, prompt_length: int, max_new_tokens: int) -> None:
    """``ValueError`` when a model with learned positions (``config``, an
    ``LMConfig``; other configs pass) would be fed a position past its table.
    The last new token is never fed back, so positions reach
    ``prompt_length + max_new_tokens - 2``."""
    if (getattr(config, "positional_encoding", None) == "learned" and max_new_tokens > 0
            and prompt_length + max_new_tokens - 1 > config.max_seq_length):
        raise ValueError(
            f"prompt length {prompt_length} + max_new_tokens {max_new_tokens} - 1 exceeds "
            f"max_seq_length={config.max_seq_length} (learned positions)")


def _scalar_int(value):
    """A concrete 0-d integer array (``jnp.int32(3)``) as a Python int;
    anything else unchanged (checked by the caller)."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic)) and np.ndim(value) == 0:
        concrete = _concrete(value)
        if concrete is not None and np.issubdtype(concrete.dtype, np.integer):
            return int(concrete)
    return value


def _new_token_count(max_new_tokens, max_length, plen: int) -> int:
    """``max_new_tokens``, or ``max_length - P``; exactly one must be given."""
    max_new_tokens, max_length = _scalar_int(max_new_tokens), _scalar_int(max_length)
    for name, value in (("max_new_tokens", max_new_tokens), ("max_length", max_length)):
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, (int, np.integer)) or value < 0):
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if (max_new_tokens is None) == (max_length is None):
        raise ValueError("give exactly one of max_new_tokens and max_length, got "
                         f"max_new_tokens={max_new_tokens!r}, max_length={max_length!r}")
    if max_length is not None:
        if max_length < plen:
            raise ValueError(f"max_length={max_length} is shorter than the prompt width "
                             f"P={plen} (max_length counts the prompt)")
        return int(max_length - plen)
    return int(max_new_tokens)


def _token_ids(name: str, value, vocab: Optional[int], single: bool = False) -> list:
    """``value`` (``None``, an id or, unless ``single``, ids) as a list of ints."""
    if value is None:
        return []
    value = _scalar_int(value)
    many = not single and isinstance(value, (list, tuple, np.ndarray, jax.Array))
    values = list(np.asarray(value).ravel()) if many else [value]
    if many and not values:
        raise ValueError(f"{name} must be None, an id or a non-empty sequence of ids")
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 0 \
                or (vocab is not None and v >= vocab):
            raise ValueError(f"{name} must be a token id in [0, vocab_size)"
                             f"{'' if single else ' or a sequence of them'}, got {value!r}")
    return [int(v) for v in values]


def _stop_array(stop_sequences, vocab: Optional[int]) -> Array:
    """int32 ``(n, longest)``: each sequence right-aligned, -1 before it."""
    if stop_sequences is None:
        return jnp.zeros((0, 1), jnp.int32)
    if isinstance(stop_sequences, (str, bytes)) or not isinstance(stop_sequences, (list, tuple)):
        raise ValueError("stop_sequences must be a list of token-id sequences, got "
                         f"{type(stop_sequences).__name__}")
    seqs = [_token_ids(f"stop_sequences[{i}]", list(seq) if isinstance(seq, (list, tuple))
                       else seq, vocab) for i, seq in enumerate(stop_sequences)]
    for i, (seq, raw) in enumerate(zip(seqs, stop_sequences)):
        if not isinstance(raw, (list, tuple)) or not seq:
            raise ValueError(f"stop_sequences[{i}] must be a non-empty sequence of token ids, "
                             f"got {raw!r}")
    longest = max((len(seq) for seq in seqs), default=1)
    out = np.full((len(seqs), longest), -1, np.int32)
    for i, seq in enumerate(seqs):
        out[i, longest - len(seq):] = seq
    return jnp.asarray(out)
