"""The edge node's memory and start time: a real `edge-node` process, measured from outside.

A private Mosquitto and a real `cloud-bridge` (the demo cloud model answers escalations, and its
confirmations empty the node's outbox, as in the field) run for the whole bench. Then, for each
source, a real `edge-node run` process with the demo edge model:

* `mqtt`: this script publishes `input/1` messages (the digits held-out inputs, cycled) at
  `--rate` Hz (20) to the device's input topic, from before the node starts;
* `replay`: the node replays the digits itself at the same rate (it loads the demo kit for that).

Measured per source:

* time from exec (just before `Popen`) to the first `result/2` message a subscriber of the device's
  results topic receives: the median of `--starts` starts (each with a fresh outbox), with the
  defaults (a node's first answers leave at once; later ones wait up to `results_max_delay_s`);
* resident memory after `--seconds` (60) of running at the rate: VmRSS and VmHWM from
  /proc/PID/status, and smaps_rollup's split into anonymous memory (heap, arenas, Python objects)
  and file-backed pages (shared libraries, the model file, mapped SQLite pages);
* as a floor, the same figures of a process that only imports the node and loads the model.

The last line is the headline: the mqtt-source node's RSS over the 100 MB target (`ratio X
rss/100MB-target`, at most 1.00 meets it; MB = 10^6 bytes).

`--baseline DIR` measures another checkout's nodes in the same run (rows "SOURCE (baseline)") and
prints baseline/this RSS and both start times.

Run: `.venv/bin/python bench/footprint.py` (about 3 minutes; `--seconds 10 --starts 2` for a smoke
run). Each node runs this checkout's code (PYTHONPATH is set to it), whatever an editable install
points at.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from demokit.models import build_demo_models, load_split
from devservers import ManagedProcess, Mosquitto
from devservers.programs import ROOT, start_program, write_bridge_config
from schemas import Input, encode, encode_tensor, new_msg_id

FLEET = "bench"
TARGET_BYTES = 100_000_000
MIB = 1 << 20
SOURCES = ("mqtt", "replay")
ROLLUP_KEYS = ("Rss", "Anonymous", "Pss_Anon", "Pss_File")

_FLOOR = """
import sys
from pathlib import Path
import edge_node.app, edge_node.cli
from edge_node.inference.model import Classifier
Classifier.load(Path(sys.argv[1]))
print(open("/proc/self/status").read())
print("--rollup--")
print(open("/proc/self/smaps_rollup").read())
"""


# ---- /proc ---------------------------------------------------------------------------------------
def _kb_fields(text: str) -> dict[str, int]:
    """`Name:   123 kB` lines as bytes."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            found[name.strip()] = int(parts[0]) * 1024
    return found


@dataclass(frozen=True)
class Memory:
    rss: int
    hwm: int
    rollup: dict[str, int]

    @classmethod
    def of_pid(cls, pid: int) -> Memory:
        return cls.parse(Path(f"/proc/{pid}/status").read_text(), Path(f"/proc/{pid}/smaps_rollup").read_text())

    @classmethod
    def parse(cls, status: str, rollup: str) -> Memory:
        fields = _kb_fields(status)
        return cls(fields["VmRSS"], fields["VmHWM"], _kb_fields(rollup))

    @property
    def anonymous(self) -> int:
        return self.rollup.get("Anonymous", 0)

    @property
    def file_backed(self) -> int:
        return self.rollup.get("Rss", self.rss) - self.anonymous


# ---- the broker side -----------------------------------------------------------------------------
class Watcher:
    """A subscriber to every device's results topic: when each device's first result arrived."""

    def __init__(self, port: int) -> None:
        self.first: dict[str, float] = {}
        self.messages: dict[str, int] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="footprint-watcher")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"fleet/{FLEET}/+/results", qos=0)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the results watcher was not subscribed within 10 s")

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        device = message.topic.split("/")[2]
        with self._lock:
            self.first.setdefault(device, now)
            self.messages[device] = self.messages.get(device, 0) + 1

    def wait_first(self, device: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if device in self.first:
                    return self.first[device]
            time.sleep(0.002)
        raise RuntimeError(f"no result from {device} within {timeout} s")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Feeder:
    """Publishes input/1 messages at `rate_hz` to one device's input topic until stopped."""

    def __init__(self, port: int, device: str, rate_hz: float, inputs: np.ndarray) -> None:
        self.topic = f"fleet/{FLEET}/{device}/input"
        self.device = device
        self.rate_hz = rate_hz
        self.inputs = inputs
        self.sent = 0
        self._stop = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"footprint-feeder-{device}")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        start = time.monotonic()
        while not self._stop.is_set():
            x = self.inputs[self.sent % len(self.inputs)]
            payload = encode(
                Input(
                    msg_id=new_msg_id(),
                    fleet_id=FLEET,
                    device_id=self.device,
                    ts=time.time(),
                    input_id=f"in-{self.sent}",
                    tensor=encode_tensor(x),
                )
            )
            self.client.publish(self.topic, payload, qos=1)
            self.sent += 1
            self._stop.wait(max(0.0, start + self.sent * period - time.monotonic()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.client.loop_stop()
        self.client.disconnect()


# ---- processes -----------------------------------------------------------------------------------


def _wait_log(path: Path, text: str, proc: ManagedProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if not proc.alive:
            raise RuntimeError(f"process exited ({proc.returncode}) before logging {text!r}; see {path}")
        time.sleep(0.05)
    raise RuntimeError(f"no {text!r} in {path} within {timeout} s")


def _edge_toml(work: Path, device: str, port: int, model: Path, source: str, rate_hz: float) -> Path:
    body = f'kind = "replay"\nrate_hz = {rate_hz}\nloop = true\n' if source == "replay" else 'kind = "mqtt"\n'
    path = work / f"{device}.toml"
    path.write_text(
        f"""
[mqtt]
port = {port}
[device]
fleet_id = "{FLEET}"
device_id = "{device}"
[model]
path = "{model}"
[outbox]
path = "{work / device / "outbox.sqlite"}"
[source]
{body}"""
    )
    return path


@dataclass
class Row:
    name: str
    starts_s: list[float] = field(default_factory=list)
    memory: Memory | None = None
    early: Memory | None = None  # a few seconds in: whether memory grows while running
    results: int = 0

    @property
    def start_s(self) -> float:
        return statistics.median(self.starts_s) if self.starts_s else float("nan")


@dataclass
class Bench:
    work: Path
    port: int
    model: Path
    watcher: Watcher
    inputs: np.ndarray
    rate_hz: float
    runs: int = 0

    def node(self, source: str, seconds: float, root: Path = ROOT) -> tuple[float, Memory | None, Memory | None, int]:
        """One node from exec: seconds to its first published result, and (when `seconds` > 0) its
        memory a few seconds in and after `seconds`, and the results messages it published."""
        self.runs += 1
        device = f"{source}-{self.runs}"
        config = _edge_toml(self.work, device, self.port, self.model, source, self.rate_hz)
        feeder = Feeder(self.port, device, self.rate_hz, self.inputs) if source == "mqtt" else None
        args = ["run", "--config", str(config)]
        log = self.work / f"{device}.log"
        try:
            exec_at = time.monotonic()
            proc = start_program("edge_node.cli", args, log, root=root)
            try:
                first = self.watcher.wait_first(device, 60) - exec_at
                early = memory = None
                if seconds > 0:
                    early_at = min(10.0, seconds / 2)
                    time.sleep(max(0.0, exec_at + early_at - time.monotonic()))
                    early = Memory.of_pid(proc.pid or 0)
                    time.sleep(max(0.0, exec_at + seconds - time.monotonic()))
                    if not proc.alive:
                        raise RuntimeError(f"edge node exited early ({proc.returncode}); see {log}")
                    memory = Memory.of_pid(proc.pid or 0)
            finally:
                if feeder is not None:  # first: an older node (a --baseline) does not stop while inputs flow
                    feeder.close()
                    feeder = None
                proc.terminate(30)
        finally:
            if feeder is not None:
                feeder.close()
        return first, early, memory, self.watcher.messages.get(device, 0)

    def row(self, source: str, seconds: float, starts: int, root: Path = ROOT, name: str = "") -> Row:
        row = Row(name or source)
        first, row.early, row.memory, row.results = self.node(source, seconds, root)
        row.starts_s.append(first)
        for _ in range(starts - 1):
            row.starts_s.append(self.node(source, 0, root)[0])
        return row


def floor_row(model: Path) -> Row:
    """A process that imports the node and loads the model, nothing else."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", _FLOOR, str(model)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    status, _, rollup = done.stdout.partition("--rollup--")
    return Row("imports + model", memory=Memory.parse(status, rollup))


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:.1f}"


def report(rows: list[Row], seconds: float, rate_hz: float, starts: int) -> str:
    head = (
        f"{'process':<16} {'first result s':>14} {'(min..max)':>13} {'RSS MiB':>8} {'@early':>7} {'HWM MiB':>8}"
        f" {'anon MiB':>9} {'file MiB':>9} {'results/s':>10}"
    )
    lines = [
        f"edge node footprint: demo edge model, {rate_hz:g} Hz, memory after {seconds:g} s, "
        f"first result = median of {starts} start(s) from exec",
        "",
        head,
        "-" * len(head),
    ]
    for r in rows:
        m = r.memory
        spread = f"{min(r.starts_s):.2f}..{max(r.starts_s):.2f}" if r.starts_s else "-"
        lines.append(
            f"{r.name:<16} {r.start_s:>14.2f} {spread:>13} {_mib(m.rss if m else None):>8}"
            f" {_mib(r.early.rss if r.early else None):>7} {_mib(m.hwm if m else None):>8}"
            f" {_mib(m.anonymous if m else None):>9} {_mib(m.file_backed if m else None):>9}"
            f" {r.results / seconds if r.starts_s else float('nan'):>10.1f}"
        )
    by = {r.name: r for r in rows}
    mqtt_row, floor = by["mqtt"], by["imports + model"]
    assert mqtt_row.memory is not None and floor.memory is not None
    lines += [""]
    for r in rows:
        old = by.get(f"{r.name} (baseline)")
        if old is not None and old.memory is not None and r.memory is not None:
            lines.append(
                f"{r.name}: baseline/this RSS {old.memory.rss / r.memory.rss:.2f}"
                f" ({_mib(old.memory.rss)} -> {_mib(r.memory.rss)} MiB),"
                f" first result {old.start_s:.2f} -> {r.start_s:.2f} s"
            )
    lines += [
        f"mqtt source beyond imports + model: {_mib(mqtt_row.memory.rss - floor.memory.rss)} MiB",
        "targets: RSS <= 100 MB (mqtt source), first result <= 1.0 s after exec; "
        + ", ".join(f"{r.name} {r.memory.rss / 1e6:.1f} MB / {r.start_s:.2f} s" for r in rows[1:] if r.memory),
        f"(this checkout: {ROOT})",
        f"ratio {mqtt_row.memory.rss / TARGET_BYTES:.2f} rss/100MB-target",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="running time before memory is read (60)")
    parser.add_argument("--rate", type=float, default=20.0, help="inputs per second (20)")
    parser.add_argument("--starts", type=int, default=3, help="starts per source for the first-result median (3)")
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma-separated (mqtt,replay)")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout of this repository (e.g. `git archive main | tar -x -C DIR`): its nodes are "
        "measured too, in the same run, as rows 'SOURCE (baseline)'",
    )
    args = parser.parse_args(argv)
    sources = [s for s in args.sources.split(",") if s]
    if "mqtt" not in sources:
        parser.error("--sources must include mqtt (the headline's source)")
    with tempfile.TemporaryDirectory(prefix="bench-footprint-") as tmp:
        work = Path(tmp)
        models = build_demo_models(work / "models")
        inputs = np.ascontiguousarray(load_split().X_test, dtype=np.float32)
        broker = Mosquitto(work / "broker")
        broker.start()
        bridge_log = work / "bridge.log"
        bridge_config = write_bridge_config(
            work,
            broker,
            escalation={"model": models["cloud"].path},
            drift={"enabled": False},
            rollout={"enabled": False},
        )
        bridge = start_program("cloud_bridge.cli", ["run", "--config", str(bridge_config)], bridge_log)
        watcher = Watcher(broker.port)
        try:
            _wait_log(bridge_log, "mqtt connected", bridge, 60)
            bench = Bench(work, broker.port, models["edge"].path, watcher, inputs, args.rate)
            rows = [floor_row(models["edge"].path)]
            for source in sources:
                if args.baseline is not None:
                    name = f"{source} (baseline)"
                    rows.append(bench.row(source, args.seconds, max(1, args.starts), args.baseline.resolve(), name))
                rows.append(bench.row(source, args.seconds, max(1, args.starts)))
                print(f"measured the {source} source", file=sys.stderr, flush=True)
        finally:
            watcher.close()
            bridge.terminate(30)
            broker.stop()
    print(report(rows, args.seconds, args.rate, max(1, args.starts)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
