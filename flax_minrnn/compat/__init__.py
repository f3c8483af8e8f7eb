"""Other projects' APIs and checkpoints: the flax-gated-linear-rnn package's
classes (:mod:`~flax_minrnn.compat.flax_gated_linear_rnn`), the
``recurrentgemma`` JAX package's parameters
(:mod:`~flax_minrnn.compat.recurrentgemma`) and Hugging Face
``RecurrentGemmaForCausalLM`` checkpoints (:mod:`~flax_minrnn.compat.hf`).
"""
