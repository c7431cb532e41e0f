"""Container health check: healthy while this container holds an ESTABLISHED TCP connection to a port.

The edge node and the cloud bridge have no HTTP endpoint; what matters is that they are connected to
the broker, which the kernel's socket table shows without any extra tool in the image.

    python /etc/edgefleet/healthcheck.py 8883
"""

from __future__ import annotations

import sys
from pathlib import Path

_ESTABLISHED = "01"
_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))


def connected_to(port: int, tables: tuple[Path, ...] = _TABLES) -> bool:
    """Whether a socket in `tables` (Linux /proc/net/tcp format) is ESTABLISHED to remote `port`."""
    for table in tables:
        if not table.exists():
            continue
        for row in table.read_text(encoding="ascii").splitlines()[1:]:
            fields = row.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == _ESTABLISHED:
                return True
    return False


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: healthcheck.py PORT  (exit 0 if connected to PORT)", file=sys.stderr)
        return 2
    port = int(argv[0])
    if connected_to(port):
        return 0
    print(f"no established connection to port {port}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
