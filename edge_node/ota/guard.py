"""The command guard: whether a command from the cloud may run on this device.

A command is acted on only if it is signed by a trusted key (schemas/signing.py), addressed to this
device, within its validity (with `max_clock_skew_s`), and not a replay: accepted cmd_ids are
remembered durably in `state_dir/accepted_commands.json` (written atomically), and a command issued
more than `replay_window_s` before the newest accepted one is refused too (its id may have been
forgotten). Every refusal raises CommandRejected with its code (unsigned, unknown_key,
bad_signature, bad_key, wrong_device, expired, not_yet_valid, replayed), counted by code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.files import write_atomic
from edge_node.errors import CommandRejected
from schemas.messages import Command
from schemas.signing import Ed25519PublicKey, SignatureError, parse_public_key, verify_command

log = logging.getLogger(__name__)

_ACCEPTED_FILE = "accepted_commands.json"


def trusted_keys(config: Mapping[str, str]) -> dict[str, Ed25519PublicKey]:
    """The `[ota] trusted_keys` table (key id -> base64 public key) as keys to verify with."""
    return {key_id: parse_public_key(text) for key_id, text in config.items()}


@dataclass(frozen=True)
class GuardPolicy:
    fleet_id: str
    device_id: str
    max_clock_skew_s: float = 300.0
    replay_window_s: float = 7 * 24 * 3600.0


class CommandGuard:
    """Decides whether a command may run, and remembers the accepted ones across restarts."""

    def __init__(self, state_dir: Path, trusted: Mapping[str, Ed25519PublicKey], policy: GuardPolicy) -> None:
        self._path = Path(state_dir) / _ACCEPTED_FILE
        self._trusted = dict(trusted)
        self._policy = policy
        self._accepted: dict[str, float] = {}
        self._newest = 0.0
        self.rejected: Counter[str] = Counter()
        self._load()

    def _load(self) -> None:
        try:
            body = json.loads(self._path.read_text(encoding="utf-8"))
            self._accepted = {str(k): float(v) for k, v in body["accepted"].items()}
            self._newest = float(body["newest_issued_at"])
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Refusing everything forever would brick the device; the window rule still guards replays
            # of old commands once a new one is accepted.
            log.error("replay record %s is unreadable (%s): starting a new one", self._path, exc)

    def check(self, command: Command, now: float | None = None) -> None:
        """Return if `command` may run, else raise CommandRejected (counted by code)."""
        try:
            self._check(command, time.time() if now is None else now)
        except CommandRejected as exc:
            self.rejected[exc.code] += 1
            raise

    def verify_signature(self, command: Command) -> None:
        try:
            verify_command(command, self._trusted)
        except SignatureError as exc:
            raise CommandRejected(exc.code, str(exc)) from None

    def _check(self, command: Command, now: float) -> None:
        self.verify_signature(command)
        p = self._policy
        if (command.fleet_id, command.device_id) != (p.fleet_id, p.device_id):
            raise CommandRejected(
                "wrong_device",
                f"command {command.cmd_id} is for {command.fleet_id}/{command.device_id}, "
                f"this is {p.fleet_id}/{p.device_id}",
            )
        if now > command.expires_at + p.max_clock_skew_s:
            raise CommandRejected("expired", f"command {command.cmd_id} expired {now - command.expires_at:.0f}s ago")
        if command.issued_at > now + p.max_clock_skew_s:
            raise CommandRejected(
                "not_yet_valid",
                f"command {command.cmd_id} is issued {command.issued_at - now:.0f}s in the future: "
                "check the device's clock",
            )
        if command.cmd_id in self._accepted:
            raise CommandRejected("replayed", f"command {command.cmd_id} was already accepted")
        if command.issued_at < self._newest - p.replay_window_s:
            raise CommandRejected(
                "replayed",
                f"command {command.cmd_id} was issued {self._newest - command.issued_at:.0f}s before the newest "
                f"accepted command (window {p.replay_window_s:.0f}s)",
            )

    async def accept(self, command: Command) -> None:
        """Remember `command` durably (call before acting on it)."""
        self._accepted[command.cmd_id] = command.issued_at
        self._newest = max(self._newest, command.issued_at)
        horizon = self._newest - self._policy.replay_window_s
        # Older ids are refused by the window rule anyway: the record stays bounded.
        self._accepted = {k: v for k, v in self._accepted.items() if v >= horizon}
        body = {"newest_issued_at": self._newest, "accepted": dict(self._accepted)}
        await asyncio.to_thread(write_atomic, self._path, json.dumps(body).encode(), parents=True)
