"""Hand-written kernels, each next to the reference it is tested against.

* :mod:`flax_minrnn.kernels.linear_scan_pallas`: the linear recurrence as a
  Pallas (Triton) GPU kernel; reference: ``flax_minrnn.scan`` (sequential).
"""
