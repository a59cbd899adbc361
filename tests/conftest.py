"""Puts tests/ on the import path (pytest's rootdir conftest), so every tier can import the
shared helpers in tests/train_runner.py; its `data_cache` fixture is registered here.

Two tiers. ``pytest -q`` runs the fast one: every unit test and a parity core (the
standard variant against the float64 reference on 2 gloo ranks), a few minutes on 2
cores. ``pytest -q --full`` runs everything (the distributed, integration and GPU tiers
too): what CI runs. Naming a file or test on the command line runs it whatever its tier; so does
a bare ``pytest`` started inside tests/ (pytest then collects the folder, not the testpaths).
"""

import pytest
from train_runner import data_cache  # noqa: F401  (a fixture)


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="run every tier (distributed, integration, gpu); without it: unit tests + parity core")


def _fast(nodeid: str) -> bool:
    return nodeid.startswith("tests/unit/") or (
        nodeid.startswith("tests/distributed/test_ring_parity.py") and "W2-standard" in nodeid)


def _paths_named(config) -> bool:
    """Did the command line name files or tests (rather than pytest falling back to testpaths)?"""
    import pytest

    return config.args_source != pytest.Config.ArgsSource.TESTPATHS


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full") or _paths_named(config):
        return
    slow = [item for item in items if not _fast(item.nodeid)]
    if slow:
        items[:] = [item for item in items if _fast(item.nodeid)]
        config.hook.pytest_deselected(items=slow)
        config._ring_lightning_deselected = len(slow)


def pytest_terminal_summary(terminalreporter, config):
    n = getattr(config, "_ring_lightning_deselected", 0)
    if n:
        terminalreporter.write_line(f"fast tier: {n} tests of the full suite not run "
                                    f"(python -m pytest -q --full runs every tier, as CI does)")


@pytest.fixture(autouse=True)
def _no_default_sequence_sharding_leaks():
    """A test that runs a module's or a strategy's setup without its teardown leaves the
    process-wide default sharding set; the next test starts without it."""
    yield
    from ring_lightning.sequence import sharding

    sharding.set_default_sequence_sharding(None)
