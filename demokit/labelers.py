"""A STAND-IN for a human labeling team, for the demo, the recovery bench and the tests only.

`StandInLabelingTeam` answers Label Studio tasks (the `label-studio.json` that `cloud-bridge samples
export --format label-studio` writes) from the dataset's ground truth, wrong on purpose at
`error_rate` (a uniformly drawn other label), and writes what Label Studio's Export -> JSON would give:
the tasks with an `annotations` list of `choices` results (labelstud.io/guide/export). Nothing here
is a labeler: it knows the answers because the demo's data set does.

People take time: with `delay_s`, tasks handed over with `receive` come back from `finished` only once
that long has passed (the demo's labeling round trip: export, wait for the team, import).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class StandInLabelingTeam:
    """Ground truth by msg_id, answered with `error_rate` mistakes (seeded)."""

    truth: Mapping[str, str]
    labels: Sequence[str]
    error_rate: float = 0.02
    seed: int = 0
    budget: int | None = None  # at most this many tasks answered over the team's life
    delay_s: float = 0.0  # between `receive` and the answers from `finished`
    answered: int = 0
    mistakes: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate = {self.error_rate} must be between 0 and 1")
        if self.delay_s < 0:
            raise ValueError(f"delay_s = {self.delay_s} must be >= 0")
        self._rng = np.random.default_rng(self.seed)
        self._truth = dict(self.truth)
        self._inbox: list[tuple[float, list[Mapping[str, Any]]]] = []  # (due, tasks), oldest first

    def learn(self, truth: Mapping[str, str]) -> None:
        """More ground truth by msg_id (the demo learns it from each export's manifest)."""
        self._truth.update(truth)

    def receive(self, tasks: Sequence[Mapping[str, Any]], now: float) -> None:
        """Take a batch of tasks (a `label-studio.json`'s list) to answer `delay_s` after `now`."""
        if tasks:
            self._inbox.append((now + self.delay_s, list(tasks)))

    @property
    def pending(self) -> int:
        """Tasks received and not yet answered."""
        return sum(len(tasks) for _, tasks in self._inbox)

    def finished(self, now: float) -> list[list[dict[str, Any]]]:
        """The answered exports of every batch due by `now`, oldest first (each as Label Studio exports it)."""
        due = [tasks for at, tasks in self._inbox if at <= now]
        self._inbox = [(at, tasks) for at, tasks in self._inbox if at > now]
        return [self.annotate(tasks) for tasks in due]

    def annotate(self, tasks: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The tasks as Label Studio exports them after annotation (tasks over budget stay unannotated)."""
        out: list[dict[str, Any]] = []
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        for number, task in enumerate(tasks, start=1):
            exported: dict[str, Any] = {
                "id": number,
                "data": dict(task["data"]),
                "meta": dict(task.get("meta", {})),
                "annotations": [],
            }
            exported["predictions"] = list(task.get("predictions", []))
            msg_id = task["data"]["msg_id"]
            if msg_id in self._truth and (self.budget is None or self.answered < self.budget):
                label = self._answer(self._truth[msg_id])
                exported["annotations"].append(
                    {
                        "id": number,
                        "completed_by": 1,
                        "result": [
                            {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}
                        ],
                        "was_cancelled": False,
                        "ground_truth": False,
                        "created_at": now,
                        "updated_at": now,
                        "lead_time": 2.5,
                        "task": number,
                    }
                )
                self.answered += 1
            out.append(exported)
        return out

    def _answer(self, truth: str) -> str:
        if self._rng.random() >= self.error_rate:
            return truth
        self.mistakes += 1
        others = [label for label in self.labels if label != truth]
        return str(others[int(self._rng.integers(len(others)))])

    def label_export(self, tasks_file: Path, out: Path) -> int:
        """Read an exported `label-studio.json`, write the annotated export to `out`; returns tasks answered."""
        before = self.answered
        tasks = json.loads(tasks_file.read_text(encoding="utf-8"))
        out.write_text(json.dumps(self.annotate(tasks)), encoding="utf-8")
        return self.answered - before
