"""The Flax linen layers of flax_minrnn: the recurrent layers MinGRU, MinLSTM
and GatedLinearRNN (:mod:`~flax_minrnn.nn.recurrent`) and Griffin's RG-LRU
(:mod:`~flax_minrnn.nn.rglru`), the gate equations they share
(:mod:`~flax_minrnn.nn.gates`), the wrappers ``RNNCell``, ``Bidirectional``
and ``Stack`` (:mod:`~flax_minrnn.nn.wrappers`), local sliding-window
attention with a ring-buffer cache (:mod:`~flax_minrnn.nn.attention`), the
blocks the language models are built from (norms, positional encodings, the
causal convolution, the channel-mixing MLP; :mod:`~flax_minrnn.nn.blocks`) and
``Dense`` (:mod:`~flax_minrnn.nn.dense`).  The models built on them live in
:mod:`flax_minrnn.models`.
"""
