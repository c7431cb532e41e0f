"""Where and how the writer writes: InfluxDB's 1.x or v2 write API, and what each answer means.

- `api = "v1"`: POST `/write?db=DATABASE&rp=RETENTION_POLICY&precision=ms`, HTTP basic auth with
  username/password (or `Authorization: Token` when only a token is set). InfluxDB 1.x; 2.x through
  a DBRP mapping of the database to a bucket; 3.x.
- `api = "v2"`: POST `/api/v2/write?org=ORG&bucket=BUCKET&precision=ms`, `Authorization: Token`.
  InfluxDB 2.x, 3.x and Cloud; 1.8+ too (bucket "db/rp"); not 1.7 and older (404).

Every answer gets a `Verdict`; the writer acts on its `kind`:
- `ok`: written.
- `retry`: the server is down or busy (connection error, 5xx, 429, 408): keep the lines, back off.
- `reject`: the server refused the data itself (400 unparsable line or field type conflict, 422
  outside retention). Resending the same lines can never succeed; InfluxDB has already written the
  valid lines of that batch ("partial write"), so the writer drops the batch and counts its lines.
- `blocked`: the destination or the credentials are wrong (401, 403, 404, other 4xx, and 1.x's 500
  "retention policy not found"). The lines are fine: the writer keeps them (in memory, then in the
  bounded spill), logs what to fix once, and probes again only every `blocked_retry_s`, so a
  database created or a permission granted later lets the backlog flow without a restart.
- `too_large` (413): the writer halves its batch size and sends again.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import quote, urlencode, urlsplit

from cloud_bridge.tsdb.transport import Answer

VerdictKind = Literal["ok", "retry", "reject", "blocked", "too_large"]
API_VERSIONS = ("v1", "v2")


@dataclass(frozen=True)
class Verdict:
    kind: VerdictKind
    # What the server said and what to change, for the log (empty for ok).
    detail: str = ""
    status: int = 0  # the HTTP status (0: no answer)


@dataclass(frozen=True)
class WriteApi:
    """The request line and headers of every write, and how to read the answers."""

    api: str
    target: str  # path (with the url's own prefix) and query string
    headers: dict[str, str] = field(repr=False)
    destination: str  # for messages: 'database "x"' or 'bucket "b" (org "o")'

    @classmethod
    def build(
        cls,
        *,
        url: str,
        api: str,
        database: str = "",
        retention_policy: str = "",
        org: str = "",
        bucket: str = "",
        token: str = "",
        username: str | None = None,
        password: str | None = None,
    ) -> WriteApi:
        prefix = urlsplit(url).path.rstrip("/")
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if api == "v1":
            params = {"db": database, "precision": "ms"}
            if retention_policy:
                params["rp"] = retention_policy
            if username is not None:
                basic = base64.b64encode(f"{username}:{password or ''}".encode()).decode("ascii")
                headers["Authorization"] = f"Basic {basic}"
            elif token:
                headers["Authorization"] = f"Token {token}"
            where = f'database "{database}"' + (f' retention policy "{retention_policy}"' if retention_policy else "")
            return cls(api, f"{prefix}/write?{urlencode(params, quote_via=quote)}", headers, where)
        if api == "v2":
            params = {"org": org, "bucket": bucket, "precision": "ms"}
            if token:
                headers["Authorization"] = f"Token {token}"
            where = f'bucket "{bucket}" (org "{org}")'
            return cls(api, f"{prefix}/api/v2/write?{urlencode(params, quote_via=quote)}", headers, where)
        raise ValueError(f"api must be one of {API_VERSIONS}, not {api!r}")

    def verdict(self, answer: Answer) -> Verdict:
        status, said = answer.status, answer.message
        if 200 <= status < 300:
            return Verdict("ok", status=status)
        if status == 413:
            return Verdict("too_large", f"HTTP 413 {said!r}: the batch is larger than the server accepts", status)
        if status in (400, 422):
            return Verdict(
                "reject",
                f"HTTP {status} {said!r}: the server refused lines of this batch and wrote the others; "
                "those lines are dropped (a field type conflict means a field changed type, e.g. int vs "
                "float; 'beyond retention' means points older than the retention period)",
                status,
            )
        if status == 500 and "retention policy not found" in said:
            return Verdict("blocked", f"HTTP 500 {said!r}: {self._fix_retention_policy()}", status)
        if status in (408, 429) or status >= 500:
            return Verdict("retry", f"HTTP {status} {said!r}", status)
        return Verdict("blocked", f"HTTP {status} {said!r}: {self._fix(status, said, answer.server_version)}", status)

    def _fix(self, status: int, said: str, server_version: str) -> str:
        if status in (401, 403):
            creds = "[influx] username/password" if self.api == "v1" else "[influx] token"
            return f"check {creds}: the server refused them, or they may not write to {self.destination}"
        if status == 404 and self.api == "v2" and _lacks_v2_api(server_version):
            return (
                f'this is InfluxDB {server_version}, which has no /api/v2/write: set [influx] api = "v1" and '
                "[influx] database (and username/password if auth is on)"
            )
        if status == 404 and "database not found" in said:
            return (
                "create it (InfluxQL: CREATE DATABASE) or set [influx] database to an existing one; on "
                "InfluxDB 2 map the database to a bucket (influx v1 dbrp create)"
            )
        if status == 404 and "bucket" in said:
            return "create the bucket, or set [influx] bucket and org to existing ones"
        if status == 404:
            return f"nothing answers {self.target.split('?')[0]} there: check [influx] url and [influx] api"
        return f"the server refuses writes to {self.destination}: check the [influx] settings"

    @staticmethod
    def _fix_retention_policy() -> str:
        return 'create that retention policy, or set [influx] retention_policy = "" for the database\'s default'


def _lacks_v2_api(server_version: str) -> bool:
    """InfluxDB 1.8 added /api/v2/write; older 1.x answer 404 (their X-Influxdb-Version says which)."""
    match = re.match(r"(\d+)\.(\d+)", server_version)
    return match is not None and int(match[1]) == 1 and int(match[2]) < 8
