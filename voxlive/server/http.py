"""uvicorn's HTTP protocol, reading every ``Connection`` field of a WebSocket upgrade.

HTTP allows a header to be sent as several fields, each a part of one comma-separated list (RFC
9110, section 5.3). Some clients send the upgrade that way: LiveKit's ``mistralai`` plugin passes
its HTTP client's ``Connection: keep-alive`` on beside the WebSocket library's ``Connection:
Upgrade``. uvicorn reads only the last ``Connection`` field, so it takes such a handshake for a
plain GET, and the route answers 404. This protocol reads them all.
"""

from __future__ import annotations

try:  # the implementation uvicorn's "auto" would pick
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Base


class HttpProtocol(_Base):
    def _get_upgrade(self) -> bytes | None:
        connection, upgrade = [], None
        for name, value in self.headers:
            if name == b"connection":
                connection += [token.strip().lower() for token in value.split(b",")]
            elif name == b"upgrade":
                upgrade = value.lower()
        return upgrade if b"upgrade" in connection else None
