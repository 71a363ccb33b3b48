"""The project's exception tree, translated at every boundary.

    FbasError                       base of everything we raise on purpose
    ├── PermanentError              bad input or configuration: never retried
    │   ├── ConfigError             a flag, env var or config value is wrong
    │   ├── CheckpointError         a model folder is missing files, has wrong shapes or names
    │   ├── InputError              a corpus or query file is unusable (column, type, ids)
    │   ├── InvalidRequestError     the inference server rejected a request as invalid
    │   │   ├── BadRowsError        ... naming the rows at fault (workers/triton_client.py)
    │   │   └── RequestTooLargeError ... because it is too big: split it (workers/triton_client.py)
    │   ├── ResponseFormatError     a server response is not what the contract says (workers/triton_wire.py)
    │   └── ServerExitedError       a server we started exited (services/triton.py)
    └── TransientError              may succeed if retried with backoff (bounded)
        └── ServerUnavailableError  the inference server or broker is not reachable/ready

Every message names the problem and the fix. Code outside the boundary modules never sees
grpc, redis or onnxruntime exceptions: those modules raise one of these ``from None``.
"""

from __future__ import annotations

__all__ = [
    "FbasError",
    "PermanentError",
    "ConfigError",
    "CheckpointError",
    "InputError",
    "InvalidRequestError",
    "TransientError",
    "ServerUnavailableError",
]


class FbasError(Exception):
    """Base class of every error this project raises on purpose."""


class PermanentError(FbasError):
    """Retrying the same thing will fail the same way."""


class ConfigError(PermanentError):
    """A configuration value (flag, FBAS_* variable, config file) is invalid."""


class CheckpointError(PermanentError):
    """A model checkpoint or built model folder cannot be used as it is."""


class InputError(PermanentError):
    """An input corpus, query file or text cannot be used as it is."""


class InvalidRequestError(PermanentError):
    """The inference server rejected a request (shape, size, dtype)."""


class TransientError(FbasError):
    """A fault that may pass: retry with backoff, a bounded number of times."""


class ServerUnavailableError(TransientError):
    """A server (Triton, Redis) is not reachable or not ready yet."""
