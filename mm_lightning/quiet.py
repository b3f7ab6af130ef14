"""Quiet by default: a command shows our own progress bars and status lines, not third-party chatter.

Silenced while a command runs (`--verbose` on any command keeps them):
- Python warnings (Lightning's ckpt_path notes, deprecations inside libraries). mm_lightning's own
  messages are printed lines or `logging` warnings, never `warnings.warn`, so none of ours is lost;
- INFO logs from every library (Lightning's tips, "Seed set to 0", "GPU available", MLflow's
  database set-up). Our own INFO logs have no handler and were never shown;
- WARNING logs of transformers, diffusers, huggingface_hub and MLflow, which each configure their
  logger when imported, so each is set twice: by level now and by environment for a later import;
- transformers' weight-loading and -writing bars ("Loading weights", "Writing model shards").
Warning logs of ours (a skipped data row) still show.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

# library logger -> the environment variable that sets its level when the library is imported
LIBRARY_LOGGERS = {
    "transformers": "TRANSFORMERS_VERBOSITY",
    "diffusers": "DIFFUSERS_VERBOSITY",
    "huggingface_hub": "HF_HUB_VERBOSITY",
    "mlflow": "MLFLOW_LOGGING_LEVEL",
}


@contextlib.contextmanager
def quiet_third_party(enabled: bool = True) -> Iterator[None]:
    """Silence third-party warnings, logs and weight bars inside the block; restore everything after it."""
    if not enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    saved_env = {var: os.environ.get(var) for var in LIBRARY_LOGGERS.values()}
    saved_levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    saved_disable, bars_were_on = logging.root.manager.disable, not are_progress_bars_disabled()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.INFO)
            for name, var in LIBRARY_LOGGERS.items():
                os.environ[var] = "error"
                logging.getLogger(name).setLevel(logging.ERROR)
            disable_progress_bars()  # transformers reads this when imported
            _set_transformers_bars(False)
            yield
    finally:
        logging.disable(saved_disable)
        for name, var in LIBRARY_LOGGERS.items():
            logging.getLogger(name).setLevel(saved_levels[name])
            if saved_env[var] is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = saved_env[var]
        if bars_were_on:
            enable_progress_bars()
            _set_transformers_bars(True)


def _set_transformers_bars(on: bool) -> None:
    """transformers keeps its own switch once imported; it is not imported here just to flip it (seconds)."""
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None:
        (transformers_logging.enable_progress_bar if on else transformers_logging.disable_progress_bar)()
