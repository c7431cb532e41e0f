"""Ed25519 command signatures: what a device must accept and what it must refuse."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest

from schemas import Command, Topics, decode_for_topic, encode, new_msg_id
from schemas.signing import (
    SignatureError,
    generate_private_key,
    key_id_of,
    load_private_key,
    parse_public_key,
    public_key_b64,
    sign_command,
    verify_command,
    write_private_key,
)


def _command(device_id: str = "dev-1") -> Command:
    now = time.time()
    return Command(
        msg_id=new_msg_id(),
        fleet_id="f1",
        device_id=device_id,
        ts=now,
        cmd_id=new_msg_id(),
        action="ping",
        issued_at=now,
        expires_at=now + 60,
        key_id="unset",
    )


def test_signed_command_verifies_after_a_wire_round_trip(tmp_path: Path) -> None:
    key = generate_private_key()
    write_private_key(key, tmp_path / "signing.pem")
    loaded = load_private_key(tmp_path / "signing.pem")
    signed = sign_command(_command(), loaded)
    assert signed.key_id == key_id_of(key)
    topics = Topics()
    received = decode_for_topic(topics, "fleet/f1/dev-1/cmd", encode(signed))
    assert isinstance(received, Command)
    verify_command(received, {signed.key_id: parse_public_key(public_key_b64(key))})
    assert (tmp_path / "signing.pem").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"device_id": "dev-2"}, "bad_signature"),
        ({"expires_at": 1e12}, "bad_signature"),
        ({"signature": ""}, "unsigned"),
        ({"signature": "not base64!"}, "bad_signature"),
        ({"key_id": "someone-else"}, "unknown_key"),
    ],
)
def test_tampered_or_unsigned_commands_are_refused(change: dict[str, object], code: str) -> None:
    key = generate_private_key()
    signed = sign_command(_command(), key)
    tampered = msgspec.structs.replace(signed, **change)
    with pytest.raises(SignatureError) as err:
        verify_command(tampered, {key_id_of(key): key.public_key()})
    assert err.value.code == code


def test_a_key_that_is_not_trusted_does_not_verify() -> None:
    mine, theirs = generate_private_key(), generate_private_key()
    forged = sign_command(_command(), theirs, key_id=key_id_of(mine))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_command(forged, {key_id_of(mine): mine.public_key()})


def test_key_files_are_never_overwritten_and_bad_keys_name_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    write_private_key(generate_private_key(), path)
    with pytest.raises(FileExistsError):
        write_private_key(generate_private_key(), path)
    with pytest.raises(SignatureError, match="keys generate"):
        load_private_key(tmp_path / "missing.pem")
    with pytest.raises(SignatureError, match="32"):
        parse_public_key("YWJj")
