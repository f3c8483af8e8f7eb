"""Models built on :mod:`flax_minrnn.nn`: the language model ``LM``
(:mod:`~flax_minrnn.models.lm`), Griffin / RecurrentGemma
(:mod:`~flax_minrnn.models.griffin`), classification heads and losses
(:mod:`~flax_minrnn.models.heads`), generation and sampling
(:mod:`~flax_minrnn.models.generate`) and padding helpers
(:mod:`~flax_minrnn.models.padding`).
"""
