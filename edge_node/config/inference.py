"""[model], [routing] and [sampling]: what runs, and what happens to each answer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelConfig:
    path: Path = Path("model.onnx")
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = 1
    max_batch: int = 256

    def validate(self) -> None:
        if not self.path.exists():
            raise ValueError(
                f"path {self.path} does not exist: build the demo models with "
                "`python -m demokit.models --out build/models` or point it at your .onnx file"
            )
        if not self.providers:
            raise ValueError("providers must list at least one execution provider")
        if self.intra_op_threads < 1:
            raise ValueError("intra_op_threads must be at least 1")
        if not 1 <= self.max_batch <= 4096:
            raise ValueError("max_batch must be 1-4096")


@dataclass(frozen=True)
class RoutingConfig:
    confidence_threshold: float = 0.8
    escalation_timeout_s: float = 2.0
    max_outstanding: int = 64
    # Each escalation costs ~0.5 KB on the link (the input up, the answer down); a drifting device
    # is unsure of a third of its inputs, so without a budget it would escalate all day.
    max_escalations_per_minute: float = 4.0
    escalate: bool = True
    publish_results: bool = True

    def validate(self) -> None:
        if not 0.0 < self.confidence_threshold <= 1.0:
            raise ValueError("confidence_threshold must be in (0, 1]")
        if self.escalation_timeout_s <= 0:
            raise ValueError("escalation_timeout_s must be > 0")
        if self.max_outstanding < 1:
            raise ValueError("max_outstanding must be at least 1")
        if self.max_escalations_per_minute < 0:
            raise ValueError("max_escalations_per_minute must be >= 0 (0: unsure answers stay local)")


@dataclass(frozen=True)
class SamplingConfig:
    entropy_threshold: float = 1.0
    margin_threshold: float = 0.2
    # 4,320 a device a day: more than a labeling team reads, ~1.4 MB a day on the link.
    max_per_minute: int = 3
    top_k: int = 3

    def validate(self) -> None:
        if self.entropy_threshold < 0:
            raise ValueError("entropy_threshold must be >= 0")
        if not 0 <= self.margin_threshold <= 1:
            raise ValueError("margin_threshold must be in [0, 1]")
        if self.max_per_minute < 0:
            raise ValueError("max_per_minute must be >= 0 (0 disables sampling)")
        if self.top_k < 1:
            raise ValueError("top_k must be at least 1")
