"""Every certificate the tests use, from one place.

* The shipped generator, scripts/gen-certs.sh, for the tests of the shipped brokers and compose: CA,
  cloud broker certificate, gateway client certificate, password file and credentials.env. `make_pki`
  runs it; the `pki` fixture (tests/plugin_pki.py) runs it once per session for every account the
  tests use.
* A throwaway CA made with `cryptography` (EC P-256, valid for a day) for the TLS tests of the link,
  the bridge and common/tls.py: it issues server certificates for 127.0.0.1 and client certificates
  into any folder; the `tls` fixture holds one CA, its broker certificate and an unrelated CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parent.parent
GEN_CERTS = REPO / "scripts" / "gen-certs.sh"
GATEWAY = "gateway-01"
BRIDGE = "cloud-bridge"

# ---- the shipped generator -----------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """What scripts/gen-certs.sh wrote: CA, server cert, gateway client certs, passwords by account."""

    dir: Path
    passwords: dict[str, str]

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def password(self, account: str) -> str:
        return self.passwords[account]


def env_name(account: str) -> str:
    """The credentials.env variable of an account, as gen-certs.sh names it."""
    return "".join(c if c.isalnum() else "_" for c in account.upper()) + "_MQTT_PASSWORD"


def make_pki(out: Path, devices: list[str]) -> Pki:
    """Run the shipped generator (again, if `out` exists: it adds what is missing); return its outputs."""
    subprocess.run(
        ["bash", str(GEN_CERTS), "-o", str(out), "-d", ",".join(devices), "-g", GATEWAY, "-b", BRIDGE],
        check=True,
        capture_output=True,
        timeout=60,
    )
    values = dict(
        line.split("=", 1) for line in (out / "credentials.env").read_text(encoding="utf-8").splitlines() if line
    )
    passwords = {account: values[env_name(account)] for account in [BRIDGE, *devices]}
    return Pki(out, passwords)


# ---- a throwaway CA --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """A PEM certificate and its unencrypted PEM key."""

    cert: Path
    key: Path


class ThrowawayCa:
    """A CA whose certificate (`cert`) and key are PEM files `<name>-ca.pem` / `<name>-ca.key` in `folder`."""

    def __init__(self, folder: Path, name: str) -> None:
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(name)
        self._cert = (
            _builder(subject, subject, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.cert, self.key = _write(folder, f"{name}-ca", self._cert, self._key)

    def server(self, folder: Path, name: str = "server", ips: tuple[str, ...] = ("127.0.0.1",)) -> Issued:
        """A broker certificate for `ips` (and DNS localhost): what a client checking hostnames accepts."""
        names: list[x509.GeneralName] = [x509.DNSName("localhost")]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        return self._issue(folder, name, ExtendedKeyUsageOID.SERVER_AUTH, x509.SubjectAlternativeName(names))

    def client(self, folder: Path, name: str) -> Issued:
        """A client certificate with CN `name`."""
        return self._issue(folder, name, ExtendedKeyUsageOID.CLIENT_AUTH, None)

    def _issue(
        self,
        folder: Path,
        name: str,
        usage: x509.ObjectIdentifier,
        alt_names: x509.SubjectAlternativeName | None,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        ca_ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            _builder(_name(name), self._cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        )
        if alt_names is not None:
            builder = builder.add_extension(alt_names, critical=False)
        cert, key_path = _write(folder, name, builder.sign(self._key, hashes.SHA256()), key)
        return Issued(cert, key_path)


@dataclass(frozen=True)
class TlsFiles:
    """One CA with a broker certificate for 127.0.0.1, and a CA that signed nothing the broker has."""

    ca: ThrowawayCa
    server: Issued
    other_ca: ThrowawayCa

    def listener_lines(self) -> tuple[str, ...]:
        """The mosquitto listener settings that serve `server` (`Mosquitto.add_listener(lines=...)`)."""
        return (f"cafile {self.ca.cert}", f"certfile {self.server.cert}", f"keyfile {self.server.key}")


def make_tls_files(folder: Path) -> TlsFiles:
    ca = ThrowawayCa(folder, "edgefleet-test")
    return TlsFiles(ca, ca.server(folder, "broker"), ThrowawayCa(folder, "unrelated"))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path
