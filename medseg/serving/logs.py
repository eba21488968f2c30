"""Structured logs: one JSON object per line, with the ``extra`` fields a call passes.

Callers pass ids, classes, statuses and timings only; never a token, a file name from a client, a DICOM
tag or an error message (messages may quote file contents and go to the job's owner alone).
"""

from __future__ import annotations

import json
import logging
import time

# uvicorn adds color_message (the message with ANSI colours) to its records.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName", "color_message"}


class JsonFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "logger": ..., "msg": ..., <extra fields>}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {"ts": round(record.created, 3),
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
                                    "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_class"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str)


def configure_json_logging(level: int = logging.INFO) -> None:
    """Route medseg's and uvicorn's loggers to stderr as JSON lines (uvicorn's access log stays off)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    for name in ("medseg", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level)
        logger.propagate = False
