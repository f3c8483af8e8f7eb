"""flax_minrnn: minimal gated linear RNNs for JAX/Flax.

Parallel training with a linear-recurrence scan, O(1)-per-token decoding from
a small float32 carry.  The public API is this module's ``__all__``; the
trainer lives in :mod:`flax_minrnn.training` (and the ``flax-minrnn`` CLI).

The package is laid out in tiers, each importing only from the tiers before
it: ``ops`` (the scan and its checks, pure ``jax.numpy``) -> ``backends``
(opt-in compiled kernels, reached by naming them) -> ``nn`` (layers and
blocks) -> ``models`` (language models, heads, generation) -> ``compat``
(other packages' APIs and checkpoints) -> ``training`` (trainer, checkpoints,
configs, data, meshes, migration) -> ``cli``.
"""

from flax_minrnn.compat.flax_gated_linear_rnn import GatedLinearRNNLM, from_flax_gated_linear_rnn
from flax_minrnn.compat.hf import load_hf_recurrentgemma, save_hf_recurrentgemma
from flax_minrnn.compat.recurrentgemma import from_recurrentgemma, to_recurrentgemma
from flax_minrnn.models.generate import GenerateOutput, generate, sample_logits
from flax_minrnn.models.griffin import (Griffin, GriffinCarry, GriffinConfig, count_params,
                                        griffin_2b_config, griffin_9b_config)
from flax_minrnn.models.heads import (SequenceClassifier, TokenClassifier, causal_lm_loss,
                                      weighted_cross_entropy)
from flax_minrnn.models.lm import LM, LMCarry, LMConfig
from flax_minrnn.nn.recurrent import GatedLinearRNN, MinGRU, MinLSTM, g_activation
from flax_minrnn.nn.rglru import RGLRU
from flax_minrnn.nn.wrappers import Bidirectional, RNNCell, Stack
from flax_minrnn.ops.parallel import sequence_parallel_scan
from flax_minrnn.ops.checks import runtime_checks
from flax_minrnn.ops.gated import gated_scan, gated_scan_with_readout
from flax_minrnn.ops.scan import ScanImpl, default_impl, linear_scan
from flax_minrnn.training.migrate import migrate_params, to_associative, to_true_recurrence
from flax_minrnn.training.runtime import tune_cpu_malloc

__version__ = "0.1.0"

__all__ = [
    # scan
    "linear_scan", "gated_scan", "gated_scan_with_readout", "ScanImpl", "default_impl",
    "sequence_parallel_scan", "runtime_checks",
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
    "count_params", "from_recurrentgemma", "to_recurrentgemma",
    "load_hf_recurrentgemma", "save_hf_recurrentgemma",
    # heads
    "SequenceClassifier", "TokenClassifier", "causal_lm_loss", "weighted_cross_entropy",
    # generation
    "generate", "sample_logits", "GenerateOutput",
    # CPU runtime setting
    "tune_cpu_malloc",
]
