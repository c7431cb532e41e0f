"""The device side of a rollout's shadow stage: `shadow_start` and `shadow_stop` commands.

The agent (edge_node/ota/agent.py) fetches and verifies a shadow_start's model exactly like a
model_update's (signed command, chunks, sha256); `ShadowControl` then loads it in a worker thread
(the node's loader: same providers and threads as the active model) and hands it to the pipeline's
`ShadowRunner` (edge_node/inference/shadow.py), never to an A/B slot: the active model, its slots
and its probation are untouched, and a node restart forgets the shadow (the rollout's next
shadow_start, or its end, decides what happens next). Acks: "installing" while loading, "done"
once it runs (or stopped), "failed" with the reason when the file does not load.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from edge_node.errors import ModelLoadError
from edge_node.inference.model import Classifier
from edge_node.inference.shadow import ShadowRunner
from edge_node.ota.acks import CommandAcks
from schemas import Command

log = logging.getLogger(__name__)


class ShadowControl:
    """Implements the agent's `ShadowHost`: starts and stops the pipeline's shadow model."""

    def __init__(self, runner: ShadowRunner, load: Callable[[Path], Classifier], acks: CommandAcks) -> None:
        self.runner = runner
        self.load = load
        self.acks = acks

    async def start(self, model_path: Path, command: Command) -> None:
        assert command.update is not None  # the downloader refused a command without one
        await self.acks.send(command, "installing", model=command.update.model)
        try:
            model = await asyncio.to_thread(self.load, model_path)
        except ModelLoadError as exc:
            log.warning("shadow model %s does not load: %s", model_path, exc)
            await self.acks.send(command, "failed", reason=f"shadow_load: {exc}")
            return
        if model.info.ref.sha256 != command.update.model.sha256:
            await self.acks.send(command, "failed", reason="shadow_load: the loaded file is not the command's model")
            return
        self.runner.start(model)
        await self.acks.send(command, "done", model=model.info.ref)

    async def stop(self, command: Command) -> None:
        stopped = self.runner.stop()
        await self.acks.send(command, "done", model=stopped)
