"""Command signing keys: `cloud-bridge keys generate --out DIR`, and loading the bridge's signer.

The private key (PKCS#8 PEM, mode 0600) stays with the cloud; devices get the public key as base64
in their `[ota] trusted_keys` table, under its key id.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

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
    """The signing key at `path` (raises SignatureError naming the file and the fix)."""
    key = load_private_key(Path(path))
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
    """Write a new key pair into `out_dir`; refuses to overwrite an existing private key."""
    private_path = Path(out_dir) / PRIVATE_KEY_FILE
    if private_path.exists():
        raise FileExistsError(
            f"{private_path} already exists: a new key would strand every device that trusts the old one; "
            "choose another --out directory"
        )
    key = generate_private_key()
    write_private_key(key, private_path)
    public = public_key_b64(key)
    key_id = key_id_of(key)
    public_path = Path(out_dir) / PUBLIC_KEY_FILE
    public_path.write_text(f"{key_id} {public}\n", encoding="utf-8")
    return GeneratedKey(private_path.resolve(), public_path.resolve(), public, key_id)


def add_subparsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="manage the Ed25519 key that signs commands to devices")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    gen = ksub.add_parser(
        "generate",
        help="create a signing key pair",
        description=f"Writes DIR/{PRIVATE_KEY_FILE} (private, mode 0600: keep it on the cloud side) and "
        f"DIR/{PUBLIC_KEY_FILE}, then prints the public key, its key id and the TOML snippets for the "
        "bridge ([ota] signing_key) and for devices ([ota.trusted_keys]).",
    )
    gen.add_argument("--out", type=Path, required=True, help="directory for the key files")
    gen.set_defaults(handler=_cli_generate)


def _cli_generate(args: argparse.Namespace) -> int:
    try:
        made = generate(args.out)
    except (FileExistsError, OSError, SignatureError) as exc:
        print(f"cloud-bridge keys generate: {exc}", file=sys.stderr)
        return 1
    print(f"private key: {made.private_path} (mode 0600, never copy it to a device)")
    print(f"public key:  {made.public_b64}")
    print(f"key id:      {made.key_id}")
    print("\n# bridge (cloud.toml): this line under [ota]")
    print(made.bridge_toml())
    print("# devices (edge.toml): this line under [ota.trusted_keys] (the last table of examples/edge.toml;")
    print(f'# add the header if your file lacks it), or EDGE_NODE__OTA__TRUSTED_KEYS="{made.key_id}={made.public_b64}"')
    print(made.device_toml())
    return 0
