"""Samples for labelers: real digits through a real broker into the bridge's SQLite archive, then
`cloud-bridge samples export` (files, manifest, filters, idempotence, cursor, Label Studio), `samples
tail` as a real process, and the archive's row/age bound."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import numpy as np
import numpy.typing as npt
import pytest
from sklearn.datasets import load_digits

from cloud_bridge.app import Bridge, running_bridge
from cloud_bridge.cli import main as cli_main
from cloud_bridge.cli.samples import parse_when
from cloud_bridge.config import BridgeConfig, FleetConfig, MqttConfig, RegistryConfig, SamplesConfig
from cloud_bridge.registry import SampleRow
from cloud_bridge.samples.archive import prune_samples
from cloud_bridge.samples.images import encode_png, image_of, zoom
from cloud_bridge.samples.tail import TailOptions, tail_samples
from devservers import Mosquitto
from schemas import ModelRef, Sample, TopK, encode, encode_tensor, new_msg_id
from schemas.topics import Channel, Topics
from tests.config_files import write_bridge_config
from tests.processes import CLOUD_BRIDGE, running, wait_logged

pytestmark = pytest.mark.timeout(60)

TOPICS = Topics("fleet")
FLEET = "f1"
EDGE = ModelRef(name="digits-edge", version="1.0.0", sha256="ab" * 32)
EDGE2 = ModelRef(name="digits-edge", version="1.1.0", sha256="cd" * 32)


# ---- helpers --------------------------------------------------------------------------------------


def digits() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    data = load_digits()
    return data.data.astype(np.float32), data.target


def make_sample(
    index: int,
    device: str,
    ts: float,
    reasons: list[str],
    model: ModelRef = EDGE,
) -> Sample:
    x, y = digits()
    truth = str(int(y[index]))
    wrong = str((int(y[index]) + 3) % 10)
    return Sample(
        msg_id=new_msg_id(),
        fleet_id=FLEET,
        device_id=device,
        ts=ts,
        model=model,
        inference_id=f"inf-{index}",
        input=encode_tensor(x[index]),
        predicted=wrong,
        topk=[TopK(label=wrong, index=int(wrong), prob=0.48), TopK(label=truth, index=int(truth), prob=0.41)],
        entropy=1.1,
        margin=0.07,
        reasons=reasons,  # type: ignore[arg-type]
        source_ref=f"replay:{index}",
        truth=truth,
    )


def config(tmp_path: Path, broker: Mosquitto, **samples: float) -> BridgeConfig:
    return BridgeConfig(
        state_dir=str(tmp_path / "state"),
        mqtt=MqttConfig(host=broker.host, port=broker.port, client_id="bridge-samples"),
        fleet=FleetConfig(share_group="g1"),
        samples=SamplesConfig(**samples),  # type: ignore[arg-type]
    )


async def ingest(bridge: Bridge, broker: Mosquitto, samples: list[Sample]) -> None:
    """Publish through the broker and wait (bounded) until the bridge has archived them all."""
    assert bridge.ingestor is not None
    target = bridge.ingestor.stats.stored + len(samples)
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        for s in samples:
            await client.publish(TOPICS.device(FLEET, s.device_id, Channel.SAMPLES), encode(s), qos=1)
    async with asyncio.timeout(15):
        await bridge.ingestor.wait_for(lambda st: st.stored >= target)


async def export(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `cloud-bridge samples export` (in a thread: it runs its own event loop) and capture its output."""
    code = await asyncio.to_thread(cli_main, ["samples", "export", "--quiet", *args])
    out, err = capsys.readouterr()
    return code, out, err


def manifest(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


def read_png(data: bytes) -> npt.NDArray[np.uint8]:
    """An independent reader for the PNGs the exporter writes (8-bit gray, no interlace): checks the
    signature, every chunk CRC and the row filters, and returns the pixels."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(tag + body) & 0xFFFFFFFF == crc, f"bad CRC in {tag!r}"
        if tag == b"IHDR":
            header = body
        elif tag == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert (depth, color, interlace) == (8, 0, 0)
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, width + 1)
    assert (rows[:, 0] == 0).all()  # filter type None on every row
    return rows[:, 1:].copy()


@pytest.fixture
def toml(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Path]:
    yield write_bridge_config(tmp_path, mosquitto, mqtt={"client_id": "bridge-samples"})


# ---- export ---------------------------------------------------------------------------------------


async def test_export_writes_npy_png_and_a_manifest_line_per_sample(
    tmp_path: Path,
    mosquitto: Mosquitto,
    toml: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every fsync, by the path it made durable: a manifest line must not reach the disk before the
    # files it names (a labeler opening them after a power cut would find them missing or empty).
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    now = time.time()
    sent = [
        make_sample(i, f"dev-{i % 2}", now - 60 + i, ["entropy", "margin"] if i % 2 else ["margin"]) for i in range(6)
    ]
    out = tmp_path / "export"
    async with running_bridge(config(tmp_path, mosquitto)) as bridge:
        await ingest(bridge, mosquitto, sent)
        # The bridge keeps running: the export reads the WAL database beside it.
        code, stdout, _ = await export(capsys, "--config", str(toml), "--since", "1h", "--out", str(out))
    assert code == 0, stdout
    assert "6 written (6 with PNG), 0 already exported" in stdout
    entries = manifest(out)
    assert [e["msg_id"] for e in entries] == [s.msg_id for s in sent]  # archive order
    x, _ = digits()
    for index, (entry, sample) in enumerate(zip(entries, sent, strict=True)):
        assert entry["device_id"] == sample.device_id and entry["fleet_id"] == FLEET
        assert entry["model"] == {"name": "digits-edge", "version": "1.0.0", "sha256": "ab" * 32}
        assert entry["predicted"] == sample.predicted and entry["truth"] == sample.truth
        assert entry["topk"] == [{"label": t.label, "index": t.index, "prob": t.prob} for t in sample.topk]
        assert entry["reasons"] == list(sample.reasons)
        assert entry["entropy"] == pytest.approx(1.1) and entry["margin"] == pytest.approx(0.07)
        assert entry["ts"] == pytest.approx(sample.ts) and str(entry["time"]).endswith("Z")
        assert entry["source_ref"] == f"replay:{index}" and entry["inference_id"] == f"inf-{index}"
        assert entry["dtype"] == "float32" and entry["shape"] == [64]
        assert isinstance(entry["received_at"], float) and entry["received_at"] >= now - 5
        array = np.load(out / str(entry["npy"]), allow_pickle=False)
        assert array.dtype == np.float32 and array.shape == (64,)
        assert np.array_equal(array, x[index])
        pixels = read_png((out / str(entry["png"])).read_bytes())
        assert pixels.shape == (64, 64)  # 8x8 digit, auto zoom x8
        expected = np.rint((x[index] - x[index].min()) * 255.0 / (x[index].max() - x[index].min())).reshape(8, 8)
        assert np.array_equal(pixels[::8, ::8], expected.astype(np.uint8))
        assert np.array_equal(pixels, np.kron(pixels[::8, ::8], np.ones((8, 8), dtype=np.uint8)))
    manifest_synced = synced.index(str((out / "manifest.jsonl").resolve()))
    for entry in entries:
        for name in (entry["npy"], entry["png"]):
            path = str((out / str(name)).resolve())
            assert path in synced[:manifest_synced], f"{name} was not fsynced before its manifest line"


async def test_reexport_is_idempotent_and_repairs_an_interrupted_run(
    tmp_path: Path, mosquitto: Mosquitto, toml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sent = [make_sample(i, "dev-1", time.time(), ["entropy"]) for i in range(5)]
    out = tmp_path / "export"
    async with running_bridge(config(tmp_path, mosquitto)) as bridge:
        await ingest(bridge, mosquitto, sent)
    args = ("--config", str(toml), "--since", "0", "--out", str(out))
    assert (await export(capsys, *args))[0] == 0
    files = {p.name: p.stat().st_mtime_ns for p in (out / "inputs").iterdir()}
    first = (out / "manifest.jsonl").read_bytes()
    code, stdout, _ = await export(capsys, *args)
    assert code == 0 and "0 written (0 with PNG), 5 already exported" in stdout
    assert (out / "manifest.jsonl").read_bytes() == first
    assert {p.name: p.stat().st_mtime_ns for p in (out / "inputs").iterdir()} == files
    # A crash mid-line: the last line is cut short and the one before it never written.
    lines = first.splitlines(keepends=True)
    (out / "manifest.jsonl").write_bytes(b"".join(lines[:3]) + lines[4][:25])
    code, stdout, _ = await export(capsys, *args)
    assert code == 0 and "2 written (2 with PNG), 3 already exported" in stdout
    assert sorted(e["msg_id"] for e in manifest(out)) == sorted(s.msg_id for s in sent)
    assert not list((out / "inputs").glob(".*tmp"))


async def test_filters_select_by_time_device_model_reason_and_limit(
    tmp_path: Path, mosquitto: Mosquitto, toml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    old = [make_sample(i, "dev-a", now - 3 * 3600, ["margin"]) for i in range(2)]
    a = [make_sample(10 + i, "dev-a", now - 60, ["entropy"]) for i in range(3)]
    b = [make_sample(20 + i, "dev-b", now - 30, ["entropy", "margin"], EDGE2) for i in range(2)]
    async with running_bridge(config(tmp_path, mosquitto)) as bridge:
        await ingest(bridge, mosquitto, old + a + b)

    async def ids(name: str, *args: str) -> set[str]:
        out = tmp_path / name
        code, _, stderr = await export(capsys, "--config", str(toml), "--out", str(out), *args)
        assert code == 0, stderr
        return {str(e["msg_id"]) for e in manifest(out)} if (out / "manifest.jsonl").exists() else set()

    def of(samples: list[Sample]) -> set[str]:
        return {s.msg_id for s in samples}

    assert await ids("recent", "--since", "2h") == of(a + b)
    iso_until = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - 3600))
    assert await ids("old", "--since", "1d", "--until", iso_until) == of(old)
    assert await ids("dev", "--since", "1d", "--device", "dev-a") == of(old + a)
    assert await ids("model", "--since", "1d", "--model", "digits-edge@1.1.0") == of(b)
    assert await ids("name", "--since", "1d", "--model", "digits-edge") == of(old + a + b)
    assert await ids("entropy", "--since", "1d", "--reason", "entropy") == of(a + b)
    assert await ids("margin", "--since", "1d", "--reason", "margin") == of(old + b)
    assert await ids("limit", "--since", "1d", "--limit", "3") == of(old + a[:1])
    assert await ids("none", "--since", "1d", "--device", "nobody") == set()


async def test_since_last_resumes_by_arrival_including_late_old_samples(
    tmp_path: Path, mosquitto: Mosquitto, toml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "export"
    args = ("--config", str(toml), "--since", "last", "--out", str(out))
    first = [make_sample(i, "dev-1", time.time(), ["entropy"]) for i in range(3)]
    # A device that was offline for a day delivers its outbox late: old device time, new arrival.
    late = [make_sample(30, "dev-9", time.time() - 86400, ["margin"])]
    fresh = [make_sample(31, "dev-1", time.time(), ["entropy"])]
    async with running_bridge(config(tmp_path, mosquitto)) as bridge:
        await ingest(bridge, mosquitto, first)
        code, stdout, _ = await export(capsys, *args, "--limit", "2")
        assert code == 0 and "2 written" in stdout
        code, stdout, _ = await export(capsys, *args)
        assert code == 0 and "1 written" in stdout and "0 already exported" in stdout
        await ingest(bridge, mosquitto, late + fresh)
        code, stdout, _ = await export(capsys, *args)
        assert code == 0 and "2 written" in stdout and "0 already exported" in stdout
        # A cursor belongs to its filter set: a device-only export starts from the beginning.
        code, stdout, _ = await export(capsys, *args, "--device", "dev-1")
        assert code == 0 and "0 written" in stdout and "4 already exported" in stdout
    assert [e["msg_id"] for e in manifest(out)] == [s.msg_id for s in first + late + fresh]


async def test_label_studio_tasks_are_only_the_new_samples(
    tmp_path: Path, mosquitto: Mosquitto, toml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sent = [make_sample(i, "dev-1", time.time(), ["entropy"]) for i in range(3)]
    out = tmp_path / "export"
    async with running_bridge(config(tmp_path, mosquitto)) as bridge:
        await ingest(bridge, mosquitto, sent)
    base = ("--config", str(toml), "--out", str(out), "--format", "label-studio")
    code, _, err = await export(capsys, *base, "--since", "0", "--limit", "2")
    assert code == 0 and "--image-url-prefix" in err  # PNG paths Label Studio cannot open: warned
    assert (await export(capsys, *base, "--since", "0", "--limit", "2", "--image-url-prefix", "/data/x/"))[0] == 0
    assert json.loads((out / "label-studio.json").read_text(encoding="utf-8")) == []  # nothing new
    code, _, err = await export(capsys, *base, "--since", "0", "--image-url-prefix", "/data/x/")
    assert code == 0 and "--image-url-prefix" not in err
    newer = json.loads((out / "label-studio.json").read_text(encoding="utf-8"))
    assert [t["data"]["msg_id"] for t in newer] == [sent[2].msg_id]  # only what is new since the last export
    code, _, _ = await export(capsys, *base, "--since", "0", "--limit", "1", "--out", str(tmp_path / "again"))
    tasks = json.loads((tmp_path / "again" / "label-studio.json").read_text(encoding="utf-8"))
    assert [t["data"]["msg_id"] for t in tasks] == [sent[0].msg_id]
    task, sample = tasks[0], sent[0]
    assert task["data"]["image"] == f"inputs/{sample.msg_id}.png"
    assert newer[0]["data"]["npy"] == f"/data/x/inputs/{sent[2].msg_id}.npy"
    (prediction,) = task["predictions"]
    assert prediction["model_version"] == "digits-edge@1.0.0" and prediction["score"] == pytest.approx(0.48)
    assert prediction["result"] == [
        {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [sample.predicted]}}
    ]
    assert task["meta"]["source_ref"] == "replay:0"


def test_export_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml = write_bridge_config(tmp_path, state_dir=tmp_path / "nothing-here")
    base = ["samples", "export", "--config", str(toml), "--out", str(tmp_path / "o")]
    assert cli_main([*base, "--since", "1h"]) == 2
    assert "no registry database" in capsys.readouterr().err
    (tmp_path / "nothing-here").mkdir()
    (tmp_path / "nothing-here" / "registry.db").touch()
    assert cli_main([*base, "--since", "yesterday-ish"]) == 2
    assert "is not a time" in capsys.readouterr().err
    assert cli_main([*base, "--since", "last", "--until", "1h"]) == 2
    assert "--until cannot be combined" in capsys.readouterr().err
    assert cli_main([*base, "--since", "1h", "--device", "a/b"]) == 2
    assert "'/'" in capsys.readouterr().err


async def test_export_cursor_filters_and_prune_on_postgresql(
    tmp_path: Path,
    mosquitto: Mosquitto,
    postgres_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The same queries on PostgreSQL: row-value cursor, JSON-as-text reason filter, prune subquery."""
    toml = write_bridge_config(
        tmp_path, mosquitto, mqtt={"client_id": "bridge-samples"}, registry={"url": postgres_url}
    )
    cfg = BridgeConfig(
        state_dir=str(tmp_path / "state"),
        mqtt=MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id="bridge-samples-pg"),
        registry=RegistryConfig(url=postgres_url),
    )
    first = [make_sample(i, "pg-1", time.time(), ["entropy"] if i % 2 else ["margin"]) for i in range(4)]
    second = [make_sample(10, "pg-1", time.time(), ["entropy"])]
    out = tmp_path / "export"
    args = ("--config", str(toml), "--out", str(out), "--since", "last")
    async with running_bridge(cfg) as bridge:
        await ingest(bridge, mosquitto, first)
        code, stdout, stderr = await export(capsys, *args, "--reason", "entropy")
        assert code == 0 and "2 written" in stdout, stderr
        await ingest(bridge, mosquitto, second)
        code, stdout, _ = await export(capsys, *args, "--reason", "entropy")
        assert code == 0 and "1 written" in stdout and "0 already exported" in stdout
        assert await prune_samples(bridge.registry, SamplesConfig(max_rows=2, max_age_days=0), time.time()) == 3
        kept = {r["msg_id"] for r in await bridge.registry.rows(SampleRow)}
    assert [e["msg_id"] for e in manifest(out)] == [first[1].msg_id, first[3].msg_id, second[0].msg_id]
    assert kept == {first[3].msg_id, second[0].msg_id}


# ---- tail -----------------------------------------------------------------------------------------


async def test_tail_prints_one_line_per_sample_reports_invalid_ones_and_stops_on_ctrl_c(
    mosquitto: Mosquitto, toml: Path, tmp_path: Path
) -> None:
    argv = [*CLOUD_BRIDGE, "samples", "tail", "--config", str(toml), "--device", "dev-t"]
    # stdout is read while the tail runs: a line that is not flushed at once never arrives.
    with running("samples-tail", argv, tmp_path / "tail-stderr.log", stdout_pipe=True) as proc:
        assert proc.popen is not None and proc.popen.stdout is not None
        stdout = proc.popen.stdout
        await asyncio.to_thread(wait_logged, proc, "subscribed to fleet/+/", 30)
        sent = [make_sample(i, "dev-t", time.time(), ["entropy", "margin"]) for i in range(3)]
        other = make_sample(9, "dev-other", time.time(), ["margin"])
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
            await client.publish(TOPICS.device(FLEET, "dev-t", Channel.SAMPLES), b'{"schema": "sample/1"', qos=1)
            await client.publish(TOPICS.device(FLEET, "dev-other", Channel.SAMPLES), encode(other), qos=1)
            for s in sent:
                await client.publish(TOPICS.device(FLEET, "dev-t", Channel.SAMPLES), encode(s), qos=1)
        lines = [(await asyncio.to_thread(stdout.readline)).decode() for _ in sent]
        proc.send_signal(signal.SIGINT)
        returncode = await asyncio.to_thread(proc.wait, 20)
        rest = stdout.read().decode()  # the tail has exited: what it wrote last is in the pipe
        stderr = proc.log_text()
    assert returncode == 0, stderr
    assert rest == ""  # the other device's sample was never printed
    for line, sample in zip(lines, sent, strict=True):
        assert f"{FLEET}/dev-t digits-edge@1.0.0 predicted={sample.predicted}" in line
        assert "reasons=entropy,margin" in line and f"msg_id={sample.msg_id}" in line
        assert f"truth={sample.truth}" in line and "input=float32[64]" in line
    assert "invalid sample on fleet/f1/dev-t/samples" in stderr and "malformed JSON" in stderr
    assert "printed 3 samples, 1 invalid" in stderr


async def test_tail_works_over_mqtt_311(mosquitto: Mosquitto) -> None:
    """A gateway that speaks only 3.1.1: the tail connects with a clean session and still prints."""
    cfg = BridgeConfig(mqtt=MqttConfig(host=mosquitto.host, port=mosquitto.port, protocol="mqtt311"))
    subscribed = asyncio.Event()
    lines: list[str] = []
    warnings: list[str] = []
    options = TailOptions(count=1, as_json=True)
    tail = asyncio.create_task(tail_samples(cfg, options, lines.append, warnings.append, lambda _: subscribed.set()))
    async with asyncio.timeout(15):
        await subscribed.wait()
        sample = make_sample(2, "dev-311", time.time(), ["margin"])
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
            await client.publish(TOPICS.device(FLEET, "dev-311", Channel.SAMPLES), encode(sample), qos=1)
        stats = await tail
    assert stats.printed == 1 and not warnings
    (line,) = lines
    assert json.loads(line)["msg_id"] == sample.msg_id  # --json: the payload as received


# ---- archive bound ----------------------------------------------------------------------------------


async def test_prune_keeps_the_newest_max_rows_and_drops_rows_past_max_age(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    sent = [make_sample(i, "dev-p", time.time(), ["entropy"]) for i in range(5)]
    async with running_bridge(config(tmp_path, mosquitto, max_rows=3, max_age_days=1)) as bridge:
        for s in sent:  # one at a time: distinct arrival times, in order
            await ingest(bridge, mosquitto, [s])
        assert await bridge.registry.count(SampleRow) == 5
        await bridge.prune()
        kept = {r["msg_id"] for r in await bridge.registry.rows(SampleRow)}
        assert kept == {s.msg_id for s in sent[2:]}
        # Two days later every row is past max_age_days = 1.
        bounds = SamplesConfig(max_rows=3, max_age_days=1)
        assert await prune_samples(bridge.registry, bounds, time.time() + 2 * 86400) == 3
        assert await bridge.registry.count(SampleRow) == 0
        # Both bounds off: nothing is deleted however old.
        await ingest(bridge, mosquitto, [make_sample(7, "dev-p", 1.0, ["entropy"])])
        assert await prune_samples(bridge.registry, SamplesConfig(0, 0), time.time() + 1e9) == 0


# ---- units -----------------------------------------------------------------------------------------


def test_parse_when_accepts_iso_unix_and_ages() -> None:
    now = 1_800_000_000.0
    assert parse_when("1795638016.5", now) == 1795638016.5
    assert parse_when("2h", now) == now - 7200
    assert parse_when("90s", now) == now - 90
    assert parse_when("7d", now) == now - 7 * 86400
    assert parse_when("2026-11-26T08:00:00Z", now) == parse_when("2026-11-26T08:00:00", now)
    assert parse_when("2026-11-26T09:00:00+01:00", now) == parse_when("2026-11-26T08:00:00Z", now)
    with pytest.raises(ValueError, match="is not a time"):
        parse_when("last tuesday", now)


def test_image_shapes_and_png_round_trip() -> None:
    x, _ = digits()
    flat = image_of(x[0])
    assert flat is not None and flat.shape == (8, 8) and flat.dtype == np.uint8
    batched = image_of(x[0].reshape(1, 64))
    assert batched is not None and np.array_equal(batched, flat)
    assert flat.min() == 0 and flat.max() == 255
    rgb = image_of(np.arange(3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8))  # C x H x W
    assert rgb is not None and rgb.shape == (8, 8, 3)
    assert image_of(np.zeros(10, dtype=np.float32)) is None  # not a square
    assert image_of(np.zeros((2, 3), dtype=np.float32)) is None  # a tiny table, not a picture
    assert image_of(np.zeros((2, 2, 2, 2), dtype=np.float32)) is None
    constant = image_of(np.full(16, np.nan, dtype=np.float32))
    assert constant is not None and not constant.any()
    big = zoom(flat)
    assert big.shape == (64, 64) and zoom(flat, 1) is flat
    assert np.array_equal(read_png(encode_png(big)), big)
    assert encode_png(rgb)[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((8, 8), dtype=np.float32))  # type: ignore[arg-type]
