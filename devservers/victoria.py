"""A real victoria-metrics process: the local stand-in for InfluxDB's write API in tests, bench and demo.

victoria-metrics (Debian package `victoria-metrics`, binary /usr/bin/victoria-metrics, 1.79.5 on
Debian 12) accepts InfluxDB line protocol on `/api/v2/write` (what influxdb-client's write API posts,
with any org/bucket/token) and on `/write?db=NAME`, and reads back raw samples on `/api/v1/export`.

How a line `m,tag=a field=1.5,n=3i 1700000000123456789` is stored (checked on 1.79.5):
- one series per field, named `<measurement>_<field>`: `m_field{tag="a"}` = 1.5 and `m_n{tag="a"}` = 3;
- tags become labels unchanged (spaces and commas in keys and values survive the escaping);
- integer fields are floats, booleans 1/0, and **string fields are stored as 0**;
- timestamps are kept in milliseconds (-influxTrimTimestamp=1ms): the example's is 1700000000123;
- `/write?db=NAME` adds a `db="NAME"` label; `/api/v2/write` (influxdb-client) **ignores org and
  bucket on 1.79.5**, so no `db` label (newer releases may add `db=<bucket>`; do not rely on either);
- points older than `-retentionPeriod` are dropped silently (docs/traps.md #6): started here with 100y.

Durability: a 204 from the write API and even `/internal/force_flush` leave the last ~5 s of samples in
memory; `kill()` loses them. `persist()` (a snapshot, created and deleted) writes them to disk first.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from devservers._process import ManagedProcess
from devservers._server import LocalServer
from devservers.ports import PortWaitError, free_port, tail, wait_for_port

log = logging.getLogger(__name__)

ALL_SERIES = '{__name__!=""}'
_INSTALL_HINT = "install it with `apt-get install -y victoria-metrics`"
_HTTP_TIMEOUT_S = 10.0
_POLL_INTERVAL_S = 0.02
# Export defaults `end` to the current second, which hides samples written during it; look ahead a day.
_EXPORT_LOOKAHEAD_S = 86_400


class VictoriaError(RuntimeError):
    """victoria-metrics could not be found or started, or an HTTP call to it failed."""


@dataclass(frozen=True)
class ExportedSeries:
    """One series from `/api/v1/export`: `labels` excludes `__name__`, timestamps are Unix ms."""

    name: str
    labels: dict[str, str]
    values: list[float]
    timestamps_ms: list[int]

    @classmethod
    def from_json_line(cls, line: str) -> ExportedSeries:
        raw = json.loads(line)
        labels = {str(k): str(v) for k, v in raw["metric"].items()}
        name = labels.pop("__name__", "")
        return cls(
            name=name,
            labels=labels,
            values=[float(v) for v in raw["values"]],
            timestamps_ms=[int(t) for t in raw["timestamps"]],
        )


def find_victoria_metrics() -> Path:
    found = shutil.which("victoria-metrics")
    if found is None:
        raise VictoriaError(f"victoria-metrics binary not found on PATH: {_INSTALL_HINT}")
    return Path(found)


class VictoriaMetrics(LocalServer):
    """A victoria-metrics process storing into `work_dir`, listening on 127.0.0.1:<free port>.

    The port and the data dir are kept across `stop()`/`kill()` and `start()`. Not thread-safe for
    lifecycle calls; the HTTP helpers may be called from any thread.
    """

    start_timeout_s = 15.0
    stop_timeout_s = 15.0  # SIGTERM: victoria-metrics flushes what it holds in memory to disk on the way out

    def __init__(
        self,
        work_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        retention_period: str = "100y",
        extra_args: tuple[str, ...] = (),
        binary: Path | None = None,
        name: str = "victoria-metrics",
    ) -> None:
        self.work_dir = Path(work_dir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.retention_period = retention_period
        self.extra_args = extra_args
        self.name = name
        self._binary = binary
        self._process = ManagedProcess(name, self.work_dir / f"{name}.log")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.work_dir / "data"

    @property
    def log_path(self) -> Path:
        return self._process.console_log

    def argv(self, binary: Path) -> list[str]:
        return [
            str(binary),
            f"-storageDataPath={self.data_dir}",
            f"-httpListenAddr={self.host}:{self.port}",
            # Default retention is one month: older points vanish silently (docs/traps.md #6).
            f"-retentionPeriod={self.retention_period}",
            # Fresh points must be readable at once by tests, not 30 s later; caching would hide them.
            "-search.latencyOffset=0s",
            "-search.disableCache",
            *self.extra_args,
        ]

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> None:
        """Start and return once `/health` answers OK."""
        timeout = self.start_timeout_s if timeout is None else timeout
        binary = self._binary if self._binary is not None else find_victoria_metrics()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        proc = self._process.launch(self.argv(binary))
        deadline = time.monotonic() + timeout
        try:
            wait_for_port(self.host, self.port, timeout, name=self.name, process=proc, log_path=self.log_path)
            self._wait_healthy(deadline)
        except (PortWaitError, VictoriaError) as exc:
            self._process.kill()
            raise VictoriaError(f"{exc}\n--- log tail ({self.log_path}) ---\n{tail(self.log_path)}") from exc
        log.info("victoria-metrics ready name=%s url=%s pid=%s", self.name, self.url, self.pid)

    def _wait_healthy(self, deadline: float) -> None:
        """The port opens before storage is loaded; `/health` says OK only once it serves requests."""
        last_error = "no answer"
        while time.monotonic() < deadline:
            if not self.alive:
                raise VictoriaError(f"{self.name} exited during startup")
            try:
                if self._get("/health").strip() == b"OK":
                    return
            except VictoriaError as exc:
                last_error = str(exc)
            time.sleep(_POLL_INTERVAL_S)
        raise VictoriaError(f"{self.name} not healthy before the deadline: {last_error}")

    def __repr__(self) -> str:
        return f"VictoriaMetrics(name={self.name!r}, url={self.url!r}, alive={self.alive})"

    # -- HTTP --------------------------------------------------------------------------------------

    def write_lines(self, lines: Iterable[str], *, bucket: str = "b", precision: str = "ms") -> None:
        """Post line protocol to `/api/v2/write` the way influxdb-client does."""
        body = "\n".join(lines).encode("utf-8")
        query = urllib.parse.urlencode({"org": "o", "bucket": bucket, "precision": precision})
        self._request(f"/api/v2/write?{query}", data=body)

    def force_flush(self) -> None:
        """Make every accepted sample visible to queries (not durable: see `persist()`)."""
        self._get("/internal/force_flush")

    def persist(self) -> None:
        """Write every accepted sample to disk so it survives `kill()`.

        A snapshot flushes the in-memory parts synchronously; it is deleted right away.
        """
        created = json.loads(self._get("/snapshot/create"))
        if created.get("status") != "ok":
            raise VictoriaError(f"snapshot/create failed: {created}")
        name = urllib.parse.quote(str(created["snapshot"]))
        self._get(f"/snapshot/delete?snapshot={name}")

    def export(self, match: str = ALL_SERIES) -> list[ExportedSeries]:
        """All raw samples of the series matching `match`, sorted by name then labels."""
        self.force_flush()
        form = urllib.parse.urlencode(
            {"match[]": match, "start": "0", "end": str(int(time.time()) + _EXPORT_LOOKAHEAD_S)}
        ).encode("ascii")
        body = self._request("/api/v1/export", data=form)
        series = [ExportedSeries.from_json_line(line) for line in body.decode("utf-8").splitlines() if line]
        return sorted(series, key=lambda s: (s.name, sorted(s.labels.items())))

    def _get(self, path: str) -> bytes:
        return self._request(path, data=None)

    def _request(self, path: str, data: bytes | None) -> bytes:
        request = urllib.request.Request(self.url + path, data=data, method="GET" if data is None else "POST")
        try:
            with urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT_S) as response:
                body: bytes = response.read()
                return body
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", errors="replace")
            raise VictoriaError(f"{self.name} {path} -> HTTP {exc.code}: {detail}") from exc
        except OSError as exc:
            raise VictoriaError(f"{self.name} {path} failed: {exc}") from exc
