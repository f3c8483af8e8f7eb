"""Training: ``train_and_evaluate(config, workdir)`` and the CLI's other
commands (:mod:`~flax_minrnn.training.train`), two-stage runs
(:mod:`~flax_minrnn.training.two_stage`), configs
(:mod:`~flax_minrnn.training.config`), atomic checkpoints
(:mod:`~flax_minrnn.training.checkpoint`), datasets
(:mod:`~flax_minrnn.training.data`), meshes and multi-host set-up
(:mod:`~flax_minrnn.training.mesh`), parameter migration between modes
(:mod:`~flax_minrnn.training.migrate`) and process settings
(:mod:`~flax_minrnn.training.runtime`).
"""
