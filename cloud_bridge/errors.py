"""Every error the cloud bridge raises on purpose, in one tree: catch `BridgeError` to catch them all.

    BridgeError                exit 1 unless said otherwise
    ├── ConfigError            the config file or environment is wrong; the message names the key (exit 2)
    ├── UsageError             a command-line argument is wrong; the message names it (exit 2)
    ├── MqttError              the broker refused us, or a publish/subscribe could not be sent
    ├── RegistryError          the registry database cannot be used as it is (an old layout to sort out)
    ├── ModelError             the cloud model file cannot answer escalations (metadata, shape)
    ├── ReferenceModelError    a `[drift] reference_models` entry cannot be used
    ├── ModelStoreError        a model cannot be registered or found
    ├── QuantizeError          quantization cannot proceed: an input it was given is unusable (exit 2)
    ├── SigningKeyError        a command-signing key pair cannot be written
    ├── RolloutError           a rollout cannot be started or changed
    └── ExportError            a sample export cannot proceed

Errors that are also a kind of ValueError or RuntimeError keep that base, so callers that caught the
builtin still do. Each message says what failed and how to fix it; `cloud-bridge` (cloud_bridge/cli)
prints it as `cloud-bridge COMMAND: message` and exits with the class's `exit_code`: 2 when the
invocation itself must change (like argparse's own usage errors), 1 when the operation failed.
"""

from __future__ import annotations

from typing import ClassVar


class BridgeError(Exception):
    """Root of the cloud bridge's errors."""

    exit_code: ClassVar[int] = 1


class ConfigError(BridgeError, ValueError):
    """The configuration is invalid: the message names the key and the fix."""

    exit_code = 2


class UsageError(BridgeError, ValueError):
    """A command-line argument is invalid: the message names the option and the fix."""

    exit_code = 2


class MqttError(BridgeError, RuntimeError):
    """The broker refused us, or a publish/subscribe could not be sent."""


class RegistryError(BridgeError, RuntimeError):
    """The registry database cannot be used as it is: the message says what an operator must decide."""


class ModelError(BridgeError, RuntimeError):
    """The cloud model file cannot be used (missing metadata, wrong shape)."""


class ReferenceModelError(BridgeError, ValueError):
    """A `[drift] reference_models` entry cannot be used: the message names the file and the fix."""


class ModelStoreError(BridgeError, ValueError):
    """A model cannot be registered or found: the message says which and what to do."""


class QuantizeError(BridgeError, ValueError):
    """Quantization cannot proceed: the message names the input at fault and how to fix it."""

    exit_code = 2


class SigningKeyError(BridgeError, OSError):
    """A command-signing key pair cannot be written: the message names the file and the fix."""


class RolloutError(BridgeError, ValueError):
    """A rollout cannot be started or changed: the message says why and what to do."""


class ExportError(BridgeError, RuntimeError):
    """The export cannot proceed: the message says what is wrong and how to fix it."""
