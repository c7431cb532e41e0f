"""Human labels from Label Studio's JSON export, matched to archived samples by the ids our export wrote.

`cloud-bridge samples labels import FILE` reads the file Label Studio writes with Export → JSON (a list
of tasks: `data`, `meta`, `annotations[].result[].value.choices`, `was_cancelled`, `ground_truth`; see
labelstud.io/guide/export and /guide/task_format), or with Export → JSON-MIN (one flat object per
annotated task: the data fields, `label` holding the choice, `annotation_id`, `annotator`). Each task
carries the sample's `msg_id` in `data` (and `meta`), put there by cloud_bridge/samples/export.py.

* Validated as a whole before anything is written: a task without our msg_id, a msg_id the archive
  does not hold, more than one choice, or a label the sample's model does not have rejects the file
  (LabelImportError listing the first problems; nothing imported).
* Which annotation counts: cancelled ("skipped") ones never; one marked `ground_truth` first, else the
  most recently updated. A task without a usable annotation is counted as unlabeled and skipped.
* Idempotent: a file is keyed by its sha256 (the same file again changes nothing), and a label equal
  to the stored one is left alone; a changed label replaces it with `revision` + 1.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select, update

from cloud_bridge.errors import BridgeError
from cloud_bridge.registry import LabelImportRow, LabelRow, ModelRow, Registry, SampleRow

HUMAN = "human"
PSEUDO = "pseudo"
SOURCES = (HUMAN, PSEUDO)
MAX_LISTED = 10  # problems listed in one error message


class LabelImportError(BridgeError, ValueError):
    """A label file cannot be imported: the message lists what is wrong, where, and how to fix it."""

    exit_code = 2


@dataclass(frozen=True)
class ParsedLabel:
    msg_id: str
    label: str
    origin: str  # "label-studio task T annotation A by U"


@dataclass
class ImportStats:
    file_id: str
    tasks: int = 0
    labeled: int = 0
    unlabeled: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    already_imported: bool = False
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.already_imported:
            return f"file {self.file_id[:12]}… was imported before: nothing changed"
        return (
            f"{self.tasks} tasks: {self.labeled} labeled ({self.new} new, {self.changed} changed, "
            f"{self.unchanged} unchanged), {self.unlabeled} without a usable annotation"
        )


def read_export(path: Path) -> tuple[bytes, list[Any]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LabelImportError(f"cannot read {path}: {exc}") from None
    try:
        tasks = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LabelImportError(
            f"{path} is not JSON ({exc}): export the project from Label Studio with Export → JSON"
        ) from None
    if not isinstance(tasks, list):
        raise LabelImportError(
            f"{path} holds a JSON {type(tasks).__name__}, not a list of tasks: use Label Studio's JSON export"
        )
    return data, tasks


def _task_ref(index: int, task: Mapping[str, Any]) -> str:
    return f"task #{index}" + (f" (Label Studio id {task['id']})" if "id" in task else "")


def _msg_id(task: Mapping[str, Any]) -> str | None:
    for section in ("data", "meta"):
        part = task.get(section)
        if isinstance(part, Mapping) and isinstance(part.get("msg_id"), str):
            return str(part["msg_id"])
    return None


def _chosen_annotation(task: Mapping[str, Any]) -> Mapping[str, Any] | None:
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, Mapping) and not a.get("was_cancelled")]
    if not annotations:
        return None
    truth = [a for a in annotations if a.get("ground_truth")]
    if truth:
        return truth[-1]
    # ISO 8601 strings of one format sort by time; a missing one sorts first (list order breaks ties).
    return max(
        enumerate(annotations), key=lambda p: (str(p[1].get("updated_at") or p[1].get("created_at") or ""), p[0])
    )[1]


def _minimal_annotation(task: Mapping[str, Any], from_name: str) -> Mapping[str, Any] | None:
    """Export -> JSON-MIN flattens a task: data fields and `{from_name: "3"}` (or `{"choices": [...]}` for
    several) side by side, `annotation_id` and `annotator`; as a JSON annotation, or None if unlabeled."""
    value = task.get(from_name)
    if value is None:
        return None
    value = {"choices": [value]} if isinstance(value, str) else value
    return {
        "id": task.get("annotation_id", "?"),
        "completed_by": task.get("annotator"),
        "result": [{"type": "choices", "from_name": from_name, "value": value}],
    }


def _choices(annotation: Mapping[str, Any], from_name: str) -> list[str] | str:
    """The annotation's choices on the `from_name` control, or a problem description."""
    found: list[str] = []
    for result in annotation.get("result") or []:
        if not isinstance(result, Mapping) or result.get("type", "choices") != "choices":
            continue
        if result.get("from_name", from_name) != from_name:
            continue
        value = result.get("value")
        choices = value.get("choices") if isinstance(value, Mapping) else None
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            return "has a choices result without a list of strings in value.choices"
        found.extend(choices)
    return found


def parse_tasks(tasks: Sequence[Any], from_name: str = "label") -> tuple[list[ParsedLabel], int, list[str]]:
    """(labels, unlabeled tasks, problems) of a Label Studio JSON export; checks only its own shape."""
    labels: list[ParsedLabel] = []
    problems: list[str] = []
    unlabeled = 0
    seen: dict[str, str] = {}
    for index, task in enumerate(tasks):
        if not isinstance(task, Mapping):
            problems.append(f"task #{index} is a JSON {type(task).__name__}, not an object")
            continue
        where = _task_ref(index, task)
        minimal = "data" not in task and "annotations" not in task and isinstance(task.get("msg_id"), str)
        msg_id = str(task["msg_id"]) if minimal else _msg_id(task)
        if msg_id is None:
            problems.append(f"{where} has no data.msg_id: only tasks written by `cloud-bridge samples export` import")
            continue
        annotation = _minimal_annotation(task, from_name) if minimal else _chosen_annotation(task)
        if annotation is None:
            unlabeled += 1
            continue
        choices = _choices(annotation, from_name)
        if isinstance(choices, str):
            problems.append(f"{where} {choices}")
            continue
        if not choices:
            unlabeled += 1
            continue
        if len(set(choices)) != 1:
            problems.append(f"{where} has several choices {choices}: a sample takes one label")
            continue
        if msg_id in seen and seen[msg_id] != choices[0]:
            problems.append(f"{where}: sample {msg_id} appears twice with labels {seen[msg_id]!r} and {choices[0]!r}")
            continue
        seen[msg_id] = choices[0]
        origin = f"label-studio task {task.get('id', index)} annotation {annotation.get('id', '?')}"
        if annotation.get("completed_by") is not None:
            origin += f" by {annotation['completed_by']}"
        labels.append(ParsedLabel(msg_id, choices[0], origin[:256]))
    return labels, unlabeled, problems


async def _sample_models(registry: Registry, msg_ids: Iterable[str]) -> dict[str, str]:
    """msg_id -> the edge model name that answered it, for every id the archive holds."""
    ids = list(msg_ids)
    found: dict[str, str] = {}
    async with registry.engine.connect() as conn:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows = await conn.execute(select(SampleRow.msg_id, SampleRow.model_name).where(SampleRow.msg_id.in_(chunk)))
            found.update({r.msg_id: r.model_name for r in rows})
    return found


async def _model_labels(registry: Registry) -> dict[str, set[str]]:
    """Model name -> every label any registered version of it has."""
    out: dict[str, set[str]] = {}
    async with registry.engine.connect() as conn:
        for row in await conn.execute(select(ModelRow.name, ModelRow.labels)):
            out.setdefault(row.name, set()).update(row.labels)
    return out


async def validate(registry: Registry, labels: list[ParsedLabel], allowed: Sequence[str] | None) -> list[str]:
    """Problems of labels against the archive: unknown msg_ids, labels the sample's model lacks."""
    problems: list[str] = []
    models = await _sample_models(registry, (p.msg_id for p in labels))
    known = await _model_labels(registry) if allowed is None else {}
    for parsed in labels:
        model = models.get(parsed.msg_id)
        if model is None:
            problems.append(f"sample {parsed.msg_id} ({parsed.origin}) is not in the archive: wrong export file?")
            continue
        choices = set(allowed) if allowed is not None else known.get(model)
        if choices is None:
            problems.append(
                f"sample {parsed.msg_id}: model {model} is not registered, so its labels are unknown: "
                "register it (`cloud-bridge models add`) or pass --labels"
            )
        elif parsed.label not in choices:
            problems.append(
                f"sample {parsed.msg_id} ({parsed.origin}): label {parsed.label!r} is not one of {sorted(choices)}"
            )
    return problems


def _reject(path: Path, problems: list[str]) -> LabelImportError:
    listed = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return LabelImportError(f"{path}: {len(problems)} problem(s), nothing imported:\n  {listed}{more}")


async def import_labels(
    registry: Registry, path: Path, *, allowed: Sequence[str] | None = None, from_name: str = "label"
) -> ImportStats:
    """Validate the whole file, then write its labels in one transaction (see the module docstring)."""
    data, tasks = read_export(path)
    stats = ImportStats(file_id=hashlib.sha256(data).hexdigest(), tasks=len(tasks))
    async with registry.engine.connect() as conn:
        done = await conn.execute(select(LabelImportRow.id).where(LabelImportRow.id == stats.file_id))
        if done.scalar() is not None:
            stats.already_imported = True
            return stats
    labels, stats.unlabeled, problems = parse_tasks(tasks, from_name)
    problems += await validate(registry, labels, allowed)
    if problems:
        raise _reject(path, problems)
    stats.labeled = len(labels)
    now = time.time()
    async with registry.engine.begin() as conn:
        current = {
            r.msg_id: r
            for r in await conn.execute(
                select(LabelRow.msg_id, LabelRow.label, LabelRow.revision).where(
                    LabelRow.source == HUMAN, LabelRow.msg_id.in_([p.msg_id for p in labels])
                )
            )
        }
        fresh: list[dict[str, Any]] = []
        for parsed in labels:
            old = current.get(parsed.msg_id)
            if old is not None and old.label == parsed.label:
                stats.unchanged += 1
                continue
            values = {"label": parsed.label, "origin": parsed.origin, "import_id": stats.file_id, "updated_at": now}
            if old is None:
                stats.new += 1
                fresh.append({"msg_id": parsed.msg_id, "source": HUMAN, "revision": 1, "confidence": None, **values})
            else:
                stats.changed += 1
                await conn.execute(
                    update(LabelRow)
                    .where(LabelRow.msg_id == parsed.msg_id, LabelRow.source == HUMAN)
                    .values(revision=old.revision + 1, **values)
                )
        if fresh:
            await conn.execute(insert(LabelRow), fresh)  # one executemany, not a statement per label
        await conn.execute(
            insert(LabelImportRow).values(
                id=stats.file_id,
                path=str(path)[:1024],
                tasks=stats.tasks,
                labeled=stats.labeled,
                changed=stats.new + stats.changed,
                imported_at=now,
            )
        )
    return stats


async def label_counts(registry: Registry) -> dict[str, int]:
    """Labels stored per source."""
    async with registry.engine.connect() as conn:
        rows = await conn.execute(select(LabelRow.source, func.count()).group_by(LabelRow.source))
        return {str(source): int(n) for source, n in rows}
