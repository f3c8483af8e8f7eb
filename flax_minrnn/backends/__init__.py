"""Opt-in kernels, reached only by naming them as ``scan_impl``.

:mod:`~flax_minrnn.backends.native` (``'native'``): XLA FFI CPU kernels,
compiled on first use from ``csrc/``; :mod:`~flax_minrnn.backends.pallas`
(``'pallas'``): a Triton GPU kernel.  Each supports fewer transformations
than the default plain-JAX path and says so in its errors (the README's
"Transformations by implementation" table).
"""
