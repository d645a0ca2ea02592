"""Run the same statement for many concurrent deliveries at once.

Up to the prefetch of deliveries are in flight, and most of them are at the
same step at nearly the same time. A :class:`Batcher` collects the requests
of one step and runs them as one statement (arrays in, one row per request
out), so a burst of deliveries costs one round trip and one commit instead
of one each.

There is no timer: the first request starts a batch at once, and requests
that arrive while batches run wait for the next one. At low load a batch is
one request and adds no latency; under load batches grow by themselves.

A batch is one statement, so it commits or leaves no trace, like the single
request it replaces. Its failure is every member's failure: a database
outage (:class:`~consumer.errors.DatabaseUnavailableError`) reaches each
request's own retry loop. Any other error may be one request's fault (a value
the database refuses), so the members are then run again one by one and only
the guilty one fails.

A request whose caller is cancelled before its batch starts is left out;
once the batch has started, the statement runs to its end and only the
answer is dropped: the same as a process dying just after a commit, which
the inbox makes harmless.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Generic, TypeVar

from consumer.errors import DatabaseUnavailableError

RequestT = TypeVar("RequestT")
AnswerT = TypeVar("AnswerT")

#: Requests in one statement at most.
MAX_BATCH_SIZE = 64
#: Batches running at once: while one waits for its commit, the next fills.
PARALLEL_BATCHES = 1


class Batcher(Generic[RequestT, AnswerT]):
    """Runs ``statement`` for batches of concurrent requests.

    ``statement`` takes a list of requests and returns one answer per
    request, in the same order. ``keys`` names what two requests in one
    batch must not share (a task, a message id): a request that shares one
    with a member waits for a later batch, so one statement never touches
    the same row twice. ``observe`` is called with each batch's size.
    """

    def __init__(
        self,
        statement: Callable[[list[RequestT]], Awaitable[Sequence[AnswerT]]],
        *,
        keys: Callable[[RequestT], Iterable[Hashable]],
        observe: Callable[[int], object] = lambda size: None,
        max_size: int = MAX_BATCH_SIZE,
        parallel: int = PARALLEL_BATCHES,
    ) -> None:
        self._statement = statement
        self._keys = keys
        self._observe = observe
        self._max_size = max_size
        self._parallel = parallel
        self._waiting: list[tuple[RequestT, asyncio.Future[AnswerT]]] = []
        self._running: set[asyncio.Task[None]] = set()

    async def run(self, request: RequestT) -> AnswerT:
        """The answer to ``request``, from the batch it ends up in."""
        future: asyncio.Future[AnswerT] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        self._start()
        return await future

    async def wait_idle(self) -> None:
        """Wait until no batch is running (for shutdown)."""
        while self._running:
            await asyncio.wait(set(self._running))

    def _start(self) -> None:
        while self._waiting and len(self._running) < self._parallel:
            batch = self._take()
            if not batch:
                return
            task = asyncio.create_task(self._run_batch(batch), name="consumer-batch")
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._start()

    def _take(self) -> list[tuple[RequestT, asyncio.Future[AnswerT]]]:
        """The next batch: waiting requests in arrival order, none sharing a key."""
        batch: list[tuple[RequestT, asyncio.Future[AnswerT]]] = []
        left: list[tuple[RequestT, asyncio.Future[AnswerT]]] = []
        taken: set[Hashable] = set()
        for request, future in self._waiting:
            if future.done():
                # Its caller was cancelled: nothing of it runs.
                continue
            keys = set(self._keys(request))
            if len(batch) >= self._max_size or keys & taken:
                left.append((request, future))
                continue
            taken |= keys
            batch.append((request, future))
        self._waiting = left
        return batch

    async def _run_batch(
        self, batch: list[tuple[RequestT, asyncio.Future[AnswerT]]]
    ) -> None:
        self._observe(len(batch))
        try:
            answers = await self._statement([request for request, _ in batch])
        except DatabaseUnavailableError as exc:
            _fail(batch, exc)
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch, exc)
            else:
                for member in batch:
                    await self._run_batch([member])
        except BaseException as exc:
            # Cancelled (the loop is closing): the callers learn it too.
            _fail(batch, exc)
            raise
        else:
            if len(answers) != len(batch):
                _fail(batch, RuntimeError("a batch answered the wrong number of rows"))
                return
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)


def _fail(
    batch: list[tuple[RequestT, asyncio.Future[AnswerT]]], error: BaseException
) -> None:
    for _, future in batch:
        if not future.done():
            if isinstance(error, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(error)
