"""The test helpers themselves: a helper that cannot fail would let every test that uses it pass."""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import os
import re
import signal
import socket
import ssl
import sys
import time
import tomllib
from pathlib import Path

import pytest

from cloud_bridge.config import load_config as load_bridge_config
from devservers import ProcessError
from edge_node.config import load_config as load_edge_config
from schemas.signing import generate_private_key, public_key_b64
from tests.config_files import toml_text, write_bridge_config, write_edge_config
from tests.edge_harness import edge_config
from tests.pki import Issued, TlsFiles
from tests.poll import wait_for, wait_for_async
from tests.processes import running, stop, wait_logged

# ---- poll ----------------------------------------------------------------------------------------


def test_wait_for_returns_the_first_value_accepted() -> None:
    counter = itertools.count()
    assert wait_for(lambda: next(counter), 5, "the counter", until=lambda n: n >= 3, interval=0) == 3


def test_wait_for_names_what_it_waited_for_and_the_last_value_seen() -> None:
    counter = itertools.count()
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"^timed out after 0.2 s waiting for a miracle; last seen: (\d+)$") as e:
        wait_for(lambda: next(counter), 0.2, "a miracle", until=lambda n: n < 0, interval=0.01)
    assert time.monotonic() - started >= 0.2
    last = int(re.findall(r"\d+$", str(e.value))[0])
    assert last == next(counter) - 1  # the value of the final probe, not an earlier one


def test_a_long_last_value_is_cut_and_a_description_may_be_computed_at_the_failure() -> None:
    states = iter(["starting", "still starting"])
    with pytest.raises(AssertionError) as e:
        wait_for(lambda: "x" * 5000, 0.05, lambda: f"the server ({next(states)})", until=lambda s: False)
    assert "waiting for the server (starting); last seen: 'xxx" in str(e.value)
    assert str(e.value).endswith("... (5002 chars)")


async def test_wait_for_async_takes_plain_and_coroutine_probes() -> None:
    counter = itertools.count()

    async def later() -> int:
        return next(counter)

    assert await wait_for_async(later, 5, "the counter", until=lambda n: n >= 2, interval=0) == 2
    assert await wait_for_async(lambda: next(counter), 5, "the counter", until=lambda n: n >= 5) == 5
    with pytest.raises(AssertionError, match=r"waiting for nothing; last seen: None$"):
        await wait_for_async(lambda: None, 0.05, "nothing")


# ---- processes -----------------------------------------------------------------------------------

# Each child says it is ready only once its SIGTERM handler is in place.
_IGNORES_SIGTERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
)
_EXITS_ON_SIGTERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)"
)


def test_a_process_reports_its_exit_code_and_its_output_goes_to_the_log(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"]
    with running("child", argv, tmp_path / "child.log") as proc:
        assert proc.wait(30) == 3 and proc.returncode == 3
    assert proc.log_text().split() == ["out", "err"]
    assert proc.log_tail(1).splitlines() == [f"--- child log {tmp_path / 'child.log'} (last 1 lines) ---", "err"]


def test_a_stuck_child_never_outlives_its_block_nor_a_wait(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; print('sleeping', flush=True); time.sleep(60)"]
    with running("stuck", sleeper, tmp_path / "stuck.log") as proc:
        pid = proc.pid
        assert pid is not None and proc.alive
    assert not proc.alive and proc.returncode == -signal.SIGKILL
    with pytest.raises(OSError):
        os.kill(pid, 0)  # reaped: no such process
    with running("stuck", sleeper, tmp_path / "stuck.log") as proc:
        wait_logged(proc, "sleeping", 30)
        with pytest.raises(
            ProcessError, match=r"stuck did not exit within 0.2 s \(killed\)\n--- stuck log .*\nsleeping"
        ):
            proc.wait(0.2)
        assert not proc.alive


def test_stop_is_sigterm_and_a_clean_exit_else_a_kill_that_fails_the_test(tmp_path: Path) -> None:
    with running("polite", [sys.executable, "-c", _EXITS_ON_SIGTERM], tmp_path / "polite.log") as proc:
        wait_logged(proc, "ready", 30)
        stop(proc)
    with running("deaf", [sys.executable, "-c", _IGNORES_SIGTERM], tmp_path / "deaf.log") as proc:
        wait_logged(proc, "ready", 30)
        with pytest.raises(AssertionError, match=r"deaf exited with -9 after SIGTERM\n--- deaf log .*\nready"):
            stop(proc, timeout=0.5)


def test_pipes_carry_stdout_to_the_test_and_closing_stdin_ends_a_reader(tmp_path: Path) -> None:
    echo = [
        sys.executable,
        "-c",
        "import sys; print(sys.stdin.readline().upper(), end='', flush=True); sys.stdin.read()",
    ]
    with running("echo", echo, tmp_path / "echo.log", stdin_pipe=True, stdout_pipe=True) as proc:
        assert proc.popen is not None and proc.popen.stdin is not None and proc.popen.stdout is not None
        proc.popen.stdin.write(b"hello\n")
        proc.popen.stdin.flush()
        assert proc.popen.stdout.readline() == b"HELLO\n"
        proc.popen.stdin.close()
        assert proc.wait(30) == 0


def test_wait_logged_fails_at_once_with_the_log_when_the_process_exits_first(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "print('config error: no such file')"]
    started = time.monotonic()
    with running("early", argv, tmp_path / "early.log") as proc, pytest.raises(AssertionError) as e:
        wait_logged(proc, "connected", 30)
    assert time.monotonic() - started < 20
    assert "early exited (0) before logging 'connected'" in str(e.value) and "config error: no such file" in str(
        e.value
    )


# ---- config files --------------------------------------------------------------------------------


def test_toml_text_round_trips_the_dict_form() -> None:
    tables = {
        "state_dir": Path("/var/lib/x"),
        "status_interval_s": 0.5,
        "mqtt": {"host": "h", "port": 1883, "tls": False, "password": 'a "quoted" \\ back\nslash\x7f é'},
        "drift": {"kinds": ["a", "b"], "ratio": float("inf"), "unset": None},
        "ota": {"trusted_keys": {"key+/=": "v"}, "empty": {}},
    }
    parsed = tomllib.loads(toml_text(tables))
    assert parsed == {
        "state_dir": "/var/lib/x",
        "status_interval_s": 0.5,
        "mqtt": {"host": "h", "port": 1883, "tls": False, "password": 'a "quoted" \\ back\nslash\x7f é'},
        "drift": {"kinds": ["a", "b"], "ratio": float("inf")},
        "ota": {"trusted_keys": {"key+/=": "v"}, "empty": {}},
    }
    with pytest.raises(TypeError, match="no TOML form for"):
        toml_text({"x": object()})


def test_an_edge_config_file_loads_as_the_same_config_built_in_code(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read by the loader")
    key = public_key_b64(generate_private_key())
    sections = {
        "routing": {"escalate": False},
        "source": {"kind": "replay", "rate_hz": 100},
        "ota": {"crash_loop_limit": 2, "trusted_keys": {"k1": key}},
    }
    from_file = load_edge_config(write_edge_config(tmp_path, 1883, model, **sections), environ={})
    assert from_file == edge_config(tmp_path, 1883, model, **sections)
    assert from_file.mqtt.keepalive == 5 and from_file.ota.trusted_keys == {"k1": key}


def test_a_bridge_config_file_has_its_state_under_the_test_and_the_given_sections(tmp_path: Path) -> None:
    config = load_bridge_config(
        write_bridge_config(tmp_path, status_interval_s=0.5, mqtt={"client_id": "b1"}, fleet={"share_group": "g"}),
        env={},
    )
    assert Path(config.state_dir) == tmp_path / "state" and config.status_interval_s == 0.5
    assert (config.mqtt.client_id, config.mqtt.port, config.fleet.share_group) == ("b1", 1883, "g")


# ---- certificates --------------------------------------------------------------------------------


def _handshake(tls: TlsFiles, trusted: Path, client_cert: Issued | None = None) -> str | None:
    """A TLS handshake over a socket pair: the server serves `tls.server` (and asks for a client
    certificate signed by `tls.ca`), the client trusts `trusted` and checks the name 127.0.0.1.
    Returns the server's view of the client certificate's CN, None without one."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tls.server.cert, tls.server.key)
    server_ctx.load_verify_locations(tls.ca.cert)
    server_ctx.verify_mode = ssl.CERT_OPTIONAL
    client_ctx = ssl.create_default_context(cafile=str(trusted))
    if client_cert is not None:
        client_ctx.load_cert_chain(client_cert.cert, client_cert.key)
    left, right = socket.socketpair()
    with left, right, concurrent.futures.ThreadPoolExecutor(1) as pool:
        served = pool.submit(lambda: server_ctx.wrap_socket(left, server_side=True))
        try:
            with client_ctx.wrap_socket(right, server_hostname="127.0.0.1"):
                peer = served.result(10).getpeercert()
        finally:
            right.close()  # a failed client handshake must not leave the server side waiting
            with contextlib.suppress(ssl.SSLError, OSError):
                served.result(10)
    return None if not peer else dict(x[0] for x in peer["subject"])["commonName"]


def test_the_throwaway_ca_issues_what_hostname_checking_clients_and_servers_accept(
    tls: TlsFiles, tmp_path: Path
) -> None:
    assert _handshake(tls, tls.ca.cert) is None
    assert _handshake(tls, tls.ca.cert, tls.ca.client(tmp_path, "dev-7")) == "dev-7"
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        _handshake(tls, tls.other_ca.cert)
    assert tls.listener_lines() == (
        f"cafile {tls.ca.cert}",
        f"certfile {tls.server.cert}",
        f"keyfile {tls.server.key}",
    )
