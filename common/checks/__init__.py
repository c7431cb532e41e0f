"""`check` for both programs: findings and the report (report.py), and the probes both need: disk
(disk.py), TCP and TLS (network.py), an MQTT login and its connection (mqtt.py).

A diagnosis is a `Checklist` of `Finding`s, one per check, in the order they ran: `ok`, `warn` or
`fail` with what was found and, for warn and fail, the fix; `skip` when the check could not run
because one it needs failed (no broker login without a TCP connection). `render` prints one line
per finding; the program exits non-zero when any failed.

The probes look and do not change anything (a directory is written to with a temporary file that
is removed at once): a directory writable and its free disk, a TCP connection, a TLS handshake with
the server certificate's dates (and a client certificate file's), and an MQTT login whose connection
(`MqttProbe`) the later checks use to subscribe, publish and receive. Connection failures are
classified by common/mqtt.py, as the programs' own links classify them.
"""

from common.checks.disk import probe_dir
from common.checks.mqtt import MqttProbe, Received, login_finding
from common.checks.network import EXPIRY_WARN_DAYS, probe_cert_file, probe_tcp, probe_tls
from common.checks.report import Checklist, Finding, Status, render, size

__all__ = [
    "EXPIRY_WARN_DAYS",
    "Checklist",
    "Finding",
    "MqttProbe",
    "Received",
    "Status",
    "login_finding",
    "probe_cert_file",
    "probe_dir",
    "probe_tcp",
    "probe_tls",
    "render",
    "size",
]
