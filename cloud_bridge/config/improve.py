"""[improve]: the improvement loop's options and its automatic policy (cloud_bridge/improve).

The loop options here are every loop's defaults: `cloud-bridge improve start` takes them unless a flag
overrides one, and the automatic policy starts its loops with them. The policy (`auto = true`): on each
pass, a loop for every model version of a watched fleet whose devices have a firing data-drift alert and
at least `min_human` human labels on their samples, unless one of that model is running or one of that
base version ended less than `cooldown_s` ago (cloud_bridge/improve/policy.py). Who runs the passes:
`cloud-bridge improve run` (a worker process of its own, the default), or with `in_bridge = true` the
bridge itself, for a small fleet whose bridge has a core to spare for training and quantization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from cloud_bridge.errors import UsageError
from cloud_bridge.rollout.policy import parse_thresholds
from cloud_bridge.rollout.stages import parse_stages
from schemas.errors import TopicError
from schemas.topics import validate_id


@dataclass(frozen=True)
class ImproveConfig:
    # -- the automatic policy and where it runs --
    auto: bool = False  # start loops by themselves (drift alert + enough human labels); else `improve start`
    in_bridge: bool = False  # the bridge drives loops itself; false: run `cloud-bridge improve run`
    fleets: tuple[str, ...] = ()  # fleets `auto` watches; empty: every fleet with a firing drift alert
    min_human: int = 50  # human labels on the drifted devices' samples before a loop starts
    cooldown_s: float = 3600.0  # after a loop of a base version ended, before another starts for it
    tick_s: float = 5.0  # seconds between the worker's passes
    # A worker that stops renewing a loop's lease for this long hands the loop to another worker; it
    # must outlast the longest phase (training), which renews nothing while it runs.
    lease_s: float = 600.0
    # -- every loop's options (`improve start` flags override them per loop) --
    holdout: float = 0.3  # share of human labels kept for the gate, never trained on
    teacher: str = ""  # NAME@VERSION of a registered model that pseudo-labels the rest; "": none
    min_confidence: float = 0.95  # of the teacher's answers kept as pseudo-labels
    min_gain: float = 0.02  # accuracy the candidate must gain on the drifted holdout (absolute)
    max_loss: float = 0.005  # accuracy it may lose on the original test set
    # The candidate's rollout: a shadow stage first (it runs beside the active model, switching nothing),
    # then canary stages (cloud_bridge/rollout/stages.py `parse_stages`).
    stages: str = "shadow:100,25,100"
    window_s: float = 600.0  # each rollout stage's watch window
    # The loop's rollouts' threshold overrides, as `rollout start --thresholds` takes them, e.g.
    # ["max_agreement_drop=0.2", "shadow:min_shadow_inputs=500"]; the rest are [rollout]'s.
    thresholds: tuple[str, ...] = ()
    trainer: str = ""  # the trainer command; "": python -m demokit.retrain (cloud_bridge/improve/trainer.py)
    hidden: tuple[int, ...] = (32,)  # hidden layers of the retrained model; []: the base model's
    oversample: int = 2  # times the field samples are repeated beside the base training data
    base_data: str = "digits"  # the trainer's name for the base model's training data
    original_eval: str = "digits"  # the original test set the gate checks (`digits` or an .npz)
    calibration: str = "digits"  # INT8 calibration inputs beside the field samples
    # Escalation advice for the candidate, from the gate's holdout (cloud_bridge/improve/
    # escalation_value.py): where the cloud model is not better than the candidate on the inputs the
    # candidate is unsure of (top-1 under `escalate_below`, the edge's default threshold), the cohort's
    # devices are told to pause escalations for `escalation_pause_s` on that version; 0: no advice.
    escalation_pause_s: float = 600.0
    escalate_below: float = 0.8
    # What the loop's rollout judges each canary device against: "devices", its own windows before it
    # switched (the candidate is made for the drifted cohort, which stays less sure than clean devices
    # even once recovered); "fleet", every device on another model (cloud_bridge/rollout/store.py).
    rollout_control: Literal["devices", "fleet"] = "devices"

    def validate(self) -> None:
        for name in ("min_human", "oversample"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be at least 1")
        for name in ("tick_s", "window_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be greater than 0")
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown_s = {self.cooldown_s} must be >= 0")
        if self.lease_s <= 2 * self.tick_s:
            raise ValueError(
                f"lease_s = {self.lease_s} must exceed 2 x tick_s ({self.tick_s}): a worker renews leases every pass"
            )
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout = {self.holdout} must be between 0 and 1 (exclusive)")
        for name in ("min_confidence", "max_loss"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} = {getattr(self, name)} must be between 0 and 1")
        if not 0.0 <= self.escalation_pause_s <= 86400:
            raise ValueError(
                f"escalation_pause_s = {self.escalation_pause_s} must be 0 (no advice) to 86400 "
                "(what escalate_reply/1 allows)"
            )
        if not 0.0 < self.escalate_below <= 1.0:
            raise ValueError(f"escalate_below = {self.escalate_below} must be a probability above 0, at most 1")
        if not -1.0 <= self.min_gain <= 1.0:
            raise ValueError(f"min_gain = {self.min_gain} must be between -1 and 1 (an accuracy difference)")
        if self.teacher and not all(self.teacher.partition("@")[::2]):
            raise ValueError(f"teacher = {self.teacher!r} must be NAME@VERSION, e.g. digits-cloud@1.0.0, or empty")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden = {list(self.hidden)} must list layer sizes of at least 1 ([] keeps the base's)")
        try:
            parse_stages(self.stages)
        except UsageError as exc:
            rest = str(exc).removeprefix(f"--stages {self.stages!r}")  # the flag's message, said of the key
            raise ValueError(f"stages = {self.stages!r}{rest}") from None
        for fleet in self.fleets:
            try:
                validate_id("fleets", fleet)
            except TopicError as exc:
                raise ValueError(str(exc)) from None
        try:
            parse_thresholds(self.thresholds)
        except UsageError as exc:
            raise ValueError(f"thresholds = {list(self.thresholds)}: {exc}") from None
        if self.trainer and not self.trainer.split():
            raise ValueError("trainer = ' ' must be a command, or empty for the built-in trainer")

    def loop_options(self) -> dict[str, Any]:
        """The options a loop records (cloud_bridge/improve/driver.py reads them); without `trainer` when
        the built-in one is meant, so a loop's row says only what was chosen."""
        options: dict[str, Any] = {
            "min_human": self.min_human,
            "holdout": self.holdout,
            "teacher": self.teacher or None,
            "min_confidence": self.min_confidence,
            "min_gain": self.min_gain,
            "max_loss": self.max_loss,
            "base_data": self.base_data,
            "original_eval": self.original_eval,
            "calibration": self.calibration,
            "stages": list(parse_stages(self.stages)),
            "window_s": self.window_s,
            "thresholds": parse_thresholds(self.thresholds),
            "oversample": self.oversample,
            "hidden": list(self.hidden),
            "escalation_pause_s": self.escalation_pause_s,
            "escalate_below": self.escalate_below,
            "rollout_control": self.rollout_control,
        }
        if self.trainer:
            options["trainer"] = self.trainer.split()
        return options
