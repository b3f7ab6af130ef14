"""Quiet by default: a command prints our progress bars and status lines, not third-party warnings, tips,
INFO logs or weight bars; `--verbose` shows them."""

import logging
import os
import warnings

import pytest
from huggingface_hub.utils import are_progress_bars_disabled

from mm_lightning.quiet import quiet_third_party
from tests.helpers import run_cli

# what a default `fit` printed before (lightning 2.6.6, mlflow 3.17.2, transformers 5.23.0)
NOISE = (
    "Tip:",
    "Warning",
    "warn",
    "ckpt_path",
    "deprecated",
    "GPU available",
    "Seed set to",
    "INFO mlflow",
    "Writing model shards",
    "Loading weights",
)


def test_quiet_hides_warnings_and_library_logs_and_restores_them_after():
    disable_before, bars_before = logging.root.manager.disable, are_progress_bars_disabled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_third_party():
            warnings.warn("a library's deprecation", DeprecationWarning, stacklevel=1)
            assert not logging.getLogger("lightning.pytorch").isEnabledFor(logging.INFO)
            assert not logging.getLogger("transformers").isEnabledFor(logging.WARNING)
            assert logging.getLogger("mm_lightning.data").isEnabledFor(logging.WARNING)  # ours still show
            assert os.environ["TRANSFORMERS_VERBOSITY"] == "error" and are_progress_bars_disabled()
        warnings.warn("after the block", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["after the block"]
    assert logging.root.manager.disable == disable_before and are_progress_bars_disabled() == bars_before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_third_party(enabled=False):  # --verbose
            warnings.warn("shown", UserWarning, stacklevel=1)
            assert logging.root.manager.disable == disable_before
    assert [str(w.message) for w in caught] == ["shown"]


@pytest.mark.slow
def test_fit_full_prints_no_third_party_warning_or_tip_unless_verbose(finished_fit, tmp_path):
    result = finished_fit[3]  # conftest.py's `fit --experiment full`, evaluation included
    quiet = result.stdout + result.stderr
    assert "stage image_pretrain" in quiet and "finished full" in quiet  # our bars and status lines
    assert [n for n in NOISE if n in quiet] == []
    result = run_cli(
        tmp_path,
        "fit",
        "--experiment",
        "full",
        "--verbose",
        "curriculum.order=[video_finetune]",
        "eval.enabled=false",
        "curriculum.stages.video_finetune.max_steps=1",
    )
    verbose = result.stdout + result.stderr
    assert "Tip:" in verbose and "ckpt_path" in verbose  # the noise exists, so the quiet check can fail
