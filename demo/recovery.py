"""The improvement loop as the demo sees it, and what it did for the drifted device.

`LoopView` follows the loop the bridge's `[improve]` policy started, through the same commands an
operator has (`cloud-bridge improve status --json`, `rollout status --json`). `measure` splits the
drifted device's answers (those whose truth the replay knew) by what they were: clean inputs on the
base model, rotated inputs on the base model, rotated inputs on the retrained model; and the times of
what happened between (drift, alert, loop, the new model's first answer, its promotion), for the
summary and the report's recovery plot.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from demo.watch import AlertEvent, Scored

CloudCli = Callable[..., str]
RECOVERED_ACCURACY = 0.93  # the retrained model's edge-only accuracy on the drifted inputs `demo OK` needs
MIN_RECOVERED_ANSWERS = 200  # answers of the retrained model on the drifted device before it is judged


@dataclass
class LoopView:
    cli: CloudCli
    config: Path
    loop: dict[str, Any] | None = None  # the first loop's `improve status` row
    rollout: dict[str, Any] | None = None
    seen: list[str] = field(default_factory=list)  # history events shown so far

    def poll(self) -> list[str]:
        """Refresh; returns the loop's history events new since the last poll."""
        loops = json.loads(self.cli("improve", "status", "--json", "--config", str(self.config)))
        if not loops:
            return []
        self.loop = loops[0]
        rollout_id = self.loop.get("rollout_id")
        if rollout_id:
            self.rollout = json.loads(self.cli("rollout", "status", rollout_id, "--json", "--config", str(self.config)))
        events = [str(entry["event"]) for entry in self.loop["history"]]
        new, self.seen = events[len(self.seen) :], events
        return [f"improve loop {self.loop['id'][:8]}: {event}" for event in new]

    @property
    def finished(self) -> bool:
        return self.loop is not None and self.loop["state"] != "running"

    @property
    def candidate(self) -> str | None:
        return None if self.loop is None else self.loop.get("candidate_version")

    def details(self) -> dict[str, Any] | None:
        """The loop in detail (dataset counts, lineage), as `improve status LOOP --json` gives it."""
        if self.loop is None:
            return None
        rows = json.loads(self.cli("improve", "status", self.loop["id"], "--json", "--config", str(self.config)))
        detail: dict[str, Any] = rows[0]
        return detail

    def line(self) -> str:
        if self.loop is None:
            return "improve: no loop yet ([improve] auto starts one on a drift alert with enough human labels)"
        loop = self.loop
        stage = ""
        if self.rollout is not None and loop["state"] == "running":
            stages = self.rollout.get("stages") or []
            at = int(self.rollout.get("stage", 0))
            if at < len(stages):
                stage = f", rollout stage {'shadow ' if stages[at] < 0 else ''}{abs(stages[at])}%"
        return f"improve loop {loop['id'][:8]}: {loop['state']} (phase {loop['phase']}{stage})"


@dataclass(frozen=True)
class Phase:
    answers: int
    edge_right: int
    unsure: int
    sent: int = 0

    @classmethod
    def of(cls, answers: Sequence[Scored]) -> Phase:
        right, unsure = sum(a.edge_right for a in answers), sum(a.unsure for a in answers)
        return cls(len(answers), right, unsure, sum(a.sent for a in answers))

    @property
    def sent_rate(self) -> float | None:
        return self.sent / self.answers if self.answers else None

    @property
    def accuracy(self) -> float | None:
        return self.edge_right / self.answers if self.answers else None

    @property
    def escalation_rate(self) -> float | None:
        return self.unsure / self.answers if self.answers else None


@dataclass(frozen=True)
class Recovery:
    """The drifted device's story; times in seconds since the watch started."""

    device: str
    base: str
    candidate: str | None
    before: Phase  # clean inputs, base model
    drifted: Phase  # rotated inputs, base model
    recovered: Phase  # rotated inputs, retrained model
    unlabeled: Phase  # of those, inputs the labeling team never saw (so never trained on)
    drift_at: float | None
    alert_at: float | None
    loop_at: float | None
    installed_at: float | None
    promoted_at: float | None

    @property
    def ok(self) -> bool:
        accuracy = self.recovered.accuracy
        return (
            self.recovered.answers >= MIN_RECOVERED_ANSWERS and accuracy is not None and accuracy >= RECOVERED_ACCURACY
        )


def measure(
    device: str,
    base: str,
    scored: Sequence[Scored],
    alerts: Sequence[AlertEvent],
    loop: dict[str, Any] | None,
    labeled_refs: set[str],
    started: float,
) -> Recovery:
    candidate = None if loop is None else loop.get("candidate_version")
    drifted = [a for a in scored if a.drifted]
    drift_at = drifted[0].at if drifted else None
    new = [a for a in drifted if candidate is not None and a.version == candidate]
    alert_at = next(
        (
            a.at
            for a in alerts
            if a.device == device and a.state == "firing" and drift_at is not None and a.at >= drift_at
        ),
        None,
    )
    promoted_at = None
    if loop is not None and loop["state"] == "promoted":
        promoted_at = float(loop["history"][-1]["at"]) - started
    return Recovery(
        device=device,
        base=base,
        candidate=candidate,
        before=Phase.of([a for a in scored if not a.drifted and a.version == base]),
        drifted=Phase.of([a for a in drifted if a.version == base]),
        recovered=Phase.of(new),
        unlabeled=Phase.of([a for a in new if a.ref not in labeled_refs]),
        drift_at=drift_at,
        alert_at=alert_at,
        loop_at=None if loop is None else float(loop["created_at"]) - started,
        installed_at=new[0].at if new else None,
        promoted_at=promoted_at,
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _after(at: float | None, since: float | None) -> str:
    return "never" if at is None or since is None else f"+{at - since:.0f}s"


def _advice(detail: dict[str, Any] | None) -> str:
    """The gate's escalation verdict for the candidate (cloud_bridge/improve/driver.py), if it made one."""
    esc = ((detail or {}).get("gate") or {}).get("escalation")
    if not esc:
        return ""
    if esc["verdict"] == "does_not_help":
        return (
            f" (the gate found the cloud no better where the new model is unsure: {esc['cloud_accuracy']:.2f} vs "
            f"{esc['edge_accuracy']:.2f} on {esc['labeled']} held-out labels, so the device pauses escalations)"
        )
    return f" (the gate found the cloud {esc['verdict'].replace('_', ' ')} where the new model is unsure)"


def recovery_lines(r: Recovery, detail: dict[str, Any] | None) -> list[str]:
    """The summary's account of the loop: accuracies, times, labels, escalation."""
    lines = [
        f"improvement loop on {r.device} (edge-only accuracy on the inputs it scored, truth from the replay):",
        f"    before drift    {_pct(r.before.accuracy)}  ({r.before.answers} clean inputs, {r.base})",
        f"    after drift     {_pct(r.drifted.accuracy)}  ({r.drifted.answers} rotated inputs, {r.base})",
        f"    after recovery  {_pct(r.recovered.accuracy)}  ({r.recovered.answers} rotated inputs, {r.candidate})"
        f"; on the {r.unlabeled.answers} never labeled (so never trained on): {_pct(r.unlabeled.accuracy)}",
        f"    escalation rate (edge unsure): before drift {_pct(r.before.escalation_rate)}, after drift "
        f"{_pct(r.drifted.escalation_rate)}, after recovery {_pct(r.recovered.escalation_rate)}",
        f"    escalations sent to the cloud: before drift {_pct(r.before.sent_rate)}, after drift "
        f"{_pct(r.drifted.sent_rate)}, after recovery {_pct(r.recovered.sent_rate)}" + _advice(detail),
        f"    timeline from the drift's start: alert {_after(r.alert_at, r.drift_at)}, loop started "
        f"{_after(r.loop_at, r.drift_at)}, retrained model answering {_after(r.installed_at, r.drift_at)}, "
        f"promoted {_after(r.promoted_at, r.drift_at)}",
    ]
    if r.installed_at is not None and r.drift_at is not None:
        lines.append(f"    time from drift start to recovery: {r.installed_at - r.drift_at:.0f}s")
    if detail is not None:
        counts = detail.get("dataset_counts") or {}
        human = int(counts.get("human_train", 0)) + int(counts.get("human_holdout", 0))
        pseudo = int(counts.get("pseudo_train", 0)) + int(counts.get("pseudo_holdout", 0))
        lines.append(
            f"    human labels used: {human} ({counts.get('human_train', 0)} trained on, "
            f"{counts.get('human_holdout', 0)} held out for the gate); pseudo-labels used: {pseudo}"
        )
        gate = detail.get("gate") or {}
        if gate:
            lines.append(
                f"    gate {'passed' if gate.get('passed') else 'FAILED'}: drifted holdout "
                f"{gate['drifted_current']:.3f} -> {gate['drifted_candidate']:.3f}, original test "
                f"{gate['original_current']:.3f} -> {gate['original_candidate']:.3f}"
            )
        lines.append(
            f"    loop {detail['id'][:8]}: {detail['state']}"
            + (f" ({detail['reason']})" if detail.get("reason") else "")
        )
    return lines
