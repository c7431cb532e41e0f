"""Every error the edge node raises on purpose, in one tree: catch `EdgeError` to catch them all.

    EdgeError
    ├── ConfigError            the config file or environment is wrong; the message names the key
    ├── ModelLoadError         a model file cannot be loaded or is not a classifier
    ├── InputRejected          one input is malformed (shape, dtype, NaN); it is counted, not fatal
    ├── IntakeFull             the pipeline is behind its sources; the source drops and counts
    ├── OutboxError            the durable outbox
    │   ├── OutboxFullError        storing would evict higher-priority messages
    │   ├── OutboxUnavailableError the file cannot be opened or written (path, disk full, I/O)
    │   ├── OutboxCorruptError     the file failed its integrity check
    │   └── OutboxClosedError      the outbox was closed
    ├── ConnectFailure         one failed connection attempt to the broker (`kind` says why)
    ├── CommandRejected        a command failed its signature, freshness or addressing (`code`)
    ├── DownloadError          a model download cannot succeed as asked (`code`)
    ├── Unhealthy              a new model failed its health check (the message says which)
    └── SlotError              the A/B slot files cannot be read or written

Each message says what failed and where; the CLIs print it with the fix and exit non-zero.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Root of the edge node's errors."""


class ConfigError(EdgeError):
    """The configuration is invalid; the message names the key and how to fix it."""


class ModelLoadError(EdgeError):
    """The model file cannot be loaded or does not describe a classifier we can run."""


class InputRejected(EdgeError):
    """An input cannot be inferred on (shape, dtype, NaN/inf, undecodable). `reason` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class IntakeFull(EdgeError):
    """`put_nowait` found no room: the pipeline is behind its sources."""


class OutboxError(EdgeError):
    """Base class of every error raised by the outbox."""


class OutboxFullError(OutboxError):
    """The message cannot be stored without evicting rows of a higher priority (or CONTROL rows)."""


class OutboxUnavailableError(OutboxError):
    """The outbox file cannot be opened or written (read-only path, disk full, I/O error)."""


class OutboxCorruptError(OutboxError):
    """The outbox file failed its integrity check."""


class OutboxClosedError(OutboxError):
    """The outbox was closed."""


class ConnectFailure(EdgeError):
    """One failed connection attempt; `kind` is dns | refused | tls | auth | protocol | timeout | network."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class CommandRejected(EdgeError):
    """A command was refused; `code` goes into the `rejected` ack (e.g. bad_signature, expired)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


class DownloadError(EdgeError):
    """A download cannot succeed as asked; `code` goes into the failure ack's reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class Unhealthy(EdgeError):
    """One health check failed; the message says which and by how much."""


class SlotError(EdgeError):
    """The slot files or state cannot be written or read; the message names the path."""
