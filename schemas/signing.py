"""Ed25519 signatures over commands: the cloud signs, devices verify before acting.

The signature covers `canonical_bytes(command)` (every field but `signature`, keys sorted), so
any change to any field, including the target device, the expiry or the model hash, breaks it.
Keys: a private key is a PKCS#8 PEM file that never leaves the cloud; a public key travels as
base64 of its 32 raw bytes (fits in a TOML config); a key id defaults to a fingerprint of it.
Expiry and replay are the device's policy (edge_node/ota/guard.py), not part of the signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from schemas.codec import canonical_bytes
from schemas.errors import ContractError
from schemas.messages import Command

__all__ = [
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "SignatureError",
    "generate_private_key",
    "key_id_of",
    "load_private_key",
    "parse_public_key",
    "public_key_b64",
    "sign_command",
    "verify_command",
    "write_private_key",
]


class SignatureError(ContractError):
    """A command is unsigned, signed by an unknown key, or its signature does not verify.

    `code` is one of "unsigned", "unknown_key", "bad_signature", "bad_key" (for acks and counters)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def write_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Write a PKCS#8 PEM readable by the owner only; refuse to overwrite an existing key."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise SignatureError(
            "bad_key", f"signing key {path} does not exist: run `cloud-bridge keys generate`"
        ) from None
    except ValueError as exc:
        raise SignatureError("bad_key", f"signing key {path} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError("bad_key", f"signing key {path} is {type(key).__name__}, expected an Ed25519 key")
    return key


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A public key from base64 of its 32 raw bytes."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("bad_key", "public key is not valid base64") from None
    if len(raw) != 32:
        raise SignatureError("bad_key", f"public key is {len(raw)} bytes, an Ed25519 key is 32")
    return Ed25519PublicKey.from_public_bytes(raw)


def key_id_of(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """A short stable fingerprint: the first 16 hex digits of sha256 over the raw public key."""
    return "ed25519:" + hashlib.sha256(base64.b64decode(public_key_b64(key))).hexdigest()[:16]


def sign_command(command: Command, key: Ed25519PrivateKey, key_id: str | None = None) -> Command:
    """A copy of `command` with `key_id` set and its signature filled in."""
    unsigned = msgspec.structs.replace(command, key_id=key_id or key_id_of(key), signature="")
    signature = key.sign(canonical_bytes(unsigned))
    return msgspec.structs.replace(unsigned, signature=base64.b64encode(signature).decode())


def verify_command(command: Command, trusted: Mapping[str, Ed25519PublicKey]) -> None:
    """Return if `command` is signed by one of the `trusted` keys (by key id), else raise SignatureError."""
    if not command.signature:
        raise SignatureError("unsigned", f"command {command.cmd_id} carries no signature")
    public = trusted.get(command.key_id)
    if public is None:
        known = ", ".join(sorted(trusted)) or "none configured"
        raise SignatureError(
            "unknown_key", f"command {command.cmd_id} is signed by key {command.key_id!r}, trusted: {known}"
        )
    try:
        signature = base64.b64decode(command.signature, validate=True)
        public.verify(signature, canonical_bytes(command))
    except (binascii.Error, ValueError, InvalidSignature):
        raise SignatureError(
            "bad_signature", f"command {command.cmd_id}: signature does not verify with key {command.key_id!r}"
        ) from None
