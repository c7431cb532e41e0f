"""Command signing keys: generating a key pair (`cloud-bridge keys generate`), and loading the bridge's signer.

The private key (PKCS#8 PEM, mode 0600) stays with the cloud; devices get the public key as base64
in their `[ota] trusted_keys` table, under its key id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cloud_bridge.errors import ConfigError, SigningKeyError
from schemas.signing import (
    Ed25519PrivateKey,
    SignatureError,
    generate_private_key,
    key_id_of,
    load_private_key,
    public_key_b64,
    write_private_key,
)

PRIVATE_KEY_FILE = "command-signing.pem"
PUBLIC_KEY_FILE = "command-signing.pub"


@dataclass(frozen=True)
class Signer:
    key: Ed25519PrivateKey
    key_id: str


def load_signer(path: Path, key_id: str | None = None) -> Signer:
    """The signing key at `path`, the bridge's `[ota] signing_key`: a file that is not a usable key
    raises ConfigError naming it and the fix."""
    try:
        key = load_private_key(Path(path))
    except SignatureError as exc:
        raise ConfigError(f"[ota] signing_key: {exc}") from exc
    return Signer(key, key_id or key_id_of(key))


@dataclass(frozen=True)
class GeneratedKey:
    private_path: Path
    public_path: Path
    public_b64: str
    key_id: str

    def device_toml(self) -> str:
        """The line for a device's `[ota.trusted_keys]` table (examples/edge.toml ends with that table)."""
        return f'"{self.key_id}" = "{self.public_b64}"\n'

    def bridge_toml(self) -> str:
        """The line for the bridge's `[ota]` section."""
        return f'signing_key = "{self.private_path}"\n'


def generate(out_dir: Path) -> GeneratedKey:
    """Write a new key pair into `out_dir`; refuses to overwrite an existing private key
    (SigningKeyError, as for a directory that cannot be written)."""
    private_path = Path(out_dir) / PRIVATE_KEY_FILE
    if private_path.exists():
        raise SigningKeyError(
            f"{private_path} already exists: a new key would strand every device that trusts the old one; "
            "choose another --out directory"
        )
    public_path = Path(out_dir) / PUBLIC_KEY_FILE
    try:
        key = generate_private_key()
        write_private_key(key, private_path)
        public = public_key_b64(key)
        key_id = key_id_of(key)
        public_path.write_text(f"{key_id} {public}\n", encoding="utf-8")
    except (OSError, SignatureError) as exc:
        raise SigningKeyError(f"cannot write the key pair to {out_dir}: {exc}") from exc
    return GeneratedKey(private_path.resolve(), public_path.resolve(), public, key_id)
