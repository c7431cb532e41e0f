"""The servers and files one fleet run needs: a private PostgreSQL (devservers/postgres.py),
the cloud model that answers escalations, and the bridges' config files."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from devservers import Mosquitto
from devservers.postgres import HOST, USER, postgres_server


@contextmanager
def postgres() -> Iterator[tuple[str, int]]:
    """A throwaway PostgreSQL server (devservers/postgres.py) taking the connections of several
    bridges; yields (URL prefix without database, port). Databases are made with `create_database`."""
    with postgres_server("max_connections=200") as port:
        yield f"postgresql+asyncpg://{USER}@{HOST}:{port}", port


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
