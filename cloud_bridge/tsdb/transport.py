"""One HTTP POST at a time to the TSDB, on a kept-alive connection: the writer's seam to the network.

`HttpTransport` uses the standard library's `http.client` (blocking; the writer calls it from a worker
thread, never two calls at once). Any answer, 204 or 500, is returned as an `Answer`; only a failure
to get one (refused, reset, timeout, TLS) raises `OSError`. A kept-alive connection the server closed
while idle is reopened once, transparently: a write is safe to resend (same points, same timestamps).
Tests may pass any object with the same `post`/`close` methods.
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Answer:
    """What the server said: status, its error text (empty on success) and its version header."""

    status: int
    message: str = ""
    server_version: str = ""


class Transport(Protocol):
    def post(self, target: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        """POST `body` to `target` (path and query); raise OSError when no answer came."""
        ...

    def close(self) -> None: ...


def error_text(body: bytes, header: str) -> str:
    """The server's error message: InfluxDB 1.x sends `{"error": ...}`, 2.x/3.x `{"code", "message"}`,
    proxies plain text; 1.x repeats it in the X-Influxdb-Error header."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        found = parsed.get("error") or parsed.get("message")
        if isinstance(found, str) and found:
            return found
    return (header or text)[:500]


class HttpTransport:
    """POSTs to the scheme://host:port of `url`; `target` paths already carry the url's path prefix."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None
        self._used = False

    def _connect(self) -> http.client.HTTPConnection:
        if self._https:
            context = ssl.create_default_context()
            return http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout_s, context=context)
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout_s)

    def post(self, target: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        # A reused connection may have been closed by the server since the last write: one fresh retry.
        for attempt in range(2):
            if self._conn is None:
                self._conn, self._used = self._connect(), False
            conn, reused = self._conn, self._used
            try:
                conn.request("POST", target, body=body, headers=dict(headers))
                response = conn.getresponse()
                data = response.read()
            except (http.client.HTTPException, OSError) as exc:
                self.close()
                stale = isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError))
                if reused and stale and attempt == 0:
                    continue
                if isinstance(exc, OSError):
                    raise
                raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc
            self._used = True
            if response.will_close:
                self.close()
            version = response.getheader("X-Influxdb-Version", "") or ""
            if 200 <= response.status < 300:
                return Answer(response.status, "", version)
            return Answer(response.status, error_text(data, response.getheader("X-Influxdb-Error", "") or ""), version)
        raise AssertionError("unreachable: the second attempt returns or raises")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
