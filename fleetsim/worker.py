"""A simulator worker process: reads its `Spec` as one JSON line on stdin, prints `{"ready": ...}`
once its devices are subscribed and online, then one JSON report line every `report_s` (see
`report`), and runs until a second line ("stop") arrives on stdin; then it publishes every device's
offline status, waits for the broker's acknowledgements and up to `drain_s` for the bridge's last
confirmations, and prints its final report (`"final": true`).

Errors it can name (the broker refused, no bridge answered) are one JSON line `{"error": ...}` and
exit status 2."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

from fleetsim.mqtt5 import LinkError
from fleetsim.options import OptionsError, Spec
from fleetsim.sim import Simulator


def report(sim: Simulator, final: bool) -> None:
    c = sim.counts
    oldest = sim.oldest_unconfirmed()
    refused: dict[str, int] = {}
    for link in sim.links:
        for (kind, code), n in link.refused.items():
            refused[f"{kind} 0x{code:02x}"] = refused.get(f"{kind} 0x{code:02x}", 0) + n
    line: dict[str, Any] = {
        "t": time.time(),
        "final": final,
        "devices": len(sim.devices),
        "sent": dict(c.sent),
        "acked": sum(k.acked for k in sim.links),
        "answers": c.answers,
        "refused": refused,
        "in_flight": sum(len(k.inflight) + len(k.queued) for k in sim.links),
        "escalations": c.escalations,
        "answered": c.answered,
        "timed_out": c.timed_out,
        "late_replies": c.late_replies,
        "outstanding": len(sim.outstanding),
        "commands": c.commands,
        "errors": c.errors,
        "confirmed": c.confirmed,
        "unconfirmed": sim.unconfirmed(),
        "oldest_unconfirmed_s": 0.0 if oldest is None else round(time.time() - oldest, 3),
        "confirm_age_max_s": round(c.confirm_age_max_s, 3),
        "latencies_ms": [round(v, 2) for v in c.latencies_ms],
        "late_s": round(c.late_s, 3),
        "cpu_s": round(time.process_time(), 4),
        "sys_s": round(os.times().system, 4),
    }
    c.latencies_ms = []
    c.late_s = 0.0
    c.confirm_age_max_s = 0.0
    print(json.dumps(line), flush=True)


def main() -> int:
    spec = Spec.from_json(sys.stdin.readline())
    try:
        sim = Simulator(spec)
        sim.start()
    except (LinkError, OptionsError) as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 2
    print(json.dumps({"ready": True, "devices": len(sim.devices)}), flush=True)
    stop = threading.Event()

    def wait_for_stop() -> None:
        sys.stdin.readline()
        stop.set()

    threading.Thread(target=wait_for_stop, daemon=True).start()
    try:
        sim.run(stop, lambda final: report(sim, final), spec.report_s)
        sim.stop(spec.drain_s, lambda final: report(sim, final))
    except LinkError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 2
    report(sim, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
