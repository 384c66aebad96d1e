"""User-facing errors.

Anything a user can cause (a bad path, config, checkpoint, TP size, request or wire message) is
raised as a `TpserveError` whose message is one sentence naming the thing and the fix. Internal
invariants stay plain asserts.
"""

import logging
import uuid


class TpserveError(ValueError):
    """A problem with user input, reported in one sentence."""


class CheckpointError(TpserveError):
    """The checkpoint on disk is missing, malformed or unsupported."""


class ConfigError(TpserveError):
    """config.json or the quantization config is invalid or unsupported."""


def client_message(what: str, e: BaseException, log: logging.Logger) -> str:
    """What a client is told of `e`, which `what` names ("the engine's step failed"): a
    `TpserveError`'s own sentence (written for users: a dead rank, a bad input), else a reference
    that the log line written here repeats with the exception, never the exception's text (paths,
    device and library messages are the operator's business)."""
    if isinstance(e, TpserveError):  # a remote error's text (`detail`) goes to the log only
        detail = getattr(e, "detail", None)
        log.error("%s: %s%s", what, e, f" ({detail})" if detail else "")
        return str(e)
    ref = uuid.uuid4().hex[:12]
    log.error("%s (reference %s): %s: %s", what, ref, type(e).__name__, e, exc_info=e)
    return f"{what} (reference {ref}); the server's log has the details"


def shown(x) -> str:
    """x as an error message quotes it: a long value (a number of thousands of digits) cut short."""
    r = repr(x)
    return r if len(r) <= 40 else f"{r[:16]}... ({len(r)} characters)"
