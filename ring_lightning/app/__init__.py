"""What a user runs: ``train(cfg)`` (``app.train``, called by train.py) and its summary (``app.summary``).

* ``run_dir``: one run per run directory (its lock) and what a resume continues from;
* ``resume_compat``: a saved config against the current one on resume;
* ``run_report``, ``sweep_report``: a run's metrics.jsonl and plot, a sweep's table;
* ``hydra_presets``: the model presets as Hydra config groups;
* ``export``: a checkpoint's weights (file or folder of shards) as one plain ``state_dict`` file
  (``python -m ring_lightning.app.export``).

The pre-flight (``ring_lightning.preflight``) sits just below. This ``__init__`` imports nothing
(Lightning and Hydra load with the module that needs them).
"""
