"""One delivery of a work message: claim the task, run its handler, record the outcome.

The order is what makes a redelivered message harmless:

1. Claim, in one short transaction: skip a message already in the inbox, lock
   the task, leave a terminal task alone, otherwise mark it IN_PROGRESS and
   count the attempt. A task already IN_PROGRESS is claimed again only by a
   redelivery: the broker gives a message back when the consumer running it
   died, and this delivery must finish it. If that interrupted attempt was
   the task's last, the task fails instead: a handler that kills its process
   cannot loop for more than ``max_attempts`` runs. A message new to the
   broker that finds its task IN_PROGRESS is a second copy (the relay
   published it again after a crash) and is acknowledged without running.
2. Run the handler outside any transaction, so a long task holds no lock and
   no connection. An attempt cut short by shutdown is handed back (PENDING,
   the attempt uncounted) before the message is left for redelivery.
3. Record, in a second transaction: lock the task, insert the inbox row, and
   only if that insert wins write the outcome, the recorder's rows and the
   follow-up outbox message. Two deliveries of one message may both run the
   handler, but only one of them commits an effect.

Steps 1 and 3 each have a one-statement form for the common case, a ready
task whose handler succeeded, run for many concurrent deliveries at once
(see :mod:`consumer.queries` and :mod:`consumer.batching`); anything else
takes the transactions described above. Either way the task row is locked
before the inbox is touched.

The caller acknowledges the message only after :meth:`MessageProcessor.process`
returns, i.e. after the commit; a crash in between means a redelivery, which
step 1 or 3 recognises. A transaction that fails because the database is
unreachable is retried on its own (see :mod:`consumer.outage`): the handler is
not run again because recording its outcome had to wait.
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
import uuid
from collections.abc import AsyncIterator, Hashable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import structlog
from sqlalchemy import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from consumer import metrics, queries
from consumer.batching import Batcher
from consumer.cancellation import CancellationWatcher
from consumer.errors import (
    ConsumerError,
    DatabaseUnavailableError,
    HandlerTimeoutError,
    RecorderFailedError,
    UnprocessableMessageError,
    is_transient_database_error,
)
from consumer.messages import (
    TASK_COMPLETED,
    TASK_FAILED,
    Delivery,
    TaskMessage,
    decode_task_message,
    lifecycle_event,
    retry_message,
)
from consumer.outage import DatabaseOutage
from outbox_relay.outbox import OutboxMessage, enqueue
from service.database import driver_connection, json_text
from service.errors import UnknownTaskTypeError
from service.models import TERMINAL_STATUSES, TaskStatus
from service.registry import (
    HandlerRegistry,
    NonRetryableTaskError,
    TaskContext,
    TaskType,
)
from service.tracing import current_trace_headers

logger = structlog.get_logger(__name__)

#: Longest error text stored on a task; handler messages can be arbitrarily long.
MAX_ERROR_LENGTH = 2000

#: How long shutdown waits to hand an interrupted attempt back; if the
#: database does not answer by then the redelivery claims the task anyway.
RELEASE_TIMEOUT_SECONDS = 2.0


class Outcome(enum.StrEnum):
    """What one delivery did; every outcome is acknowledged."""

    COMPLETED = "completed"
    RETRY_SCHEDULED = "retry_scheduled"
    FAILED = "failed"
    #: The task was cancelled while this attempt ran; it stays CANCELLED.
    CANCELLED = "cancelled"
    #: The task was already terminal; the message changed nothing.
    ALREADY_FINISHED = "already_finished"
    #: Another delivery of this message already recorded its effect.
    DUPLICATE = "duplicate"
    #: A fresh copy of a message whose task another delivery is running; the
    #: running one records the outcome.
    COPY_IN_FLIGHT = "copy_in_flight"


#: Outcomes in which this delivery gave the task its terminal status, with
#: that status, for the end-to-end latency.
_TERMINAL_OUTCOMES = {
    Outcome.COMPLETED: TaskStatus.COMPLETED.value,
    Outcome.FAILED: TaskStatus.FAILED.value,
}


@dataclass(frozen=True)
class _Claim:
    task_type: TaskType[Any]
    payload: Any
    context: TaskContext
    created_at: datetime


@dataclass(frozen=True)
class _Settled:
    """A claim that ended the delivery without running the handler."""

    outcome: Outcome
    #: The task's creation time, when the claim reached the task.
    created_at: datetime | None = None


@dataclass(frozen=True)
class _ClaimRequest:
    task_id: uuid.UUID
    delivery: Delivery

    def keys(self) -> tuple[Hashable, ...]:
        return (self.task_id, self.delivery.message_id)


@dataclass(frozen=True)
class _Completion:
    task_id: uuid.UUID
    delivery: Delivery
    #: The handler's result as JSON text.
    result: str
    event: OutboxMessage

    def keys(self) -> tuple[Hashable, ...]:
        return (self.task_id, self.delivery.message_id)


@dataclass(frozen=True)
class _Succeeded:
    result: Any


@dataclass(frozen=True)
class _Raised:
    error: BaseException


def retry_delay(attempt: int, base: float, maximum: float) -> float:
    """Seconds before retrying after failed attempt number ``attempt``.

    Exponential back-off with full jitter: uniform between zero and
    ``base * 2 ** (attempt - 1)``, capped at ``maximum``, so tasks that failed
    together (a dependency was down) do not come back together.
    """
    # The exponent is bounded so that a huge attempt count cannot overflow.
    ceiling = min(maximum, base * 2.0 ** min(max(attempt - 1, 0), 64))
    return random.uniform(0, ceiling)


def error_text(error: BaseException) -> str:
    """The error as stored on the task: class name and message, truncated."""
    message = str(error)
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    if len(text) > MAX_ERROR_LENGTH:
        text = text[: MAX_ERROR_LENGTH - 1] + "…"
    return text


class MessageProcessor:
    """Processes deliveries of work messages; safe to call concurrently."""

    def __init__(
        self,
        engine: AsyncEngine,
        registry: HandlerRegistry,
        watcher: CancellationWatcher,
        *,
        retry_backoff_base: float,
        retry_backoff_max: float,
        outage: DatabaseOutage | None = None,
        time_limit: float | None = None,
    ) -> None:
        self._engine = engine
        self._registry = registry
        self._watcher = watcher
        self._retry_backoff_base = retry_backoff_base
        self._retry_backoff_max = retry_backoff_max
        self._outage = outage or DatabaseOutage(asyncio.Event())
        #: Seconds an attempt of a type without its own timeout may run.
        self._time_limit = time_limit
        #: The types the batched claim may start; the registry is complete
        #: before any delivery arrives.
        self._type_names = registry.names()
        self._claims = Batcher(
            self._claim_ready_tasks,
            keys=_ClaimRequest.keys,
            observe=metrics.BATCH_SIZE.labels(step="claim").observe,
        )
        self._completions = Batcher(
            self._record_completions,
            keys=_Completion.keys,
            observe=metrics.BATCH_SIZE.labels(step="complete").observe,
        )

    async def wait_idle(self) -> None:
        """Wait for the statements of batched steps still running."""
        await self._claims.wait_idle()
        await self._completions.wait_idle()

    async def process(self, delivery: Delivery) -> Outcome:
        """Process one delivery; when this returns, its effect is committed.

        Raises :class:`UnprocessableMessageError` for a message to
        dead-letter. A database outage is waited out; only when shutdown
        begins during one does :class:`DatabaseUnavailableError` propagate,
        for a message to leave unsettled. In both cases nothing was committed
        that a later delivery would not recognise. Cancelling this coroutine
        (shutdown) cancels the handler and hands the attempt back; whatever
        committed before that, a redelivery recognises too.
        """
        started = time.perf_counter()
        message = decode_task_message(delivery)
        structlog.contextvars.bind_contextvars(task_id=str(message.task_id))
        self._task_type(message.type)

        claimed = await self._outage.retry(lambda: self._claim(delivery, message))
        if isinstance(claimed, _Claim):
            result = await self._attempt(claimed)
            outcome = await self._outage.retry(
                lambda: self._record(delivery, claimed, result)
            )
            created_at: datetime | None = claimed.created_at
        else:
            outcome = claimed.outcome
            created_at = claimed.created_at
            result = None

        duration_ms = round((time.perf_counter() - started) * 1000, 1)
        if outcome in (Outcome.DUPLICATE, Outcome.COPY_IN_FLIGHT):
            metrics.DUPLICATES.inc()
            logger.info(
                "message_duplicate",
                in_flight=outcome is Outcome.COPY_IN_FLIGHT,
                duration_ms=duration_ms,
            )
            return outcome

        metrics.PROCESSED.labels(outcome=outcome.value).inc()
        terminal = _TERMINAL_OUTCOMES.get(outcome)
        if terminal is not None and created_at is not None:
            # The database's clock wrote created_at: a little skew against
            # ours must not make the latency negative.
            age = (datetime.now(UTC) - created_at).total_seconds()
            metrics.END_TO_END.labels(status=terminal).observe(max(age, 0.0))

        log = {
            Outcome.FAILED: logger.error,
            Outcome.RETRY_SCHEDULED: logger.warning,
        }.get(outcome, logger.info)
        log(
            "task_processed",
            outcome=outcome.value,
            duration_ms=duration_ms,
            attempt=claimed.context.attempt if isinstance(claimed, _Claim) else None,
            error_type=(
                type(result.error).__name__ if isinstance(result, _Raised) else None
            ),
        )
        return outcome

    def _task_type(self, name: str) -> TaskType[Any]:
        try:
            return self._registry.get(name)
        except UnknownTaskTypeError as exc:
            raise UnprocessableMessageError(
                f"unknown task type {name!r}", kind="unknown_type"
            ) from exc

    async def _claim(
        self, delivery: Delivery, message: TaskMessage
    ) -> _Claim | _Settled:
        """Step 1: mark the task IN_PROGRESS and count the attempt."""
        claimed = await self._claim_ready(delivery, message)
        if claimed is not None:
            return claimed

        async with self._transaction() as conn:
            task = await self._lock_task(conn, message.task_id, delivery)
            if task["seen"]:
                return _Settled(Outcome.DUPLICATE)

            if task["status"] in TERMINAL_STATUSES:
                # The late message is consumed for good: recording it means a
                # redelivery is recognised without even locking the task.
                await self._record_inbox(conn, delivery)
                return _Settled(Outcome.ALREADY_FINISHED)

            if task["status"] == TaskStatus.IN_PROGRESS and not delivery.redelivered:
                # Only the broker's redelivery means the running attempt's
                # consumer died; a message new to the broker is a second copy
                # (the relay published it again) while the first one runs.
                # No inbox row: the running delivery must still record its
                # outcome. Should it die after all, its redelivery, or the
                # stuck-task sweep, finishes the task.
                return _Settled(Outcome.COPY_IN_FLIGHT)

            if (
                task["status"] == TaskStatus.IN_PROGRESS
                and task["attempts"] >= task["max_attempts"]
            ):
                await self._fail_interrupted(conn, delivery, task)
                return _Settled(Outcome.FAILED, created_at=task["created_at"])

            # The row, not the message, decides which handler runs.
            task_type = self._task_type(task["type"])
            started = await conn.execute(
                queries.START_ATTEMPT, {"task_id": message.task_id}
            )
            attempt: int = started.scalar_one()

        return _claim_of(message.task_id, task_type, attempt, task)

    async def _claim_ready(
        self, delivery: Delivery, message: TaskMessage
    ) -> _Claim | None:
        """Step 1 for a task ready to run, batched; None otherwise."""
        task = await self._claims.run(_ClaimRequest(message.task_id, delivery))
        if task is None:
            return None
        task_type = self._task_type(task["type"])
        return _claim_of(message.task_id, task_type, task["attempts"], task)

    async def _claim_ready_tasks(
        self, requests: list[_ClaimRequest]
    ) -> list[asyncpg.Record | None]:
        async with self._driver() as conn:
            rows = await conn.fetch(
                queries.CLAIM_READY_TASKS,
                [request.task_id for request in requests],
                [request.delivery.message_id for request in requests],
                [request.delivery.redelivered for request in requests],
                self._type_names,
            )
        claimed = {row["message_id"]: row for row in rows}
        return [claimed.get(request.delivery.message_id) for request in requests]

    async def _fail_interrupted(
        self, conn: AsyncConnection, delivery: Delivery, task: RowMapping
    ) -> None:
        """Fail a task whose last attempt started and never recorded an outcome.

        Its consumer died during the attempt (a handler that kills its process
        does so on every delivery), so running it again is not allowed.
        """
        attempts: int = task["attempts"]
        await self._record_inbox(conn, delivery)
        await conn.execute(
            queries.FAIL_TASK,
            {
                "task_id": task["id"],
                "error": (
                    f"attempt {attempts} of {task['max_attempts']} was interrupted"
                    " before it finished (its consumer stopped)"
                ),
            },
        )
        await enqueue(
            conn,
            lifecycle_event(
                TASK_FAILED,
                task_id=task["id"],
                task_type=task["type"],
                status=TaskStatus.FAILED,
                attempts=attempts,
                headers=follow_up_headers(delivery),
            ),
        )

    async def _attempt(self, claim: _Claim) -> _Succeeded | _Raised:
        """Step 2: run the handler, watched for cancellation of its task."""
        context = claim.context
        handler = asyncio.create_task(
            run_handler(
                claim.task_type, claim.payload, context, time_limit=self._time_limit
            ),
            name=f"handler:{context.task_id}",
        )

        started = time.perf_counter()
        duration = metrics.HANDLER_DURATION.labels(task_type=context.task_type)
        with self._watcher.watch(context.task_id, context.cancelled, handler):
            try:
                value = await handler
            except asyncio.CancelledError as exc:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    # Shutdown, not the task's cancellation: nothing is
                    # recorded and the unacknowledged message is redelivered.
                    await self._release(context)
                    raise
                duration.observe(time.perf_counter() - started)
                return _Raised(exc)
            except Exception as exc:
                duration.observe(time.perf_counter() - started)
                return _Raised(exc)
        duration.observe(time.perf_counter() - started)

        try:
            return _Succeeded(msgspec.to_builtins(value))
        except TypeError as exc:
            return _Raised(
                NonRetryableTaskError(f"result is not JSON-serialisable: {exc}")
            )

    async def _release(self, context: TaskContext) -> None:
        """Hand an attempt cut short by shutdown back, uncounted; best effort.

        Only this attempt's claim is undone: if another delivery claimed the
        task since, the attempt number no longer matches and nothing changes.
        """
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_SECONDS):
                async with self._transaction() as conn:
                    await conn.execute(
                        queries.RELEASE_ATTEMPT,
                        {"task_id": context.task_id, "attempt": context.attempt},
                    )
        except Exception as exc:
            # The redelivery claims the task all the same; only the attempt
            # stays counted.
            logger.warning("task_release_failed", error=error_text(exc))
        else:
            logger.info("task_released", attempt=context.attempt)

    async def _record(
        self, delivery: Delivery, claim: _Claim, result: _Succeeded | _Raised
    ) -> Outcome:
        """Step 3: commit the outcome exactly once per message."""
        try:
            return await self._record_once(delivery, claim, result)
        except RecorderFailedError as exc:
            cause = exc.__cause__ or exc
            if is_transient_database_error(cause):
                raise DatabaseUnavailableError(_describe(cause)) from cause

            # The recorder belongs to the attempt: its failure is the
            # attempt's failure, recorded (and retried) like a handler's.
            return await self._record_once(delivery, claim, _Raised(cause))

    async def _record_once(
        self, delivery: Delivery, claim: _Claim, result: _Succeeded | _Raised
    ) -> Outcome:
        if isinstance(result, _Succeeded) and claim.task_type.recorder is None:
            outcome = await self._record_completion(delivery, claim, result)
            if outcome is not None:
                return outcome

        context = claim.context
        headers = follow_up_headers(delivery)

        async with self._transaction() as conn:
            task = await self._lock_task(conn, context.task_id, delivery)
            if not await self._record_inbox(conn, delivery):
                return Outcome.DUPLICATE

            if task["status"] in TERMINAL_STATUSES:
                # Cancelled meanwhile (the API wrote its event) or finished by
                # another message: a late outcome never overwrites it.
                if task["status"] == TaskStatus.CANCELLED:
                    return Outcome.CANCELLED
                return Outcome.ALREADY_FINISHED

            attempts: int = task["attempts"]
            if isinstance(result, _Succeeded):
                await conn.execute(
                    queries.COMPLETE_TASK,
                    {"task_id": context.task_id, "result": result.result},
                )
                recorder = claim.task_type.recorder
                if recorder is not None:
                    try:
                        await recorder(conn, context, result.result)
                    except Exception as exc:
                        raise RecorderFailedError(str(exc)) from exc
                await enqueue(
                    conn,
                    lifecycle_event(
                        TASK_COMPLETED,
                        task_id=context.task_id,
                        task_type=claim.task_type.name,
                        status=TaskStatus.COMPLETED,
                        attempts=attempts,
                        headers=headers,
                    ),
                )
                return Outcome.COMPLETED

            error = error_text(result.error)
            if (
                isinstance(result.error, NonRetryableTaskError)
                or attempts >= task["max_attempts"]
            ):
                await conn.execute(
                    queries.FAIL_TASK, {"task_id": context.task_id, "error": error}
                )
                await enqueue(
                    conn,
                    lifecycle_event(
                        TASK_FAILED,
                        task_id=context.task_id,
                        task_type=claim.task_type.name,
                        status=TaskStatus.FAILED,
                        attempts=attempts,
                        headers=headers,
                    ),
                )
                return Outcome.FAILED

            delay = retry_delay(
                attempts, self._retry_backoff_base, self._retry_backoff_max
            )
            await conn.execute(
                queries.SCHEDULE_RETRY, {"task_id": context.task_id, "error": error}
            )
            await enqueue(
                conn,
                retry_message(
                    task_id=context.task_id,
                    task_type=claim.task_type.name,
                    # The database's clock, like every other timestamp here.
                    available_at=task["now"] + timedelta(seconds=delay),
                    headers=headers,
                ),
            )
            return Outcome.RETRY_SCHEDULED

    async def _record_completion(
        self, delivery: Delivery, claim: _Claim, result: _Succeeded
    ) -> Outcome | None:
        """Step 3 for a success without a recorder, batched.

        None when the task is gone; the transaction path then says so.
        """
        context = claim.context
        event = lifecycle_event(
            TASK_COMPLETED,
            task_id=context.task_id,
            task_type=claim.task_type.name,
            status=TaskStatus.COMPLETED,
            # Replaced by the row's count in the statement.
            attempts=context.attempt,
            headers=follow_up_headers(delivery),
        )
        task = await self._completions.run(
            _Completion(context.task_id, delivery, json_text(result.result), event)
        )
        if task is None:
            return None
        if not task["recorded"]:
            return Outcome.DUPLICATE
        if task["status"] == TaskStatus.CANCELLED:
            return Outcome.CANCELLED
        if task["status"] in TERMINAL_STATUSES:
            return Outcome.ALREADY_FINISHED
        return Outcome.COMPLETED

    async def _record_completions(
        self, completions: list[_Completion]
    ) -> list[asyncpg.Record | None]:
        async with self._driver() as conn:
            rows = await conn.fetch(
                queries.RECORD_COMPLETIONS,
                [c.task_id for c in completions],
                [c.delivery.message_id for c in completions],
                [c.delivery.routing_key for c in completions],
                [c.result for c in completions],
                [json_text(c.event.body) for c in completions],
                [json_text(c.event.headers) for c in completions],
                [c.event.correlation_id for c in completions],
            )
        recorded = {row["message_id"]: row for row in rows}
        return [recorded.get(c.delivery.message_id) for c in completions]

    async def _lock_task(
        self, conn: AsyncConnection, task_id: uuid.UUID, delivery: Delivery
    ) -> RowMapping:
        result = await conn.execute(
            queries.LOCK_TASK,
            {"task_id": task_id, "message_id": delivery.message_id},
        )
        task = result.mappings().first()
        if task is None:
            raise UnprocessableMessageError("task not found", kind="task_not_found")
        return task

    async def _record_inbox(self, conn: AsyncConnection, delivery: Delivery) -> bool:
        """Insert the inbox row; False when another delivery already did."""
        result = await conn.execute(
            queries.RECORD_INBOX,
            {"message_id": delivery.message_id, "routing_key": delivery.routing_key},
        )
        return result.first() is not None

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        """A transaction whose driver errors are translated once, here."""
        with _translated_errors():
            async with self._engine.begin() as conn:
                yield conn

    @asynccontextmanager
    async def _driver(self) -> AsyncIterator[asyncpg.Connection[Any]]:
        """A pooled connection as the driver's own, for single statements
        (each its own transaction); errors translated as for transactions."""
        with _translated_errors():
            async with driver_connection(self._engine) as conn:
                yield conn


@contextmanager
def _translated_errors() -> Iterator[None]:
    """Raise an error that means "the database is unreachable or busy" as
    :class:`DatabaseUnavailableError`; let every other one through."""
    try:
        yield
    except ConsumerError:
        raise
    except Exception as exc:
        if is_transient_database_error(exc):
            raise DatabaseUnavailableError(_describe(exc)) from exc
        raise


def _claim_of(
    task_id: uuid.UUID, task_type: TaskType[Any], attempt: int, task: Any
) -> _Claim:
    """The claim of ``attempt`` on ``task``, a row with the task's
    ``max_attempts``, ``payload`` and ``created_at``."""
    context = TaskContext(
        task_id=task_id,
        task_type=task_type.name,
        attempt=attempt,
        max_attempts=task["max_attempts"],
        cancelled=asyncio.Event(),
    )
    return _Claim(
        task_type=task_type,
        payload=task["payload"],
        context=context,
        created_at=task["created_at"],
    )


def follow_up_headers(delivery: Delivery) -> dict[str, str]:
    """Headers of the messages a delivery writes: its request id, and the trace
    context of the consumer's span for it (a child of the message's own), or
    the message's trace headers as they came when no span is current."""
    return {**delivery.propagated_headers(), **current_trace_headers()}


async def run_handler(
    task_type: TaskType[Any],
    payload: Any,
    context: TaskContext,
    *,
    time_limit: float | None = None,
) -> Any:
    """One attempt: decode the payload and await the handler within its timeout.

    The timeout is the type's own, or ``time_limit`` for a type without one.
    A payload the type no longer accepts raises ``NonRetryableTaskError``; an
    attempt over the timeout raises ``HandlerTimeoutError``.
    """
    try:
        decoded = task_type.decode(payload)
    except msgspec.ValidationError as exc:
        # The API validated the payload on submission, so the type's schema
        # changed since; another attempt would fail the same way.
        raise NonRetryableTaskError(
            f"payload does not match task type {task_type.name!r}: {exc}"
        ) from exc

    timeout = task_type.timeout if task_type.timeout is not None else time_limit
    if timeout is None:
        return await task_type.handler(decoded, context)

    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            return await task_type.handler(decoded, context)
    except TimeoutError as exc:
        if deadline.expired():
            raise HandlerTimeoutError(f"attempt exceeded {timeout} seconds") from exc
        raise


def _describe(exc: BaseException) -> str:
    # A driver error's own text, without the SQL statement SQLAlchemy appends.
    orig = getattr(exc, "orig", None)
    return error_text(orig if isinstance(orig, BaseException) else exc)
