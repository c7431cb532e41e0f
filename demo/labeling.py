"""The demo's labeling desk: what an operator does about a drift alert, with a STAND-IN for the labelers.

Every `every_s`, for each device whose drift alert fires and whose samples no improvement loop has
taken yet, the desk exports the device's archived samples since the alert's windows began (its inputs
as the drift detector saw them drift) as Label Studio tasks (`cloud-bridge samples export --since T
--format label-studio`: samples already exported to the device's directory are skipped, so each round's
tasks are the new ones), hands them to `demokit.labelers.StandInLabelingTeam`
(which answers from the data set's ground truth, wrong on purpose at its error rate, after its delay),
and imports each answered file once it comes back (`cloud-bridge samples labels import`). Nothing here
decides anything about the loop: the bridge's `[improve]` policy starts it once enough labels are in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_bridge.samples.export import read_manifest
from demokit.labelers import StandInLabelingTeam

CloudCli = Callable[..., str]


@dataclass
class LabelingDesk:
    cli: CloudCli  # runs one `cloud-bridge` command, returns what it printed
    config: Path
    out: Path  # one export directory per device below it, and the answered files
    team: StandInLabelingTeam
    every_s: float = 4.0
    exported: int = 0
    imported: int = 0  # labels imported (the team's answers)
    imports: int = 0  # answered files imported
    labeled_refs: dict[str, set[str]] = field(default_factory=dict)  # device -> source_ref of each labeled input
    _last_export: float = float("-inf")
    _refs: dict[str, tuple[str, str]] = field(default_factory=dict)  # msg_id -> (device, source_ref)
    _answered: list[list[dict[str, Any]]] = field(default_factory=list)  # the team's answers, not yet imported

    def step(self, now: float, devices: Mapping[str, float]) -> list[str]:
        """Export for `devices` (device -> unix time its samples are wanted from; due every `every_s`), import
        what the team finished; returns what happened."""
        events: list[str] = []
        if devices and now - self._last_export >= self.every_s:
            self._last_export = now
            for device, since in sorted(devices.items()):
                events += self._export(device, since, now)
        self._answered += self.team.finished(now)
        while self._answered:  # oldest first; one that fails (a busy registry) stays for the next step
            events.append(self._import(self._answered[0]))
            self._answered.pop(0)
        return events

    def _export(self, device: str, since: float, now: float) -> list[str]:
        directory = self.out / device
        # Label Studio serves files of a local-storage directory under this URL (docs/improve.md).
        prefix = f"/data/local-files/?d={directory.name}/"
        self.cli(
            "samples", "export", "--config", str(self.config), "--since", f"{since:.3f}", "--device", device,
            "--out", str(directory), "--format", "label-studio", "--image-url-prefix", prefix, "--quiet",
        )  # fmt: skip
        tasks = json.loads((directory / "label-studio.json").read_text(encoding="utf-8"))
        if not tasks:
            return []
        # The replay source knows each input's label, and the export keeps it in the manifest: the
        # stand-in's "ground truth". The demo never reads it anywhere else.
        entries = read_manifest(directory / "manifest.jsonl")
        self.team.learn({e["msg_id"]: e["truth"] for e in entries if e["truth"] is not None})
        self._refs.update({e["msg_id"]: (e["device_id"], e["source_ref"] or "") for e in entries})
        self.team.receive(tasks, now)
        self.exported += len(tasks)
        return [f"exported {len(tasks)} samples of {device} to the stand-in labeling team"]

    def _import(self, answered: list[dict[str, Any]]) -> str:
        path = self.out / f"answers-{self.imports + 1:03d}.json"
        path.write_text(json.dumps(answered), encoding="utf-8")
        self.cli("samples", "labels", "import", "--config", str(self.config), str(path))
        self.imports += 1
        labeled = [task for task in answered if task.get("annotations")]
        for task in labeled:
            device, ref = self._refs.get(str(task["data"]["msg_id"]), ("", ""))
            self.labeled_refs.setdefault(device, set()).add(ref)
        self.imported += len(labeled)
        return f"imported {len(labeled)} labels from the stand-in labeling team ({path.name})"

    def status(self) -> str:
        team = self.team
        return (
            f"stand-in labeling team (error rate {team.error_rate:.0%}, {team.delay_s:g}s turnaround): "
            f"{self.exported} tasks exported, {self.imported} labels imported, {team.pending} pending, "
            f"{team.mistakes} wrong on purpose"
        )
