"""The live status page (``--http-port``): ``/`` for people, ``/status.json`` for scripts.

Both show what ``chainfed status`` shows (the same ``StatusSnapshot``), read fresh at
every request. Off unless ``--http-port`` is given; bound to ``127.0.0.1`` unless
``--http-host`` says otherwise (reach it through an SSH tunnel or a reverse proxy).

Token-protected like the RPCs: every path refuses a request without one of the
coordinator's tokens with 401 and reveals nothing. The token goes in the
``Authorization`` header, as ``Bearer TOKEN`` or, from a browser, as the password of
HTTP Basic authentication (any user name): the browser asks once and re-sends it on
every reload. A token never travels in the URL, where logs and histories keep it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import hmac
import json
import logging
import math
import threading
from collections.abc import Callable, Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from chainfed.coordinator.status_html import render_page
from chainfed.proto.messages import StatusSnapshot

log = logging.getLogger("chainfed.coordinator")

DEFAULT_HOST = "127.0.0.1"
"""Where the page listens unless told otherwise: this machine only."""


def snapshot_to_json(s: StatusSnapshot) -> dict[str, Any]:
    """``s`` as JSON-ready data: dataclasses as objects, enums as their values, and a
    non-finite number as null (JSON has none)."""
    return _plain(dataclasses.asdict(s))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def token_from_authorization(header: str | None) -> str | None:
    """The token in an ``Authorization`` header (``Bearer T`` or Basic with password T);
    None when there is none or it is malformed."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, colon, password = decoded.partition(":")
        return password if colon and password else None
    return None


def _valid(token: str | None, tokens: Iterable[str]) -> bool:
    """``token`` is one of ``tokens``, compared in constant time against every one."""
    if token is None:
        return False
    given = token.encode()
    return any([hmac.compare_digest(given, t.encode()) for t in tokens])


class StatusPage:
    """The page's HTTP server, serving from a daemon thread until ``close()``."""

    def __init__(
        self,
        snapshot: Callable[[], StatusSnapshot],
        tokens: Iterable[str],
        host: str = DEFAULT_HOST,
        port: int = 0,
    ) -> None:
        """Bind ``host:port`` (0: any free port) and start serving; ``OSError`` when the
        address cannot be bound."""
        handler = _handler_class(snapshot, frozenset(tokens))
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="status-page", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _handler_class(
    snapshot: Callable[[], StatusSnapshot], tokens: frozenset[str]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "chainfed-status"

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if not _valid(token_from_authorization(self.headers.get("Authorization")), tokens):
                log.warning("status page: refused %s without a valid token", self.client_address[0])
                self._send(
                    HTTPStatus.UNAUTHORIZED,
                    "text/plain; charset=utf-8",
                    b"a coordinator token is required (Authorization: Bearer TOKEN, or "
                    b"HTTP Basic with the token as password)\n",
                    {"WWW-Authenticate": 'Basic realm="chainfed coordinator", charset="UTF-8"'},
                )
                return
            if path == "/":
                body = render_page(snapshot()).encode()
                self._send(HTTPStatus.OK, "text/html; charset=utf-8", body)
            elif path == "/status.json":
                body = json.dumps(snapshot_to_json(snapshot()), allow_nan=False).encode()
                self._send(HTTPStatus.OK, "application/json", body)
            else:
                self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")

        def _send(
            self,
            status: HTTPStatus,
            content_type: str,
            body: bytes,
            headers: dict[str, str] | None = None,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("status page: " + format, *args)

    return Handler
