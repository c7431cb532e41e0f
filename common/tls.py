"""The TLS client context every MQTT client of the project uses (edge link, bridge, aiomqtt tools).

One function, so that every client verifies the broker the same way: against the configured CA
file only (or the system's CAs when none is set), with the host name checked, and presenting a
client certificate when one is configured. The files are read once, when the client is set up: a
missing or malformed file is a configuration error that names the setting, the file and the fix,
raised as the caller's own error type, rather than an `ssl` traceback at every reconnect.
"""

from __future__ import annotations

import errno
import os
import ssl
from pathlib import Path
from typing import NoReturn


def client_context(
    ca: str | Path | None,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    *,
    error: type[Exception],
    check_hostname: bool = True,
    section: str = "[mqtt]",
) -> ssl.SSLContext:
    """A client context that verifies the server against `ca` (PEM file; None: the system's CAs).

    `cert` (PEM) is presented as the client certificate, with its private key from `key`, or from
    `cert` itself when `key` is None. `error` is the exception type raised for an unusable file (the
    caller's configuration error); its message names `{section} tls_ca` / `tls_cert` / `tls_key`.
    Encrypted private keys are refused: nobody is at a terminal to type the password.
    """
    if key is not None and cert is None:
        raise error(f"{section} tls_key is set without tls_cert: set both (the client certificate and its key)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, host name checked
    context.check_hostname = check_hostname
    if ca is None:
        context.load_default_certs()
    else:
        try:
            context.load_verify_locations(cafile=os.fspath(ca))
        except ssl.SSLError as err:
            raise error(
                f"{section} tls_ca {ca} holds no PEM CA certificate ({_reason(err)}); fix: point tls_ca at the"
                " CA certificate that signed the broker's certificate, in PEM (-----BEGIN CERTIFICATE-----)"
            ) from err
        except OSError as err:
            _unreadable(error, section, "tls_ca", ca, err, "the CA certificate that signed the broker's certificate")
    if cert is not None:
        for setting, path in (("tls_cert", cert), ("tls_key", key)):
            if path is not None and not Path(path).is_file():
                what = "this device's client certificate" if setting == "tls_cert" else "its private key"
                _unreadable(error, section, setting, path, FileNotFoundError(errno.ENOENT, "not a file"), what)
        try:
            context.load_cert_chain(os.fspath(cert), None if key is None else os.fspath(key), password=_no_password)
        except _EncryptedKeyError as err:
            raise error(
                f"{section} tls_key {key or cert} is encrypted; fix: store the client key unencrypted"
                " (openssl pkey -in KEY -out KEY.plain) and protect it with file permissions"
            ) from err
        except ssl.SSLError as err:
            raise error(
                f"{section} tls_cert {cert} / tls_key {key or cert}: cannot load the client certificate and"
                f" key ({_reason(err)}); fix: tls_cert must be a PEM certificate and tls_key its matching"
                " PEM private key"
            ) from err
        except OSError as err:
            _unreadable(error, section, "tls_cert", cert, err, "this device's client certificate")
    return context


class _EncryptedKeyError(Exception):
    pass


def _no_password() -> bytes:
    # Called by OpenSSL only for an encrypted key; without it, OpenSSL would prompt on the terminal.
    raise _EncryptedKeyError


def _reason(err: ssl.SSLError) -> str:
    return str(err.reason or err.strerror or err)


def _unreadable(
    error: type[Exception], section: str, setting: str, path: str | Path, err: OSError, what: str
) -> NoReturn:
    if isinstance(err, FileNotFoundError):
        problem = "does not exist"
    elif isinstance(err, IsADirectoryError):
        problem = "is a directory"
    elif isinstance(err, PermissionError):
        problem = f"is not readable by this process (uid {os.geteuid()})"
    else:
        problem = f"cannot be read ({err.strerror or err})"
    raise error(f"{section} {setting} {path} {problem}; fix: point {setting} at {what}, in PEM") from err
