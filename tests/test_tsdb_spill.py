"""The TSDB writer's parts without a server: the bounded spill, what each HTTP answer means, batch splitting.

Servers' real answers are exercised in tests/test_bridge_tsdb.py; here the spill's bookkeeping (exact
counts across segments, a chunk in flight when its segment is dropped, restarts, the file of earlier
versions) and the answer table are pinned down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import pytest

from cloud_bridge.config import load_config
from cloud_bridge.errors import ConfigError
from cloud_bridge.tsdb import TsdbSettings, TsdbWriter
from cloud_bridge.tsdb.api import WriteApi
from cloud_bridge.tsdb.spill import Spill
from cloud_bridge.tsdb.transport import Answer, error_text


def numbered(n0: int, n: int) -> list[str]:
    return [f"m,k=v value={i}i {1_700_000_000_000 + i}" for i in range(n0, n0 + n)]


def drain(spill: Spill, batch: int = 7) -> list[str]:
    out: list[str] = []
    while (chunk := spill.read(batch)) is not None:
        out += chunk.lines
        spill.consume(chunk)
    return out


def test_spill_replays_in_order_across_segments_and_restarts(tmp_path: Path) -> None:
    spill = Spill(tmp_path / "s", 64 * 1024)
    assert spill.segment_bytes == 4096
    spill.append(numbered(0, 300))
    spill.append(numbered(300, 300))
    assert spill.lines == 600 and len(list((tmp_path / "s").iterdir())) > 3
    first = spill.read(50)
    assert first is not None and first.lines == numbered(0, 50)
    spill.consume(first)
    # A new process finds the unsent lines (the consumed ones are sent again: same points).
    again = Spill(tmp_path / "s", 64 * 1024)
    assert again.lines == 600 and drain(again) == numbered(0, 600)
    assert again.lines == 0 and not again and not list((tmp_path / "s").iterdir())


def test_spill_bound_drops_whole_oldest_segments_and_counts_the_lines(tmp_path: Path) -> None:
    spill = Spill(tmp_path / "s", 16 * 1024)
    for start in range(0, 3000, 100):
        spill.append(numbered(start, 100))
        assert spill.disk_bytes <= 16 * 1024
    kept = drain(spill)
    assert spill.dropped + len(kept) == 3000 and spill.dropped > 0
    assert kept == numbered(3000 - len(kept), len(kept)), "the newest lines survive, contiguous"


def test_one_append_larger_than_the_bound_keeps_its_newest_lines(tmp_path: Path) -> None:
    spill = Spill(tmp_path / "s", 4096)
    spill.append(numbered(0, 10))
    dropped = spill.append(numbered(10, 1000))
    kept = drain(spill, 1000)
    assert spill.disk_bytes == 0 and spill.dropped == dropped == 1010 - len(kept)
    assert kept == numbered(1010 - len(kept), len(kept))


def test_a_chunk_in_flight_when_its_segment_is_dropped_is_counted_once(tmp_path: Path) -> None:
    spill = Spill(tmp_path / "s", 8192)
    spill.append(numbered(0, 60))
    chunk = spill.read(10)
    assert chunk is not None
    spill.append(numbered(60, 250))  # drops the segment being read
    assert spill.dropped > 0
    dropped_meanwhile = spill.dropped
    spill.abandon(chunk)  # the send failed: its 10 lines are lost too
    assert spill.dropped == dropped_meanwhile + 10
    assert spill.dropped + len(drain(spill)) == 310
    # Had the send succeeded, nothing more is counted.
    other = Spill(tmp_path / "t", 8192)
    other.append(numbered(0, 60))
    sent = other.read(10)
    assert sent is not None
    other.append(numbered(60, 250))
    other.consume(sent)
    assert other.dropped + 10 + len(drain(other)) == 310


def test_the_single_spill_file_of_earlier_versions_is_adopted_and_a_torn_line_kept_apart(tmp_path: Path) -> None:
    legacy = tmp_path / "tsdb-spill.lp"
    legacy.write_text("".join(f"{ln}\n" for ln in numbered(0, 5)) + "m,k=v value=5", encoding="utf-8")
    spill = Spill(tmp_path / "tsdb-spill", 1 << 20, legacy_file=legacy)
    assert not legacy.exists() and spill.lines == 6
    spill.append(numbered(6, 2))  # goes to a new segment, never after the torn line
    assert drain(spill) == [*numbered(0, 5), "m,k=v value=5", *numbered(6, 2)]


def test_answers_map_to_what_the_writer_does() -> None:
    v1 = WriteApi.build(url="http://h:8086/influx/", api="v1", database="db 1", retention_policy="rp", username="u")
    assert v1.target == "/influx/write?db=db%201&precision=ms&rp=rp"
    assert v1.headers["Authorization"] == "Basic dTo="
    v2 = WriteApi.build(url="http://h:8086", api="v2", org="o", bucket="b", token="t")
    assert v2.target == "/api/v2/write?org=o&bucket=b&precision=ms" and v2.headers["Authorization"] == "Token t"
    table = {
        (204, ""): "ok",
        (400, "partial write: unable to parse 'x'"): "reject",
        (422, "points beyond retention"): "reject",
        (401, "authorization failed"): "blocked",
        (403, "insufficient permissions"): "blocked",
        (404, 'database not found: "db 1"'): "blocked",
        (405, ""): "blocked",
        (500, "retention policy not found: rp"): "blocked",
        (413, "too large"): "too_large",
        (408, ""): "retry",
        (429, "slow down"): "retry",
        (500, "timeout"): "retry",
        (503, ""): "retry",
    }
    for (status, said), kind in table.items():
        assert v1.verdict(Answer(status, said, "1.6.7")).kind == kind, (status, said)
    assert "CREATE DATABASE" in v1.verdict(Answer(404, 'database not found: "db 1"')).detail
    assert 'api = "v1"' in v2.verdict(Answer(404, "404 page not found", "1.7.10")).detail
    assert 'api = "v1"' not in v2.verdict(Answer(404, 'bucket "b" not found', "v2.7.1")).detail
    assert error_text(b'{"code":"not found","message":"bucket \\"b\\" not found"}', "") == 'bucket "b" not found'
    assert error_text(b'{"error":"database not found: \\"x\\""}', "") == 'database not found: "x"'


def test_config_refuses_an_unknown_api() -> None:
    with pytest.raises(ConfigError, match=r"\[influx\] api = 'v3' \(from the environment\) is not allowed"):
        load_config(None, env={"CLOUD_BRIDGE__INFLUX__API": "v3"})
    with pytest.raises(ConfigError, match=r"\[influx\] spill_max_bytes = 0 must be greater than 0"):
        load_config(None, env={"CLOUD_BRIDGE__INFLUX__SPILL_MAX_BYTES": "0"})


class _SizeLimited:
    """A server that refuses bodies of more than 3 lines with 413 and accepts the rest."""

    def __init__(self) -> None:
        self.accepted: list[str] = []
        self.sizes: list[int] = []

    def post(self, target: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        lines = body.decode().split("\n")
        self.sizes.append(len(lines))
        if len(lines) > 3:
            return Answer(413, "Request Entity Too Large")
        self.accepted += lines
        return Answer(204)

    def close(self) -> None:
        return None


async def test_a_batch_too_large_is_split_until_the_server_takes_it(tmp_path: Path) -> None:
    server = _SizeLimited()
    writer = TsdbWriter(TsdbSettings(url="http://h", api="v1", database="d", spill_path=tmp_path / "s"), server)
    task = asyncio.create_task(writer.run())
    writer.add(numbered(0, 20))
    assert await writer.flush(deadline_s=5)
    await writer.close()
    await task
    assert sorted(server.accepted) == sorted(numbered(0, 20)) and writer.written == 20 and writer.rejected == 0
    assert server.sizes[:3] == [20, 10, 5] and max(server.sizes[3:]) <= 3
