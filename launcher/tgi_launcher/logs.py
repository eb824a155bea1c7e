"""The launcher's output: its own log lines and the child output it forwards, as text or JSON.

With `--json-output` every line on the launcher's stderr is one JSON object with `timestamp` (UTC,
RFC 3339), `level` (TGI's names: DEBUG, INFO, WARN, ERROR), `message` and `target`: the launcher's
own lines have target `text_generation_launcher`, forwarded lines the child's name (`shard 0`,
`router`, `prepare`). A forwarded line's level is the one its text names, INFO if none.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone

LAUNCHER_TARGET = "text_generation_launcher"
_PYTHON_TO_TGI_LEVEL = {"WARNING": "WARN", "CRITICAL": "ERROR", "FATAL": "ERROR"}
# Our children log `<time> <who> LEVEL message`; look for the level near the start only.
_LEVEL_IN_TEXT = re.compile(r"\b(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\b")
_LEVEL_SEARCH_CHARS = 64


def json_line(level: str, message: str, target: str, timestamp: float | None = None) -> str:
    """One log record as a JSON object on one line."""
    moment = datetime.fromtimestamp(timestamp, timezone.utc) if timestamp is not None else datetime.now(timezone.utc)
    return json.dumps({
        "timestamp": moment.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "level": _PYTHON_TO_TGI_LEVEL.get(level, level),
        "message": message,
        "target": target,
    })


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return json_line(record.levelname, message, LAUNCHER_TARGET, record.created)


def setup_logging(json_output: bool) -> None:
    """The launcher's own log lines go to stderr, as text or as JSON (a no-op if logging is already
    configured, e.g. by pytest)."""
    handler = logging.StreamHandler(sys.stderr)
    if json_output:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s launcher: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def child_line(name: str, text: str, json_output: bool) -> str:
    """A line of a child's output as the launcher prints it: `[name] text`, or a JSON record."""
    if not json_output:
        return f"[{name}] {text}"
    match = _LEVEL_IN_TEXT.search(text[:_LEVEL_SEARCH_CHARS])
    return json_line(match.group(1) if match else "INFO", text, name)
