"""`check` for both programs: findings, the report, and the probes both need.

A diagnosis is a `Checklist` of `Finding`s, one per check, in the order they ran: `ok`, `warn` or
`fail` with what was found and, for warn and fail, the fix; `skip` when the check could not run
because one it needs failed (no broker login without a TCP connection). `render` prints one line
per finding; the program exits non-zero when any failed.

The probes look and do not change anything (a directory is written to with a temporary file that
is removed at once): a directory writable and its free disk, a TCP connection, a TLS handshake with
the server certificate's dates (and a client certificate file's), and an MQTT login whose connection
(`MqttProbe`) the later checks use to subscribe, publish and receive. Connection failures are
classified by common/mqtt.py, as the programs' own links classify them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import shutil
import socket
import ssl
import tempfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from cryptography import x509
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from common.mqtt import Failure, LoopDriver, classify_connack, classify_error, connect_properties, new_client

Status = Literal["ok", "warn", "fail", "skip"]
EXPIRY_WARN_DAYS = 30
_MIB = 1024 * 1024
# OpenSSL's verify codes of a certificate outside its dates, and of a chain no configured CA signed.
_NOT_YET_VALID, _EXPIRED = 9, 10
_UNKNOWN_ISSUER = frozenset({2, 18, 19, 20, 21})
_HOSTNAME_MISMATCH = 62


@dataclass(frozen=True)
class Finding:
    """One check's outcome: `found` says what was seen, `fix` what to change (warn and fail)."""

    name: str
    status: Status
    found: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name}: {self.found}"
        return f"{text}; fix: {self.fix}" if self.fix else text


@dataclass
class Checklist:
    """The findings of one diagnosis, in order; later checks ask `passed` about earlier ones."""

    findings: list[Finding] = field(default_factory=list)

    def add(self, finding: Finding) -> Finding:
        self.findings.append(finding)
        return finding

    def ok(self, name: str, found: str) -> Finding:
        return self.add(Finding(name, "ok", found))

    def warn(self, name: str, found: str, fix: str) -> Finding:
        return self.add(Finding(name, "warn", found, fix))

    def fail(self, name: str, found: str, fix: str) -> Finding:
        return self.add(Finding(name, "fail", found, fix))

    def skip(self, name: str, because: str) -> Finding:
        return self.add(Finding(name, "skip", f"not run: {because}"))

    def skip_all(self, names: Iterable[str], because: str) -> None:
        for name in names:
            self.skip(name, because)

    def status(self, name: str) -> Status | None:
        found = [f.status for f in self.findings if f.name == name]
        return found[-1] if found else None

    def passed(self, name: str) -> bool:
        """True when the check `name` ran and did not fail (ok or warn)."""
        return self.status(name) in ("ok", "warn")

    @property
    def failed(self) -> bool:
        return any(f.status == "fail" for f in self.findings)


def render(findings: Iterable[Finding]) -> str:
    """One line per finding, then a count of each status."""
    findings = list(findings)
    counts = {s: sum(1 for f in findings if f.status == s) for s in ("ok", "warn", "fail", "skip")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return "\n".join([*(f.line() for f in findings), summary]) + "\n"


def size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


# ---- disk -----------------------------------------------------------------------------------
def probe_dir(name: str, path: Path, setting: str, *, need_bytes: int = 0) -> Finding:
    """Whether the program can write in `path` (created at start when missing: then its nearest
    existing parent must be writable), and whether the disk has `need_bytes` free."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return Finding(
            name, "fail", f"{path}: {existing} is a file, not a directory", f"point {setting} at a directory"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".check-") as probe:
            probe.write(b"check")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        who = f"uid {os.geteuid()}"
        return Finding(
            name,
            "fail",
            f"cannot write in {existing} ({exc.strerror or exc})",
            f"make {existing} writable for {who} (chmod/chown; `lsattr -d` shows an immutable flag), "
            f"or point {setting} elsewhere",
        )
    free = shutil.disk_usage(existing).free
    where = (
        f"{path} writable" if existing == path else f"{path} does not exist yet (made at start in {existing}: writable)"
    )
    if free < need_bytes:
        return Finding(
            name,
            "warn",
            f"{where}, {size(free)} free: less than the {size(need_bytes)} it may fill",
            f"free disk space on {existing}, or lower the bound",
        )
    if free < 16 * _MIB:
        return Finding(name, "warn", f"{where}, only {size(free)} free", f"free disk space on {existing}")
    return Finding(name, "ok", f"{where}, {size(free)} free")


# ---- network --------------------------------------------------------------------------------
_NETWORK_FIX = {
    "dns": "check {section} host (the name does not resolve here)",
    "refused": "nothing listens on {where}: start the broker, or fix {section} host and port",
    "timeout": "{where} does not answer: check the address, and that no firewall drops the traffic",
    "network": "check the network path to {where} and {section} host and port",
}


async def probe_tcp(name: str, host: str, port: int, section: str, *, timeout_s: float = 5.0) -> Finding:
    """Whether a TCP connection to host:port opens."""
    where = f"{host}:{port}"
    try:
        async with asyncio.timeout(timeout_s):
            _reader, writer = await asyncio.open_connection(host, port)
    except TimeoutError as exc:
        failure = classify_error(exc)
    except OSError as exc:
        failure = classify_error(exc)
    else:
        writer.close()
        with contextlib.suppress(OSError):  # the server hung up first: the connection did open
            await writer.wait_closed()
        return Finding(name, "ok", f"{where} accepts TCP connections")
    fix = _NETWORK_FIX.get(failure.kind, _NETWORK_FIX["network"]).format(section=section, where=where)
    return Finding(name, "fail", f"{where}: {failure.detail}", fix)


def _when(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(no subject)"


def _dates(what: str, cert: x509.Certificate, now: dt.datetime, fix_expired: str) -> tuple[Status, str, str]:
    """Status, description and fix of a certificate's validity dates at `now`."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    desc = f"{what} {_subject(cert)}"
    if now < start:
        return (
            "fail",
            f"{desc} is not valid before {_when(start)} (now {_when(now)})",
            "set this machine's clock right (NTP), or use a certificate valid now",
        )
    if now >= end:
        return "fail", f"{desc} expired on {_when(end)}", fix_expired
    days = (end - now).days
    if days < EXPIRY_WARN_DAYS:
        return "warn", f"{desc} expires in {days} days ({_when(end)})", fix_expired
    return "ok", f"{desc} valid until {_when(end)} ({days} days)", ""


def probe_cert_file(name: str, path: Path, setting: str) -> Finding:
    """The validity dates of a PEM certificate file (this program's client certificate)."""
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        return Finding(name, "fail", f"{path} is not a readable PEM certificate ({exc})", f"point {setting} at one")
    now = dt.datetime.now(dt.UTC)
    status, found, fix = _dates(f"{setting} {path}:", cert, now, "renew the client certificate and replace the file")
    return Finding(name, status, found, fix)


def _handshake(host: str, port: int, context: ssl.SSLContext, timeout_s: float) -> bytes:
    with (
        socket.create_connection((host, port), timeout=timeout_s) as sock,
        context.wrap_socket(sock, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("the server sent no certificate")
    return der


def _unverified_cert(host: str, port: int, timeout_s: float) -> x509.Certificate | None:
    """The server's certificate without verifying it: to say what is wrong with it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        return x509.load_der_x509_certificate(_handshake(host, port, context, timeout_s))
    except (OSError, ValueError):
        return None


async def probe_tls(
    name: str, host: str, port: int, context: ssl.SSLContext, section: str, *, timeout_s: float = 5.0
) -> Finding:
    """A TLS handshake as the program makes it; the server certificate's dates and, when it fails,
    why (expired, not yet valid, signed by another CA, another host name, no TLS at all)."""
    where = f"{host}:{port}"
    try:
        der = await asyncio.to_thread(_handshake, host, port, context, timeout_s)
    except ssl.SSLCertVerificationError as exc:
        cert = await asyncio.to_thread(_unverified_cert, host, port, timeout_s)
        return _verify_failure(name, where, exc, cert, section)
    except ssl.SSLError as exc:
        return Finding(
            name,
            "fail",
            f"TLS handshake with {where} failed ({exc.reason or exc})",
            f"{where} may not speak TLS (use the broker's TLS port, often 8883), or it wants a client "
            f"certificate: set {section} tls_cert and tls_key",
        )
    except OSError as exc:
        failure = classify_error(exc)
        fix = _NETWORK_FIX.get(failure.kind, _NETWORK_FIX["network"]).format(section=section, where=where)
        return Finding(name, "fail", f"{where}: {failure.detail}", fix)
    cert = x509.load_der_x509_certificate(der)
    status, found, fix = _dates(
        "server certificate", cert, dt.datetime.now(dt.UTC), f"renew the certificate of the broker at {where}"
    )
    return Finding(name, status, f"{found}, issued by {cert.issuer.rfc4514_string()}", fix)


def _verify_failure(
    name: str, where: str, exc: ssl.SSLCertVerificationError, cert: x509.Certificate | None, section: str
) -> Finding:
    said = exc.verify_message or str(exc)
    if cert is not None and exc.verify_code in (_EXPIRED, _NOT_YET_VALID):
        _status, found, fix = _dates(
            "server certificate", cert, dt.datetime.now(dt.UTC), f"renew the certificate of the broker at {where}"
        )
        return Finding(name, "fail", f"{where}: {found}", fix)
    if exc.verify_code in _UNKNOWN_ISSUER:
        issuer = f" (its issuer: {cert.issuer.rfc4514_string()})" if cert is not None else ""
        return Finding(
            name,
            "fail",
            f"{where}: the server certificate is not signed by {section} tls_ca: {said}{issuer}",
            f"point {section} tls_ca at the CA certificate that signed the broker's certificate",
        )
    if exc.verify_code == _HOSTNAME_MISMATCH:
        subject = f" ({_subject(cert)})" if cert is not None else ""
        return Finding(
            name,
            "fail",
            f"{where}: the server certificate is for another host name{subject}: {said}",
            f"set {section} host to a name the certificate lists, or reissue the certificate for this name",
        )
    return Finding(name, "fail", f"{where}: certificate verification failed: {said}", f"check {section} tls_ca")


# ---- MQTT -----------------------------------------------------------------------------------
_LOGIN_FIX = {
    "auth": "check {section} username and password (the broker's password file: mosquitto_passwd)",
    "protocol": 'the broker does not speak this MQTT version: set {section} protocol = "mqtt311"',
    "broker": "read the broker's log for why it refused the client",
    "tls": "check {section} tls_ca, tls_cert and tls_key",
}


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    properties: Properties | None


class MqttProbe:
    """One logged-in MQTT connection for the checks: subscribe, publish QoS 1, wait for a message.

    Its client id is the program's with a random suffix, so that it does not take over the running
    program's session (clean start, no session kept).
    """

    def __init__(self, client: mqtt.Client, driver: LoopDriver, v5: bool) -> None:
        self.client = client
        self.v5 = v5
        self._driver = driver
        self._loop = asyncio.get_running_loop()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._messages: asyncio.Queue[Received] = asyncio.Queue()
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish

    @classmethod
    async def connect(
        cls,
        *,
        host: str,
        port: int,
        client_id: str,
        username: str | None,
        password: str | None,
        tls: ssl.SSLContext | None,
        v5: bool,
        timeout_s: float = 10.0,
    ) -> MqttProbe | Failure:
        """Log in; the connection, or why the broker (or the network) refused it."""
        probe_id = f"{client_id}-check-{uuid.uuid4().hex[:6]}"
        client = new_client(
            client_id=probe_id,
            v5=v5,
            persistent=False,
            username=username,
            password=password,
            tls=tls,
            connect_timeout_s=timeout_s,
        )
        loop = asyncio.get_running_loop()
        connack: asyncio.Future[ReasonCode] = loop.create_future()

        def on_connect(_c: mqtt.Client, _u: Any, _flags: Any, reason: ReasonCode, _props: Any) -> None:
            if not connack.done():
                connack.set_result(reason)

        def on_closed() -> None:
            if not connack.done():
                connack.set_exception(ConnectionResetError("the broker closed the connection before its CONNACK"))

        client.on_connect = on_connect
        driver = LoopDriver(client, misc_interval_s=1.0, reads_per_wakeup=16, on_closed=on_closed)
        props = connect_properties(session_expiry_s=0) if v5 else None
        try:
            await driver.connect(host, port, 30, clean_start=True if v5 else None, properties=props)
            async with asyncio.timeout(timeout_s):
                reason = await connack
        except TimeoutError as exc:
            driver.abort()
            return classify_error(exc)
        except OSError as exc:
            driver.abort()
            return classify_error(exc)
        if reason.is_failure:
            driver.abort()
            return classify_connack(reason)
        return cls(client, driver, v5)

    async def subscribe(self, topic: str, timeout_s: float = 5.0) -> bool:
        """Subscribe at QoS 1; False when the broker refused (e.g. its ACL)."""
        result, mid = self.client.subscribe(topic, qos=1)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            return False
        granted: list[ReasonCode] = await self._wait(mid, timeout_s)
        return not any(r.is_failure for r in granted)

    async def publish(
        self, topic: str, payload: bytes, *, properties: Properties | None = None, timeout_s: float = 5.0
    ) -> None:
        """Publish at QoS 1 and wait for the PUBACK."""
        info = self.client.publish(topic, payload, qos=1, properties=properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        await self._wait(info.mid, timeout_s)

    async def receive(self, match: Callable[[Received], bool], timeout_s: float) -> Received | None:
        """The first message `match` accepts within `timeout_s`, else None."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    message = await self._messages.get()
                    if match(message):
                        return message
        except TimeoutError:
            return None

    async def close(self) -> None:
        if self._driver.attached:
            self.client.disconnect()
            await asyncio.sleep(0)  # let the loop write the DISCONNECT
        self._driver.abort()

    async def _wait(self, mid: int, timeout_s: float) -> Any:
        future = self._pending.setdefault(mid, self._loop.create_future())
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        finally:
            self._pending.pop(mid, None)

    def _done(self, mid: int, value: Any) -> None:
        future = self._pending.setdefault(mid, self._loop.create_future())
        if not future.done():
            future.set_result(value)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        self._done(mid, list(reasons))

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _reason: Any, _p: Any) -> None:
        self._done(mid, None)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.qos > 0:
            client.ack(msg.mid, msg.qos)
        self._messages.put_nowait(Received(msg.topic, bytes(msg.payload), getattr(msg, "properties", None)))


def login_finding(name: str, result: MqttProbe | Failure, who: str, section: str) -> Finding:
    """The finding of an MQTT login (`who`: the user and broker, for the message)."""
    if isinstance(result, MqttProbe):
        version = "MQTT 5" if result.v5 else "MQTT 3.1.1"
        return Finding(name, "ok", f"{who}: login accepted ({version})")
    fix = _LOGIN_FIX.get(result.kind) or _NETWORK_FIX.get(result.kind, _NETWORK_FIX["network"])
    return Finding(name, "fail", f"{who}: {result.detail}", fix.format(section=section, where=who))
