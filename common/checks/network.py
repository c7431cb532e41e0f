"""Network: a TCP connection, and a TLS handshake with the certificates' dates (server and client)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import ssl
from pathlib import Path

from cryptography import x509

from common.checks.report import Finding, Status
from common.mqtt import classify_error

EXPIRY_WARN_DAYS = 30
# OpenSSL's verify codes of a certificate outside its dates, and of a chain no configured CA signed.
_NOT_YET_VALID, _EXPIRED = 9, 10
_UNKNOWN_ISSUER = frozenset({2, 18, 19, 20, 21})
_HOSTNAME_MISMATCH = 62

NETWORK_FIX = {
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
    fix = NETWORK_FIX.get(failure.kind, NETWORK_FIX["network"]).format(section=section, where=where)
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
        fix = NETWORK_FIX.get(failure.kind, NETWORK_FIX["network"]).format(section=section, where=where)
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
