"""Drive improvement loops: dataset -> train (+ INT8, register with lineage) -> gate -> canary rollout ->
promoted or rolled back.

Each `tick` claims every running loop's lease (cloud_bridge/improve/store.py) and runs the phase its row
records; a phase's outputs and the next phase are written in one conditional update, so a worker killed
mid-phase leaves the row at that phase and the next worker (after the lease runs out) redoes it:

* dataset: optional pseudo-labels from a teacher, then a dataset version `ds-{loop id}` (created once);
* train: the trainer program (cloud_bridge/improve/trainer.py) on the dataset's training split, INT8
  quantization (cloud_bridge/models/quantize.py), registration as `{base version}+r.{loop id}.int8`
  and its lineage (a registered candidate is reused, never trained again);
* gate: cloud_bridge/improve/gate.py; a failing candidate ends the loop `gate_failed` and is never
  rolled out;
* rollout: a rollout of the candidate (cloud_bridge/rollout; by default a shadow stage, then canary
  stages), driven by the bridges' rollout drivers like any other; one of this loop's version already
  there is adopted, not duplicated;
* watch: the rollout's end decides: promoted/done -> `promoted`, rolled back or aborted -> `rolled_back`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cloud_bridge.config.improve import ImproveConfig
from cloud_bridge.errors import BridgeError, ModelStoreError
from cloud_bridge.improve.escalation_value import EscalationValue, record_advice, value_on_holdout
from cloud_bridge.improve.gate import judge
from cloud_bridge.improve.store import FINAL_STATES, PHASES, LoopStore
from cloud_bridge.improve.trainer import DEFAULT_TRAINER, TrainJob, run_trainer
from cloud_bridge.models.lineage import Lineage, record_lineage
from cloud_bridge.models.quantize import EvalSet, QuantizeOptions, load_calibration, load_evaluation, quantize
from cloud_bridge.models.store import ModelRecord, ModelStore
from cloud_bridge.registry import Registry
from cloud_bridge.rollout.store import NewRollout, RolloutStore
from cloud_bridge.samples.datasets import Dataset, DatasetSpec, create_dataset, load_dataset
from cloud_bridge.samples.pseudo import pseudo_label
from cloud_bridge.tsdb import FieldValue, TsdbWriter, line

log = logging.getLogger(__name__)

# Every loop's options when neither the loop nor `[improve]` sets them: [improve]'s defaults, defined once
# in cloud_bridge/config/improve.py (its `hidden` = [32]: the demo edge model's 12 units cannot hold
# both orientations, demokit/retrain.py), plus what only a loop sets.
DEFAULT_OPTIONS: dict[str, Any] = {
    "trainer": list(DEFAULT_TRAINER),
    "seed": None,
    **ImproveConfig().loop_options(),
}
# Unsure holdout inputs needed to judge escalation on them alone (else the whole holdout).
_ADVICE_MIN_SAMPLES = 20
# Numeric codes for the TSDB fields (Grafana value mappings turn them back into names).
PHASE_CODES = {name: code for code, name in enumerate(PHASES, start=1)}
STATE_CODES = {name: code for code, name in enumerate(("running", *FINAL_STATES), start=1)}
_ROLLOUT_DONE = {"promoted": "promoted", "done": "promoted", "rolled_back": "rolled_back", "aborted": "rolled_back"}


def candidate_version(base_version: str, loop_id: str) -> str:
    """The float candidate's version; the INT8 build registered is this + `.int8`."""
    return f"{base_version.split('+', 1)[0]}+r.{loop_id[:8]}"


class ImproveDriver:
    def __init__(
        self,
        registry: Registry,
        models: ModelStore,
        work_dir: Path,
        owner: str,
        *,
        lease_s: float = 600.0,
        clock: Callable[[], float] = time.time,
        tsdb: TsdbWriter | None = None,
        cloud_model: Path | None = None,
    ) -> None:
        self.registry = registry
        self.cloud_model = cloud_model  # what escalations reach ([escalation] model): the gate asks if it helps
        self.store = LoopStore(registry)
        self.models = models
        self.rollouts = RolloutStore(registry)
        self.work_dir = work_dir
        self.owner = owner
        self.lease_s = lease_s
        self.clock = clock
        self.tsdb = tsdb
        self.errors = 0

    async def tick(self) -> None:
        for loop_id in await self.store.active():
            if not await self.store.claim(loop_id, self.owner, self.clock(), self.lease_s):
                continue
            try:
                await self.step(loop_id)
            except BridgeError as exc:
                self.errors += 1
                log.warning("improve loop %s failed: %s", loop_id, exc)
                await self._fail(loop_id, str(exc))
            except Exception as exc:
                self.errors += 1
                log.exception("improve loop %s: step failed; it fails with the error", loop_id)
                await self._fail(loop_id, f"{type(exc).__name__}: {exc}")

    async def run_until_settled(self, *, max_ticks: int = 100) -> None:
        """Tick until no loop is running or every running one is waiting for its rollout."""
        for _ in range(max_ticks):
            await self.tick()
            loops = [await self.store.get(i) for i in await self.store.active()]
            if all(loop is None or loop["phase"] == "watch" for loop in loops):
                return

    async def _fail(self, loop_id: str, reason: str) -> None:
        loop = await self.store.get(loop_id)
        if loop is not None:
            await self._advance(loop, "failed", state="failed", reason=reason[:4096])

    async def step(self, loop_id: str) -> None:
        loop = await self.store.get(loop_id)
        if loop is None or loop["state"] != "running":
            return
        opts = {**DEFAULT_OPTIONS, **loop["options"]}
        phase = loop["phase"]
        log.info("improve loop %s: phase %s", loop_id, phase)
        if phase == "dataset":
            await self._dataset(loop, opts)
        elif phase == "train":
            await self._train(loop, opts)
        elif phase == "gate":
            await self._gate(loop, opts)
        elif phase == "rollout":
            await self._rollout(loop, opts)
        elif phase == "watch":
            await self._watch(loop)
        else:
            raise BridgeError(f"loop {loop_id} is in unknown phase {phase!r} (known: {', '.join(PHASES)})")

    async def _advance(self, loop: dict[str, Any], event: str, **values: Any) -> None:
        now = self.clock()
        if await self.store.advance(loop["id"], self.owner, event, now, **values) and self.tsdb is not None:
            self.tsdb.add([loop_line({**loop, **values}, now)])

    # -- phases --
    async def _dataset(self, loop: dict[str, Any], opts: dict[str, Any]) -> None:
        devices = list(loop["devices"])
        pseudo = 0
        if opts["teacher"]:
            name, _, version = str(opts["teacher"]).partition("@")
            teacher = await self.models.get(name, version)
            stats = await pseudo_label(
                self.registry,
                teacher.path,
                str(opts["teacher"]),
                min_confidence=float(opts["min_confidence"]),
                fleet=loop["fleet_id"],
                devices=devices,
            )
            pseudo = stats.labeled
        spec = DatasetSpec(
            fleet=loop["fleet_id"],
            devices=tuple(devices),
            holdout_fraction=float(opts["holdout"]),
            include_pseudo=bool(opts["teacher"]),
            min_human=int(opts["min_human"]),
        )
        dataset_id = await create_dataset(self.registry, spec, f"ds-{loop['id'][:8]}")
        await self._advance(
            loop, f"dataset {dataset_id} ({pseudo} pseudo-labels made)", phase="train", dataset_id=dataset_id
        )

    async def _train(self, loop: dict[str, Any], opts: dict[str, Any]) -> None:
        base = await self.models.get(loop["base_name"], loop["base_version"])
        version = candidate_version(loop["base_version"], loop["id"])
        int8 = f"{version}.int8"
        try:
            existing: ModelRecord | None = await self.models.get(loop["base_name"], int8)
        except ModelStoreError:
            existing = None  # not trained yet (a candidate registered before a crash is reused)
        if existing is None:
            dataset = await load_dataset(self.registry, loop["dataset_id"])
            job = TrainJob(
                directory=self.work_dir / loop["id"],
                name=loop["base_name"],
                version=version,
                base_model=base.path,
                base_data=str(opts["base_data"]),
                seed=opts["seed"],
                oversample=int(opts["oversample"]),
                hidden=tuple(int(h) for h in opts["hidden"]) if opts["hidden"] else None,
            )
            trained = await run_trainer(job, dataset, tuple(opts["trainer"]))
            out = job.directory / "model.int8.onnx"
            calibration = await asyncio.to_thread(_calibration_dir, job.directory, dataset, str(opts["calibration"]))
            result = await asyncio.to_thread(
                quantize,
                QuantizeOptions(
                    source=trained.model,
                    out=out,
                    calibration=str(calibration),
                    evaluation=str(opts["original_eval"]),
                    version=int8,
                ),
            )
            existing = await self.models.add(out, loop["base_name"], int8)
            metrics = {
                **trained.metrics,
                "float_accuracy": result.float_model.accuracy,
                "int8_accuracy": result.int8_model.accuracy,
                "int8_size": result.int8_model.size_bytes,
            }
            await record_lineage(
                self.registry,
                Lineage(loop["base_name"], int8, base.name, base.version, loop["dataset_id"], trained.trainer, metrics),
            )
        await self._advance(loop, f"trained {loop['base_name']} {int8}", phase="gate", candidate_version=int8)

    async def _gate(self, loop: dict[str, Any], opts: dict[str, Any]) -> None:
        base = await self.models.get(loop["base_name"], loop["base_version"])
        candidate = await self.models.get(loop["base_name"], loop["candidate_version"])
        dataset = await load_dataset(self.registry, loop["dataset_id"])
        holdout = _holdout(dataset, base)
        original = await asyncio.to_thread(load_evaluation, str(opts["original_eval"]), int(base.input_shape[-1]))
        result = await asyncio.to_thread(
            judge,
            base.path,
            candidate.path,
            holdout,
            original,
            min_gain=float(opts["min_gain"]),
            max_loss=float(opts["max_loss"]),
        )
        if result.passed:
            gate = result.as_json()
            advice = await self._escalation_advice(loop, opts, candidate, holdout, base)
            if advice is not None:
                gate["escalation"] = advice
            await self._advance(loop, f"gate passed: {result.reason}", phase="rollout", gate=gate)
        else:
            await self._advance(
                loop, "gate failed", state="gate_failed", gate=result.as_json(), reason=f"gate: {result.reason}"
            )

    async def _escalation_advice(
        self, loop: dict[str, Any], opts: dict[str, Any], candidate: ModelRecord, holdout: EvalSet, base: ModelRecord
    ) -> dict[str, Any] | None:
        """Does escalating help the candidate where it is unsure? Judged on the gate's holdout against the
        cloud model; where it does not, the cohort's devices are told to pause escalations on the
        candidate's version (escalation_value.py), so a recovered device stops paying for worse answers.
        Recorded in the gate's JSON, shown by `improve status`."""
        pause_s = float(opts["escalation_pause_s"])
        if self.cloud_model is None or pause_s <= 0 or len(holdout.y) == 0:
            return None
        labels = [base.labels[int(i)] for i in holdout.y]
        n, edge_acc, cloud_acc, verdict, where = await asyncio.to_thread(
            value_on_holdout,
            candidate.path,
            self.cloud_model,
            holdout.x,
            labels,
            below=float(opts["escalate_below"]),
            min_samples=_ADVICE_MIN_SAMPLES,
            min_gain=0.0,
        )
        values = [
            EscalationValue(loop["fleet_id"], device, candidate.version, n, edge_acc, cloud_acc, verdict)
            for device in loop["devices"]
        ]
        paused = await record_advice(self.registry, values, pause_s)
        log.info(
            "improve loop %s: escalation on %s holdout (%d): candidate %.3f, cloud %.3f -> %s; %d device(s) paused",
            loop["id"],
            where,
            n,
            edge_acc,
            cloud_acc,
            verdict,
            paused,
        )
        return {
            "slice": where,
            "labeled": n,
            "edge_accuracy": round(edge_acc, 4),
            "cloud_accuracy": round(cloud_acc, 4),
            "verdict": verdict,
            "pause_s": pause_s if verdict == "does_not_help" else None,
        }

    async def _rollout(self, loop: dict[str, Any], opts: dict[str, Any]) -> None:
        candidate = await self.models.get(loop["base_name"], loop["candidate_version"])
        adopted = [
            r
            for r in await self.rollouts.all()
            if r["fleet_id"] == loop["fleet_id"]
            and (r["model_name"], r["model_version"]) == (candidate.name, candidate.version)
            and r["created_at"] >= loop["created_at"]
        ]
        if adopted:
            rollout_id = adopted[-1]["id"]
        else:
            rollout_id = await self.rollouts.create(
                NewRollout(
                    fleet_id=loop["fleet_id"],
                    model=candidate,
                    stages=tuple(int(s) for s in opts["stages"]),
                    window_s=float(opts["window_s"]),
                    thresholds=dict(opts["thresholds"]),
                    control=str(opts["rollout_control"]),
                ),
                now=self.clock(),
            )
        await self._advance(loop, f"rollout {rollout_id} started", phase="watch", rollout_id=rollout_id)

    async def _watch(self, loop: dict[str, Any]) -> None:
        rollout = await self.rollouts.get(loop["rollout_id"])
        if rollout is None:
            raise BridgeError(f"rollout {loop['rollout_id']} of loop {loop['id']} is gone from the registry")
        outcome = _ROLLOUT_DONE.get(rollout["state"])
        if outcome is not None:
            reason = rollout["reason"] or f"rollout {rollout['state']}"
            await self._advance(loop, f"rollout {rollout['state']}", state=outcome, reason=reason)


def loop_line(loop: dict[str, Any], now: float) -> str:
    """One `improve_loop` point: phase and state codes, and the gate's numbers once it ran."""
    tags = {"fleet": loop["fleet_id"], "loop": loop["id"], "model": loop["base_name"], "base": loop["base_version"]}
    fields: dict[str, FieldValue] = {"phase": PHASE_CODES[loop["phase"]], "state": STATE_CODES[loop["state"]]}
    gate = loop.get("gate")
    if gate:
        for key in ("drifted_current", "drifted_candidate", "original_current", "original_candidate"):
            fields[key] = float(gate[key])
        fields["gate_passed"] = bool(gate["passed"])
    return line("improve_loop", tags, fields, round(now * 1000))


def _holdout(dataset: Dataset, model: ModelRecord) -> EvalSet:
    index = {label: i for i, label in enumerate(model.labels)}
    keep = [i for i, label in enumerate(dataset.y_holdout) if label in index]
    x = dataset.x_holdout[keep] if keep else np.zeros((0, int(model.input_shape[-1])), dtype=np.float32)
    y = np.asarray([index[dataset.y_holdout[i]] for i in keep], dtype=np.int64)
    return EvalSet(x=np.asarray(x, dtype=np.float32), y=y, source=f"dataset:{dataset.id}:holdout")


def _calibration_dir(job_dir: Path, dataset: Dataset, base: str) -> Path:
    """Calibration inputs for INT8: the base data (as quantize reads it) and the field samples trained
    on, so activation ranges cover the drifted inputs too."""
    directory = job_dir / "calibration"
    directory.mkdir(parents=True, exist_ok=True)
    features = int(dataset.x_train.shape[1]) if dataset.x_train.size else 0
    if features:
        np.save(directory / "field.npy", dataset.x_train.astype(np.float32))
        base_x, _ = load_calibration(base, features)
        np.save(directory / "base.npy", base_x)
    return directory
