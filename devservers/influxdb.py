"""A real InfluxDB 1.x process (Debian's `influxd`) for tests: the 1.x write API and InfluxQL.

Debian 12's package `influxdb` is InfluxDB 1.6.7 (binary /usr/bin/influxd). It answers `/ping`,
`/write?db=&rp=&precision=` and `/query` (InfluxQL); it has no `/api/v2/write` (404) and no Flux.
victoria-metrics (devservers/victoria.py) stands in for the v2 write API but answers no InfluxQL, so
the dashboard's queries run here.

The generated config keeps the server to itself: data, meta and WAL under `work_dir`, HTTP and the
backup RPC service on 127.0.0.1 free ports (never the stock 8086/8088, where an installed service
may listen), usage reporting, the ifql RPC listener, the `_internal` monitor database, continuous
queries, subscribers and the retention enforcer off. HTTP request logging stays on: the console log
shows every write with its status, which tests count. With `auth=True` the server requires users
and `start()` creates an admin (`admin_user` / `admin_password`).

What 1.6.7 answers (checked): a missing database is 404 `{"error":"database not found: \"x\""}`, a
missing retention policy 500 `retention policy not found`, an unparsable line or a field type conflict
400 `partial write: ...` (the valid lines of the batch are written), bad credentials 401.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from devservers._process import ManagedProcess
from devservers._server import LocalServer
from devservers.ports import PortWaitError, free_port, tail, wait_for_port

log = logging.getLogger(__name__)

_INSTALL_HINT = "install it with `apt-get install -y influxdb` (Debian's InfluxDB 1.x), or run scripts/setup.sh"
_HTTP_TIMEOUT_S = 10.0
_POLL_INTERVAL_S = 0.02


class InfluxDBError(RuntimeError):
    """influxd could not be found or started, or an HTTP call to it failed (the message has its answer)."""


def find_influxd() -> Path:
    found = shutil.which("influxd")
    if found is None:
        raise InfluxDBError(f"influxd binary not found on PATH: {_INSTALL_HINT}")
    return Path(found)


class InfluxDB(LocalServer):
    """An influxd storing into `work_dir`, HTTP on 127.0.0.1:<free port>, kept across restarts.

    Not thread-safe for lifecycle calls; the HTTP helpers may be called from any thread.
    """

    start_timeout_s = 20.0
    stop_timeout_s = 15.0  # SIGTERM: influxd closes its shards and WAL cleanly on the way out

    def __init__(
        self,
        work_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        auth: bool = False,
        admin_user: str = "admin",
        admin_password: str = "admin-test-password",
        binary: Path | None = None,
        name: str = "influxdb",
    ) -> None:
        self.work_dir = Path(work_dir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        # The backup/restore RPC service cannot be turned off in 1.x: give it its own free port.
        self.rpc_port = free_port(host, avoid=(self.port,))
        self.auth = auth
        self.admin_user = admin_user
        self.admin_password = admin_password
        self.name = name
        self._binary = binary
        self._process = ManagedProcess(name, self.work_dir / f"{name}.log")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.work_dir / "influxdb.conf"

    @property
    def log_path(self) -> Path:
        return self._process.console_log

    def render_config(self) -> str:
        root = self.work_dir
        return f"""\
reporting-enabled = false
bind-address = "{self.host}:{self.rpc_port}"

[meta]
  dir = "{root / "meta"}"

[data]
  dir = "{root / "data"}"
  wal-dir = "{root / "wal"}"
  query-log-enabled = false

[monitor]
  store-enabled = false

[http]
  enabled = true
  bind-address = "{self.host}:{self.port}"
  auth-enabled = {"true" if self.auth else "false"}
  log-enabled = true
  pprof-enabled = false

[ifql]
  enabled = false

[subscriber]
  enabled = false

[continuous_queries]
  enabled = false

[retention]
  enabled = false
"""

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> None:
        """Start and return once `/ping` answers 204 (and, with `auth`, the admin user exists)."""
        timeout = self.start_timeout_s if timeout is None else timeout
        binary = self._binary if self._binary is not None else find_influxd()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.render_config(), encoding="utf-8")
        proc = self._process.launch([str(binary), "run", "-config", str(self.config_path)])
        deadline = time.monotonic() + timeout
        try:
            wait_for_port(self.host, self.port, timeout, name=self.name, process=proc, log_path=self.log_path)
            self._wait_ping(deadline)
            if self.auth:
                self._ensure_admin()
        except (PortWaitError, InfluxDBError) as exc:
            self._process.kill()
            raise InfluxDBError(f"{exc}\n--- log tail ({self.log_path}) ---\n{tail(self.log_path)}") from exc
        log.info("influxdb ready name=%s url=%s pid=%s", self.name, self.url, self.pid)

    def _wait_ping(self, deadline: float) -> None:
        last_error = "no answer"
        while time.monotonic() < deadline:
            if not self.alive:
                raise InfluxDBError(f"{self.name} exited during startup")
            try:
                status, _, _ = self._request("GET", "/ping", None, auth=False)
                if status == 204:
                    return
                last_error = f"/ping answered {status}"
            except InfluxDBError as exc:
                last_error = str(exc)
            # The port accepts before the HTTP handler is registered: nothing to wait on but the answer.
            time.sleep(_POLL_INTERVAL_S)
        raise InfluxDBError(f"{self.name} did not answer /ping before the deadline: {last_error}")

    def _ensure_admin(self) -> None:
        # With auth on and no user yet, 1.x accepts exactly one unauthenticated CREATE USER ... WITH ALL
        # PRIVILEGES; after a restart the user exists and that statement is refused, so look first.
        status, _, _ = self._request("GET", "/query?" + urllib.parse.urlencode({"q": "SHOW USERS"}), None, auth=True)
        if status == 200:
            return
        password = self.admin_password.replace("'", "\\'")
        self.query(f"CREATE USER \"{self.admin_user}\" WITH PASSWORD '{password}' WITH ALL PRIVILEGES", auth=False)

    def __repr__(self) -> str:
        return f"InfluxDB(name={self.name!r}, url={self.url!r}, alive={self.alive})"

    def http_requests(self, path_prefix: str) -> list[int]:
        """Status codes of the requests whose path starts with `path_prefix`, from the access log."""
        marker = f'"POST {path_prefix}'
        out = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            at = line.find(marker)
            if at >= 0:
                # `"POST /write?db=x HTTP/1.1" 204 0 "-" ...`: the status follows the quoted request line.
                out.append(int(line[line.index('"', at + 1) + 1 :].split()[0]))
        return out

    # -- HTTP --------------------------------------------------------------------------------------

    def query(
        self, q: str, db: str | None = None, *, auth: bool = True, timeout_s: float = _HTTP_TIMEOUT_S
    ) -> list[dict[str, Any]]:
        """Run InfluxQL (POST /query, epoch=ms); the `results` list. A statement error raises."""
        params = {"q": q, "epoch": "ms"}
        if db is not None:
            params["db"] = db
        body_in = urllib.parse.urlencode(params).encode()
        status, body, _ = self._request("POST", "/query", body_in, auth=auth, timeout_s=timeout_s)
        answer = json.loads(body or b"{}")
        if status != 200 or "error" in answer:
            raise InfluxDBError(f"{self.name} query {q!r} -> HTTP {status}: {answer.get('error', body[:300])}")
        results: list[dict[str, Any]] = answer.get("results", [])
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise InfluxDBError(f"{self.name} query {q!r} failed: {errors[0]}")
        return results

    def create_database(self, name: str) -> None:
        self.query(f'CREATE DATABASE "{name}"')

    def drop_database(self, name: str) -> None:
        self.query(f'DROP DATABASE "{name}"')

    def write_lines(self, lines: Iterable[str], db: str, *, precision: str = "ms") -> None:
        query = urllib.parse.urlencode({"db": db, "precision": precision})
        status, body, _ = self._request("POST", f"/write?{query}", "\n".join(lines).encode(), auth=True)
        if status != 204:
            raise InfluxDBError(f"{self.name} write -> HTTP {status}: {body[:300]!r}")

    def _request(
        self, method: str, path: str, data: bytes | None, *, auth: bool, timeout_s: float = _HTTP_TIMEOUT_S
    ) -> tuple[int, bytes, str]:
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if auth and self.auth:
            token = b64encode(f"{self.admin_user}:{self.admin_password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.status, response.read(), response.headers.get("X-Influxdb-Version", "")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), exc.headers.get("X-Influxdb-Version", "")
        except OSError as exc:
            raise InfluxDBError(f"{self.name} {method} {path.split('?')[0]} failed: {exc}") from exc
