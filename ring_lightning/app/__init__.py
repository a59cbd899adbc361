"""What a user runs: ``train(cfg)`` (``app.train``, called by train.py) and its summary (``app.summary``).

This ``__init__`` imports nothing (Lightning and Hydra load with the module that needs them).
"""
