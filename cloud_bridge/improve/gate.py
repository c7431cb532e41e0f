"""The evaluation gate: a candidate replaces the current model only if it is better where the field
drifted and not much worse where it did not.

* drifted: accuracy on the dataset version's holdout slice (human labels only, never trained on) must
  beat the current model's by at least `min_gain` (absolute points, e.g. 0.02);
* original: accuracy on the original test set may drop by at most `max_loss` (e.g. 0.005).

Both accuracies of both models, the limits and the verdict are recorded in the loop's row (`gate`)
and shown by `cloud-bridge improve status`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cloud_bridge.models.quantize import EvalSet, predict


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str
    drifted_current: float
    drifted_candidate: float
    original_current: float
    original_candidate: float
    min_gain: float
    max_loss: float
    holdout_size: int
    original_source: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def accuracy(path: Path, x: NDArray[np.float32], y: NDArray[np.int64]) -> float:
    return float(np.mean(predict(path, np.ascontiguousarray(x, dtype=np.float32)) == y)) if len(y) else 0.0


def judge(
    current: Path,
    candidate: Path,
    holdout: EvalSet,
    original: EvalSet,
    *,
    min_gain: float,
    max_loss: float,
) -> GateResult:
    dc, dn = accuracy(current, holdout.x, holdout.y), accuracy(candidate, holdout.x, holdout.y)
    oc, on = accuracy(current, original.x, original.y), accuracy(candidate, original.x, original.y)
    problems = []
    if len(holdout.y) == 0:
        problems.append("the holdout slice is empty: import more human labels")
    elif dn - dc < min_gain:
        problems.append(f"drifted holdout {dn:.4f} vs current {dc:.4f}: gain {dn - dc:+.4f} < {min_gain}")
    if oc - on > max_loss:
        problems.append(f"original test {on:.4f} vs current {oc:.4f}: loss {oc - on:.4f} > {max_loss}")
    reason = "; ".join(problems) or (
        f"drifted holdout {dc:.4f} -> {dn:.4f} (gain >= {min_gain}), original test {oc:.4f} -> {on:.4f} "
        f"(loss <= {max_loss})"
    )
    return GateResult(
        passed=not problems,
        reason=reason,
        drifted_current=dc,
        drifted_candidate=dn,
        original_current=oc,
        original_candidate=on,
        min_gain=min_gain,
        max_loss=max_loss,
        holdout_size=len(holdout.y),
        original_source=original.source,
    )
