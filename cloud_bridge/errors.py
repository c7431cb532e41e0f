"""Every error the cloud bridge raises on purpose, in one tree: catch `BridgeError` to catch them all.

    BridgeError
    ├── ConfigError            the config file or environment is wrong; the message names the key
    ├── MqttError              the broker refused us, or a publish/subscribe could not be sent
    ├── ModelError             the cloud model file cannot answer escalations (metadata, shape)
    ├── ReferenceModelError    a `[drift] reference_models` entry cannot be used
    ├── ModelStoreError        a model cannot be registered or found
    ├── QuantizeError          quantization cannot proceed (input, calibration, budget)
    ├── RolloutError           a rollout cannot be started or changed
    └── ExportError            a sample export cannot proceed

Errors that are also a kind of ValueError or RuntimeError keep that base, so callers that caught the
builtin still do. Each message says what failed and how to fix it; the CLI prints it and exits 1.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Root of the cloud bridge's errors."""


class ConfigError(BridgeError, ValueError):
    """The configuration is invalid: the message names the key and the fix."""


class MqttError(BridgeError, RuntimeError):
    """The broker refused us, or a publish/subscribe could not be sent."""


class ModelError(BridgeError, RuntimeError):
    """The cloud model file cannot be used (missing metadata, wrong shape)."""


class ReferenceModelError(BridgeError, ValueError):
    """A `[drift] reference_models` entry cannot be used: the message names the file and the fix."""


class ModelStoreError(BridgeError, ValueError):
    """A model cannot be registered or found: the message says which and what to do."""


class QuantizeError(BridgeError, ValueError):
    """Quantization cannot proceed: the message names the input at fault and how to fix it."""


class RolloutError(BridgeError, ValueError):
    """A rollout cannot be started or changed: the message says why and what to do."""


class ExportError(BridgeError, RuntimeError):
    """The export cannot proceed: the message says what is wrong and how to fix it."""
