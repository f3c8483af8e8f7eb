"""The recurrence, in plain JAX: the lowest tier, importing nothing else of the package.

:mod:`~flax_minrnn.ops.scan` holds ``linear_scan`` (``h_t = a_t * h_{t-1} + b_t``)
and its implementations; :mod:`~flax_minrnn.ops.gated` the tile loop the
layers run on (projection, gates, scan and readout in one call);
:mod:`~flax_minrnn.ops.linear` linear maps with a hand-written transpose;
:mod:`~flax_minrnn.ops.true_recurrence` gates that also see ``h_{t-1}``;
:mod:`~flax_minrnn.ops.parallel` the sequence-parallel scan; and
:mod:`~flax_minrnn.ops.checks` the input checks the package shares.
"""
