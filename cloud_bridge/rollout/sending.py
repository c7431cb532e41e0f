"""Sending a rollout stage's commands: built and sent together, their rows changed in one statement.

A stage of 10,000 devices sent one command at a time was 10,000 command inserts, 10,000 publish round
trips and 10,000 row updates one after another. Now the commands are recorded in one statement and
published with many in flight (cloud_bridge/ota/commands.py `send_all`), and the rollout rows of
those published take their cmd_id in one transaction (store.py `update_devices`). The order that
makes a crash safe is kept: a command is recorded before it is published, and its row records the
cmd_id after, so a row without one is sent again (a device receiving the same update twice keeps the
model it has).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from cloud_bridge.models.store import ModelRecord
from cloud_bridge.ota.commands import Action
from cloud_bridge.rollout.store import RolloutStore
from schemas.messages import Command


class Sender(Protocol):
    """What the driver needs of cloud_bridge.ota.commands.CommandSender."""

    async def build_many(
        self,
        fleet_id: str,
        action: Action,
        devices: Sequence[tuple[str, str | None]],
        record: ModelRecord | None = None,
        *,
        rollout_id: str | None = None,
        stage: int | None = None,
    ) -> list[Command]: ...

    async def send_all(self, commands: Sequence[Command]) -> tuple[list[Command], Exception | None]: ...


async def send_commands(
    store: RolloutStore,
    sender: Sender,
    rollout_id: str,
    rows: list[dict[str, Any]],
    commands: list[Command],
    field: str,
    **values: Any,
) -> None:
    """Send one command per row (of `rows`, one per device) together, then write each published one's
    cmd_id into its row's `field` (with `values`), in the database and in `rows`. Rows whose command
    was not published stay as they were, for the next tick; the failure that stopped them is raised."""
    published, failure = await sender.send_all(commands)
    sent = {command.device_id: command.cmd_id for command in published}
    done = [row for row in rows if row["device_id"] in sent]
    await store.update_devices(
        rollout_id, [(row["device_id"], {field: sent[row["device_id"]], **values}) for row in done]
    )
    for row in done:
        row.update({field: sent[row["device_id"]], **values})
    if failure is not None:
        raise failure


def few(device_ids: Iterable[str], shown: int = 20) -> str:
    """Device ids for a log line: the first `shown`, then how many more (a stage may take 10,000)."""
    ids = list(device_ids)
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return ",".join(ids[:shown]) + more
