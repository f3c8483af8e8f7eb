"""flax_minrnn: minimal gated linear RNNs for JAX/Flax.

Parallel training with a linear-recurrence scan, O(1)-per-token decoding from
a small float32 carry.  The public API is this module's ``__all__``; the
trainer lives in :mod:`flax_minrnn.train` (and the ``flax-minrnn`` CLI).
"""

from flax_minrnn.generate import GenerateOutput, generate, sample_logits
from flax_minrnn.griffin import (RGLRU, Griffin, GriffinCarry, GriffinConfig, count_params,
                                 griffin_2b_config, griffin_9b_config)
from flax_minrnn.heads import (SequenceClassifier, TokenClassifier, causal_lm_loss,
                               weighted_cross_entropy)
from flax_minrnn.layers import GatedLinearRNN, MinGRU, MinLSTM, g_activation
from flax_minrnn.lm import LM, GatedLinearRNNLM, LMCarry, LMConfig
from flax_minrnn.migrate import (from_flax_gated_linear_rnn, migrate_params,
                                 to_associative, to_true_recurrence)
from flax_minrnn.parallel import sequence_parallel_scan
from flax_minrnn.runtime import tune_cpu_malloc
from flax_minrnn.scan import ScanImpl, default_impl, gated_scan, linear_scan
from flax_minrnn.wrappers import Bidirectional, RNNCell, Stack

__version__ = "0.1.0"

__all__ = [
    # scan
    "linear_scan", "gated_scan", "ScanImpl", "default_impl", "sequence_parallel_scan",
    # layers
    "MinGRU", "MinLSTM", "GatedLinearRNN", "RGLRU", "g_activation",
    "RNNCell", "Bidirectional", "Stack",
    # two-stage training and migration
    "migrate_params", "to_true_recurrence", "to_associative",
    "from_flax_gated_linear_rnn",
    # language models and heads
    "LM", "LMConfig", "LMCarry", "GatedLinearRNNLM",
    # Griffin / RecurrentGemma
    "Griffin", "GriffinConfig", "GriffinCarry", "griffin_2b_config", "griffin_9b_config",
    "count_params",
    # heads
    "SequenceClassifier", "TokenClassifier", "causal_lm_loss", "weighted_cross_entropy",
    # generation
    "generate", "sample_logits", "GenerateOutput",
    # CPU runtime setting
    "tune_cpu_malloc",
]
