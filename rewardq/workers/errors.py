"""The workers' one error hierarchy, and which failures are transient (retried) or an item's own (quarantined)."""

from __future__ import annotations

import logging
import uuid

import kombu.exceptions
import redis.exceptions
from sqlalchemy.exc import DBAPIError, OperationalError


class RewardqError(Exception):
    """Base of rewardq's own errors; ``code`` is the reason recorded in the error ledger."""

    code = "error"


class ModelUnavailable(RewardqError):
    """The job's model version cannot be loaded here: no item of it can be scored."""

    code = "model_unavailable"


class ModelLoadFailed(RewardqError):
    """This worker cannot load the model (an import, its files, memory at load): the worker's fault, not the
    batch's. The work goes back to the queue for another worker, with backoff; nothing is split or failed for it."""

    code = "model_load_failed"


class InjectedFault(RewardqError):
    """Raised for texts containing REWARDQ_FAULT_POISON_MARKER (a testing aid for the poison-batch path)."""

    code = "injected_fault"


class InjectedOutage(ConnectionError):
    """Raised while REWARDQ_FAULT_TRANSIENT_FILE exists (a testing aid: an outage of the services around a batch)."""


class WorkerLost(RewardqError):
    """Workers kept dying on a batch (REWARDQ_MAX_WORKER_DEATHS times): it is split, and a lone item fails."""

    code = "worker_lost"


# Failures of the services around a batch, not of its items: retry the task with capped backoff.
RETRY_BACKOFF_MAX_S = 60
LOAD_RETRY_MAX_S = 10  # a batch whose model this worker cannot load (ModelLoadFailed)
# redis-py's and kombu's connection errors derive from their own bases, not from the builtins: listed by name (a Redis
# restarting mid-batch, or the broker unreachable while a split's halves are published, is an outage too).
TRANSIENT: tuple[type[BaseException], ...] = (
    OperationalError,
    ConnectionError,
    TimeoutError,
    OSError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    kombu.exceptions.OperationalError,
)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, TRANSIENT)


def reason_code(exc: BaseException) -> str:
    """A short, stable reason code for the error ledger."""
    if isinstance(exc, RewardqError):
        return exc.code
    if isinstance(exc, ValueError | TypeError | IndexError | KeyError):
        return "invalid_input"
    if isinstance(exc, MemoryError):
        return "out_of_memory"
    if isinstance(exc, RuntimeError):
        return "out_of_memory" if "out of memory" in str(exc).lower() else "model_error"
    return "scoring_error"


def public_message(
    exc: BaseException, log: logging.Logger, what: str, own: tuple[type[BaseException], ...] = ()
) -> str:
    """What a tenant may read about a failure (an item's error, a job's or a run's). rewardq's own errors (and ``own``)
    say what happened in words written for the user, with no path or host in them; any other exception (a driver's,
    a library's: SQL, host names, file paths) is named by its reason code and type only, with a reference under which
    this process's log holds the full text and traceback."""
    if isinstance(exc, (RewardqError, *own)):
        return f"{type(exc).__name__}: {exc}"
    ref = uuid.uuid4().hex[:12]
    log.error("%s failed (ref %s): %s: %s", what, ref, type(exc).__name__, exc, exc_info=exc)
    return f"{reason_code(exc)}: {type(exc).__name__} (ref {ref}: the details are in the worker's log)"
