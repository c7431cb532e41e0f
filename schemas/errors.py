"""The one exception hierarchy of the wire contract."""

from __future__ import annotations


class ContractError(Exception):
    """Base of every error raised by schemas/."""


class TopicError(ContractError, ValueError):
    """A topic, fleet id or device id does not follow the topic layout."""


class DecodeError(ContractError, ValueError):
    """A payload is not a valid message: says which field (a JSON path) and why.

    Raised for malformed JSON, oversized payloads, a wrong or unknown `schema` name/version,
    wrong types or values out of range, and a payload whose fleet/device does not match its topic.
    """

    def __init__(self, reason: str, *, field: str = "$", schema: str | None = None) -> None:
        self.reason = reason
        self.field = field
        self.schema = schema
        where = f" at {field}" if field else ""
        expected = f" (expected {schema})" if schema else ""
        super().__init__(f"invalid message{expected}{where}: {reason}")


class TensorError(DecodeError):
    """A tensor's dtype, shape and data disagree, or it holds NaN/inf."""
