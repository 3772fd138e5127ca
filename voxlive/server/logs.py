"""The server's log lines never show an API key.

Browsers cannot set headers on a WebSocket, so they send the key as ``?token=KEY``, and uvicorn
writes every request's path with its query into its access log (HTTP) and its error log
(WebSocket handshakes). This filter rewrites those lines before any handler sees them: every
``token=`` value, right or wrong (a wrong one is often a real key mistyped), and the server's key
wherever else it appears.
"""

from __future__ import annotations

import logging
import re

UVICORN_LOGGERS = ("uvicorn.access", "uvicorn.error")
_TOKEN = re.compile(r"(token=)[^&\s\"']*")
REDACTED = "<redacted>"


class RedactKeys(logging.Filter):
    def __init__(self, api_key: str | None):
        super().__init__()
        self.api_key = api_key

    def redact(self, text: str) -> str:
        text = _TOKEN.sub(rf"\g<1>{REDACTED}", text)
        return text.replace(self.api_key, REDACTED) if self.api_key else text

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = self.redact(record.msg)
        if isinstance(record.args, tuple):  # uvicorn's access formatter unpacks the arguments: keep their shape
            record.args = tuple(self.redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def redact_keys_in_uvicorn_logs(api_key: str | None) -> None:
    """Install the filter on uvicorn's loggers (after uvicorn has configured its logging)."""
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, RedactKeys)]:
            logger.removeFilter(old)
        logger.addFilter(RedactKeys(api_key))
