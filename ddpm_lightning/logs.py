"""What ``ddpm-train`` prints: every log line once, no third-party advertisement, no warning the user cannot act on.

* Lightning 2.6 gives its ``lightning`` logger a console handler of its own (``INFO: ...``) and lets the records
  propagate to the root logger too, which Hydra's job logging prints again (``[time][lightning...][INFO] - ...``) and
  writes to ``<run>/<job>.log``. Under Hydra (the root logger has handlers) Lightning's own console handler is removed:
  each record is printed once, by the root logger, and still reaches the job's log file.
* Lightning 2.6.6 logs a "Tip: ... try installing litlogger" line whenever a run has no LitLogger: dropped.
* torch 2.14's pytree warns (FutureWarning) when Lightning 2.6.6's ``lightning.pytorch.utilities._pytree`` builds a
  ``LeafSpec``; only a Lightning release can act on it: ignored for that module only.
"""

from __future__ import annotations

import logging
import warnings


class _DropAdvertisement(logging.Filter):
    """Drops Lightning 2.6.6's litlogger tip (``logger_connector.py``: ``"💡 Tip: ... litlogger ..."``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Tip:" in message and "litlogger" in message)


def tidy_lightning_output() -> None:
    """Apply the three rules of this module (idempotent; call after Hydra has configured logging)."""
    lightning = logging.getLogger("lightning")
    if logging.getLogger().handlers:
        for handler in list(lightning.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's console handler, not a file handler
                lightning.removeHandler(handler)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdvertisement) for f in logger.filters):
            logger.addFilter(_DropAdvertisement())
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
