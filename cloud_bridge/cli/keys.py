"""`cloud-bridge keys generate`: a new Ed25519 key pair for signing commands, and the config lines
that use it on the bridge and on devices."""

from __future__ import annotations

import argparse
from pathlib import Path

from cloud_bridge.cli.common import Commands, command
from cloud_bridge.ota.keys import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, generate


def add_subparsers(sub: Commands) -> None:
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
    command(gen, "keys generate", _generate)


def _generate(args: argparse.Namespace) -> int:
    made = generate(args.out)
    print(f"private key: {made.private_path} (mode 0600, never copy it to a device)")
    print(f"public key:  {made.public_b64}")
    print(f"key id:      {made.key_id}")
    print("\n# bridge (cloud.toml): this line under [ota]")
    print(made.bridge_toml())
    print("# devices (edge.toml): this line under [ota.trusted_keys] (the last table of examples/edge.toml;")
    print(f'# add the header if your file lacks it), or EDGE_NODE__OTA__TRUSTED_KEYS="{made.key_id}={made.public_b64}"')
    print(made.device_toml())
    return 0
