"""One log format for every process, the seed's: `[2025-05-15 22:34:46] message`."""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "[%(asctime)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# The HTTP process writes uvicorn's access lines itself, once each response is written (see
# http/active_requests.py); uvicorn's own access log is off.
ACCESS_LOGGER = "embedserve.access"


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def into_our_log(library: str) -> None:
    """A library that adds a handler of its own on import (huggingface_hub does) writes each line
    twice, once without our format; its lines go through ours alone."""
    library_logger = logging.getLogger(library)
    library_logger.handlers.clear()
    library_logger.propagate = True


def uvicorn_log_config(level: str) -> dict:
    """uvicorn's own lines (`INFO:     Uvicorn running on ...`) and the access lines in our format."""
    fmt = "[%(asctime)s] %(levelprefix)s %(message)s"
    access_fmt = '[%(asctime)s] %(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s'
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "default": {
                "()": "uvicorn.logging.DefaultFormatter",
                "fmt": fmt,
                "datefmt": DATE_FORMAT,
                "use_colors": False,
            },
            "access": {
                "()": "uvicorn.logging.AccessFormatter",
                "fmt": access_fmt,
                "datefmt": DATE_FORMAT,
                "use_colors": False,
            },
        },
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            },
            "access": {"class": "logging.StreamHandler", "formatter": "access", "stream": "ext://sys.stderr"},
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"level": level.upper()},
            ACCESS_LOGGER: {"handlers": ["access"], "level": level.upper(), "propagate": False},
        },
    }
