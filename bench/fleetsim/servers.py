"""The servers and files one fleet run needs: a private PostgreSQL (as tests/postgres.py starts one),
the cloud model that answers escalations, and the bridges' config files."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from devservers import ManagedProcess, Mosquitto, free_port, wait_for_port

PG_BIN = max(
    Path("/usr/lib/postgresql").glob("*/bin"),
    default=Path("/usr/lib/postgresql/15/bin"),
    key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
)
HOST = "127.0.0.1"


def _as_postgres(*argv: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else list(argv)


def _run(*argv: str, timeout: float) -> None:
    subprocess.run(_as_postgres(*argv), check=True, capture_output=True, timeout=timeout)


@contextmanager
def postgres() -> Iterator[tuple[str, int]]:
    """A throwaway PostgreSQL server (run as user postgres when we are root, as PostgreSQL requires);
    yields (admin URL prefix without database, port). Databases are made with `create_database`."""
    if not (PG_BIN / "initdb").exists():
        raise RuntimeError(f"PostgreSQL server binaries not found in {PG_BIN}: apt-get install -y postgresql")
    work = Path(tempfile.mkdtemp(prefix="fleet-pg-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(work, "postgres", "postgres")
        data, port = work / "data", free_port()
        _run(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "bridge", "--no-sync", timeout=60)
        with ManagedProcess("postgres", work / "pg.log") as server:
            argv = [str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port), "-k", str(work), "-h", HOST]
            # fsync off as in the tests: the disk here is host-cached; the figures compare bridges, not disks.
            proc = server.launch(_as_postgres(*argv, "-c", "fsync=off", "-c", "max_connections=200"))
            try:
                wait_for_port(HOST, port, 30, name="postgres", process=proc, log_path=server.console_log)
                yield f"postgresql+asyncpg://bridge@{HOST}:{port}", port
            finally:
                server.terminate(15)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def create_database(port: int, name: str) -> None:
    _run(str(PG_BIN / "createdb"), "-h", HOST, "-p", str(port), "-U", "bridge", name, timeout=30)


@dataclass(frozen=True)
class BridgeSpec:
    name: str
    registry_url: str
    group: str = "bridges"


def write_bridge_config(
    work: Path, spec: BridgeSpec, broker: Mosquitto, cloud_model: Path | None, influx: str | None
) -> Path:
    """A bridge config for the fleet run: drift baselines short enough to score within a run of minutes
    (5 windows and 50 inferences instead of 10 and 200), status lines every 5 s for the watcher."""
    path = work / f"{spec.name}.toml"
    escalation = f'model = "{cloud_model}"\nmax_batch = 64\n' if cloud_model is not None else ""
    influx_section = f'[influx]\nurl = "{influx}"\n' if influx else ""
    path.write_text(
        f"""state_dir = "{work / spec.name}"
status_interval_s = 5

[mqtt]
host = "{broker.host}"
port = {broker.port}
client_id = "{spec.name}"
session_expiry_s = 600

[fleet]
share_group = "{spec.group}"

[registry]
url = "{spec.registry_url}"

{influx_section}
[escalation]
{escalation}
[drift]
baseline_windows = 5
min_samples = 50
""",
        encoding="utf-8",
    )
    return path


def cloud_model(work: Path) -> Path:
    """The demo cloud model (trained once, cached in `work`)."""
    from demokit.models import build_demo_models

    return build_demo_models(work / "models", seed=0)["cloud"].path
