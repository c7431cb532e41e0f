"""The edge node's exception hierarchy."""

from __future__ import annotations


class EdgeError(Exception):
    """Base of every error the edge node raises on purpose."""


class ConfigError(EdgeError):
    """The configuration is invalid; the message names the key and the fix."""


class ModelLoadError(EdgeError):
    """The model file cannot be loaded or does not describe a classifier we can run."""


class InputRejected(EdgeError):
    """An input cannot be inferred on (shape, dtype, NaN/inf, undecodable). `reason` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")
