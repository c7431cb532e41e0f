"""The MQTT glue in common/: reconnect backoff, failure classification, the TLS context builder."""

from __future__ import annotations

import random
import re
import socket
import ssl
from dataclasses import astuple
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from paho.mqtt._packet import convert_connack_rc_to_reason_code
from paho.mqtt.enums import ConnackCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from cloud_bridge import errors as bridge_errors
from common.backoff import Backoff
from common.mqtt import Failure, LoopDriver, classify_connack, classify_error, new_client
from common.tls import client_context
from devservers.ports import free_port
from edge_node import errors as edge_errors
from tests.pki import TlsFiles

# ---- backoff ---------------------------------------------------------------------------------


def test_backoff_stays_within_min_and_the_doubling_cap() -> None:
    backoff = Backoff(0.5, 30.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(40)]
    assert delays[0] == 0.5  # the first retry waits the minimum: the cap is the minimum then
    for attempt, delay in enumerate(delays):
        assert 0.5 <= delay <= min(30.0, 0.5 * 2**attempt), (attempt, delay)
    assert max(delays) > 15.0  # the cap grows to the maximum, it does not stay near the minimum


def test_backoff_is_jittered_over_the_whole_interval() -> None:
    backoff = Backoff(1.0, 8.0, rng=random.Random(2))
    for _ in range(10):
        backoff.next_delay()  # past the doublings: every draw is from [1, 8]
    delays = [backoff.next_delay() for _ in range(200)]
    assert len(set(delays)) == len(delays)  # a fleet does not retry in lockstep
    assert min(delays) < 2.0 and max(delays) > 7.0


def test_backoff_hold_off_waits_the_maximum_and_reset_starts_over() -> None:
    backoff = Backoff(0.2, 10.0, rng=random.Random(4))
    for _ in range(6):
        backoff.next_delay()
    assert backoff.next_delay(hold_off=True) == 10.0
    backoff.reset()
    assert backoff.next_delay() == 0.2


@pytest.mark.parametrize(("minimum", "maximum"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_backoff_rejects_bounds_that_make_no_sense(minimum: float, maximum: float) -> None:
    with pytest.raises(ValueError, match="minimum"):
        Backoff(minimum, maximum)


# ---- failure classification -------------------------------------------------------------------


async def test_a_refused_tcp_connect_is_classified_refused() -> None:
    """Through the loop driver, against a port nobody listens on: the real exception paho raises."""
    port = free_port()
    driver = LoopDriver(new_client(client_id="t", v5=True, persistent=False), misc_interval_s=1.0)
    with pytest.raises(OSError) as caught:
        await driver.connect("127.0.0.1", port, 30)
    assert not driver.attached
    kind, detail = classify_error(caught.value)
    assert kind == "refused", detail


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "dns"),
        (ConnectionRefusedError(111, "Connection refused"), "refused"),
        (ssl.SSLCertVerificationError(1, "certificate verify failed: unable to get local issuer"), "tls"),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "tls"),
        (TimeoutError("timed out"), "timeout"),
        (ConnectionResetError(104, "Connection reset by peer"), "network"),
    ],
)
def test_connect_exceptions_are_classified(error: OSError, kind: str) -> None:
    failure = classify_error(error)
    assert failure.kind == kind
    assert str(error) in failure.detail
    assert str(failure) == f"{kind}: {failure.detail}"  # what both programs put in their errors


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        (ReasonCode(PacketTypes.CONNACK, "Bad user name or password"), "auth"),
        (ReasonCode(PacketTypes.CONNACK, "Not authorized"), "auth"),
        (convert_connack_rc_to_reason_code(ConnackCode.CONNACK_REFUSED_BAD_USERNAME_PASSWORD), "auth"),
        (convert_connack_rc_to_reason_code(ConnackCode.CONNACK_REFUSED_NOT_AUTHORIZED), "auth"),
        (ReasonCode(PacketTypes.CONNACK, "Unsupported protocol version"), "protocol"),
        (convert_connack_rc_to_reason_code(ConnackCode.CONNACK_REFUSED_PROTOCOL_VERSION), "protocol"),
        (ReasonCode(PacketTypes.CONNACK, "Server unavailable"), "broker"),
    ],
)
def test_connack_refusals_are_classified(reason: ReasonCode, kind: str) -> None:
    failure = classify_connack(reason)
    assert failure == Failure(kind, failure.detail)
    assert str(reason.value) in failure.detail


# ---- TLS context -------------------------------------------------------------------------------


def test_tls_context_verifies_the_broker_with_the_given_ca(tls: TlsFiles) -> None:
    context = client_context(tls.ca.cert, error=edge_errors.ConfigError)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    # Only the configured CA is trusted, not the system's CAs on top of it.
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", tls.ca.name),),)]


@pytest.mark.parametrize("error", [edge_errors.ConfigError, bridge_errors.ConfigError])
def test_a_garbage_ca_file_is_a_config_error_naming_the_file(tmp_path: Path, error: type[Exception]) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("this is not a certificate\n")
    with pytest.raises(error) as caught:
        client_context(ca, error=error)
    message = str(caught.value)
    assert f"tls_ca {ca}" in message and "PEM" in message and "fix:" in message


@pytest.mark.parametrize("error", [edge_errors.ConfigError, bridge_errors.ConfigError])
def test_a_missing_ca_file_is_a_config_error_naming_the_file(tmp_path: Path, error: type[Exception]) -> None:
    ca = tmp_path / "nowhere" / "ca.pem"
    with pytest.raises(error, match=f"tls_ca {re.escape(str(ca))} does not exist; fix: "):
        client_context(ca, error=error)


def test_client_certificate_errors_name_the_setting(tmp_path: Path, tls: TlsFiles) -> None:
    ca = tls.ca.cert
    cert, key = astuple(tls.ca.client(tmp_path, "device"))
    other_key = tls.ca.client(tmp_path, "other").key
    error = edge_errors.ConfigError
    assert client_context(ca, cert, key, error=error) is not None
    with pytest.raises(error, match=r"tls_cert .* tls_key .*other\.key.* cannot load the client certificate"):
        client_context(ca, cert, other_key, error=error)
    with pytest.raises(error, match=r"tls_key .*missing\.key does not exist"):
        client_context(ca, cert, tmp_path / "missing.key", error=error)
    with pytest.raises(error, match="tls_key is set without tls_cert"):
        client_context(ca, None, key, error=error)


def test_an_encrypted_client_key_is_refused_without_prompting(tmp_path: Path, tls: TlsFiles) -> None:
    ca = tls.ca.cert
    cert, key = astuple(tls.ca.client(tmp_path, "device"))
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(bridge_errors.ConfigError, match=r"tls_key .*device\.key is encrypted; fix: "):
        client_context(ca, cert, key, error=bridge_errors.ConfigError)
