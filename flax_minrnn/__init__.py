"""flax_minrnn: minimal gated linear RNNs for JAX/Flax.

Parallel training with a linear-recurrence scan, O(1)-per-token decoding from
a small float32 carry.  The public API is this module's ``__all__``.
"""

from flax_minrnn.layers import GatedLinearRNN, MinGRU, MinLSTM, g_activation
from flax_minrnn.scan import ScanImpl, default_impl, linear_scan

__version__ = "0.1.0"

__all__ = [
    "linear_scan",
    "ScanImpl",
    "default_impl",
    "MinGRU",
    "MinLSTM",
    "GatedLinearRNN",
    "g_activation",
]
