"""One log format and one `--log-level` for both programs.

Lines are `time level=... logger=... message`, where messages are written as `event key=value ...`,
so `grep level=ERROR`, journald and a log shipper's logfmt parser all read both programs alike.
`--log-format json` writes one JSON object per line instead, for collectors that want it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

LEVELS = ("debug", "info", "warning", "error")
TEXT_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False)


def add_arguments(parser: argparse.ArgumentParser, default: str = "info") -> None:
    """`--log-level` (any case) and `--log-format` on a parser."""
    parser.add_argument(
        "--log-level",
        type=str.lower,
        default=default,
        choices=LEVELS,
        help=f"least severe messages to log (default {default}; any case)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=("text", "json"),
        help="text: `time level=... logger=... message` lines (default); json: one object per line",
    )


def setup(level: str, fmt: str = "text") -> None:
    """Log to stderr at `level` in the program-wide format (replaces any earlier setup)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
