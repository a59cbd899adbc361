"""Pre-flight errors: a user error printed once, by the launching process, naming the override.

``user_errors`` turns a ValueError/TypeError raised by a constructor (the data module, the LM,
the strategy, directly or through Hydra's instantiate) into one message and ``sys.exit(2)``; it
prefixes the field the message names with its config group (``data.batch_size``).
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Tuple

from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue


EXIT_CONFIG_ERROR = 2
_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK")  # torchrun, SLURM, Lightning's own launcher


class ConfigError(ValueError):
    """The composed config cannot run; the message names the override to change."""


def is_launching_process() -> bool:
    """True in the process a user started (or rank 0 when a launcher started every rank)."""
    for name in _RANK_VARIABLES:
        if os.environ.get(name, "0") not in ("", "0"):
            return False
    return True


# ---------------------------------------------------------------------- user errors
def _with_group(message: str, groups: Sequence[Tuple[str, Any]]) -> str:
    """``batch_size must be ...`` -> ``data.batch_size must be ...``: the override to type."""
    for prefix, group in (("ModelConfig.", "model."), ("attention.", "variant."),
                          ("RingAttentionConfig.", "variant."), ("callbacks.", "callbacks.")):
        if message.startswith(prefix):
            return group + message[len(prefix):]
    word = re.match(r"[A-Za-z_][A-Za-z_0-9]*", message)
    for group, node in groups:
        if word and isinstance(node, DictConfig) and word.group(0) in node:
            return f"{group}.{message}"
    return message


@contextmanager
def user_errors(cfg: DictConfig, group: Optional[str] = None) -> Iterator[None]:
    """Turn a ValueError/TypeError raised inside (directly or through Hydra's instantiate) into
    one printed message and ``sys.exit(2)``; ``group`` names the config group being built."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - filtered below, everything else re-raised
        cause = exc
        while type(cause).__name__ == "InstantiationException" and cause.__cause__ is not None:
            cause = cause.__cause__  # hydra wraps the constructor's own error
        if isinstance(cause, MissingMandatoryValue) and os.environ.get("HYDRA_FULL_ERROR") != "1":
            fail(missing_value_message(str(getattr(cause, "full_key", "") or "")))
        if not isinstance(cause, (ValueError, TypeError, ConnectionError)) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if isinstance(cause, ConfigError):
            fail(str(cause))  # names its override already
        groups = [(g, cfg.get(g)) for g in ([group] if group else []) + ["variant", "model", "module", "data",
                                                                          "strategy", "trainer"]]
        fail(_with_group(str(cause), groups))


# A value that works for the mandatory fields of conf/ (``???`` there), for the message
_MISSING_EXAMPLES = {"data.paths": "\"data.paths=['docs/**/*.md','~/books']\" (files, directories or quoted globs)"}


def missing_value_message(key: str) -> str:
    """``???`` left in the composed config: which override sets it, with an example."""
    example = _MISSING_EXAMPLES.get(key, f"{key}=<value>")
    return f"{key} is required and not set (??? in the config); add {example} to the command"


def fail(message: str) -> None:
    """Print ``message`` once (launching process only) and exit every process with status 2."""
    if is_launching_process():
        print(f"\nring_lightning: this configuration cannot run; nothing was started.\n  {message}\n"
              f"(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
    sys.exit(EXIT_CONFIG_ERROR)
