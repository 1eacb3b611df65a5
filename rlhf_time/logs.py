"""The `rlhf_time` logger: visible by default (API as CLI), written through tqdm so it never tears a progress bar.

Python's default is to show nothing below WARNING unless the application configures logging, so a notebook or
script calling `SFTrainer(config).train()` would print nothing. Like transformers does for its own logger, we
give the `rlhf_time` logger a level (INFO) and one stderr handler, and leave the root logger alone:

- if the user configured the root logger (it has handlers), our records only propagate to it, so nothing is
  printed twice;
- otherwise our handler prints them, via `tqdm.write`, which clears and redraws any active bar.

`set_verbosity(logging.WARNING)` or `logging.getLogger("rlhf_time").setLevel(...)` quiets it as usual.
"""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "rlhf_time"
FORMAT = "%(asctime)s %(message)s"
DATE_FORMAT = "%H:%M:%S"


class TqdmHandler(logging.Handler):
    """A stderr handler that prints through tqdm.write (bars are cleared, the line printed, bars redrawn)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except BrokenPipeError:  # stderr closed (`... 2>&1 | head`): nothing more to show
            pass
        except Exception:
            self.handleError(record)


class _UnlessRootConfigured(logging.Filter):
    """Let our handler print only when the application has not configured the root logger itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _root_configured()


def _root_configured() -> bool:
    # pytest's capture handlers sit on the root logger too; they capture, they are not the user's console.
    return any(type(handler).__module__.split(".")[0] != "_pytest" for handler in logging.getLogger().handlers)


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def install_default_handler() -> None:
    """Give the `rlhf_time` logger its stderr handler and level INFO, once, unless the user set a level."""
    logger = get_logger()
    if any(isinstance(handler, TqdmHandler) for handler in logger.handlers):
        return
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter(FORMAT, datefmt=DATE_FORMAT))
    handler.addFilter(_UnlessRootConfigured())
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def set_verbosity(level: int) -> None:
    """Shortcut for logging.getLogger("rlhf_time").setLevel(level)."""
    get_logger().setLevel(level)
