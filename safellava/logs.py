"""Keep transformers, huggingface_hub and torch quiet unless asked (``--verbose``)."""

from __future__ import annotations

import logging
import os
import warnings


def configure(verbose: bool) -> None:
    """Quiet start-up reports, progress bars and per-generate warnings, or show them all."""
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
