"""Keep transformers, huggingface_hub and torch quiet unless asked (``--verbose``)."""

from __future__ import annotations

import logging
import os
import sys
import warnings

NOTICE_PREFIX = "safellava: "


class _Notices(logging.Handler):
    """One line per notice on whatever ``sys.stderr`` is when it is written."""

    def emit(self, record: logging.LogRecord) -> None:
        print(NOTICE_PREFIX + record.getMessage(), file=sys.stderr, flush=True)


def show_notices() -> None:
    """safellava's own notices (a capped answer length, for example) as one line each on stderr."""
    logger = logging.getLogger("safellava")
    if not any(isinstance(handler, _Notices) for handler in logger.handlers):
        logger.addHandler(_Notices())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def configure(verbose: bool) -> None:
    """Quiet start-up reports, progress bars and per-generate warnings, or show them all."""
    show_notices()
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import huggingface_hub.utils as hub_utils
    import transformers

    if verbose:
        transformers.logging.set_verbosity_info()
        transformers.logging.enable_progress_bar()
        hub_utils.enable_progress_bars()
        hub_utils.logging.set_verbosity_info()
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    hub_utils.logging.set_verbosity_error()  # download retries: the final error is reported once
    warnings.filterwarnings("ignore", module=r"(transformers|torch|bitsandbytes|accelerate|PIL)(\.|$)")
    for name in ("bitsandbytes", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
