"""Puts tests/ on the import path (pytest's rootdir conftest), so every tier can import the
shared helpers in tests/train_runner.py; its `data_cache` fixture is registered here."""

from train_runner import data_cache  # noqa: F401  (a fixture)
