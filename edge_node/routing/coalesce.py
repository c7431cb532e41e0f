"""Answers gathered over time into few result/2 messages: what a billed link pays for results.

At 20 inputs a second a micro-batch holds about one input, and one result/2 message per batch
spends more bytes on MQTT framing, the topic and the envelope than on the answers. So answers wait
here, per model (a result/2 names one model), until `max_answers` of them or `max_delay_s` after
the first, then leave as one message. A model switch sends the old model's answers first, in order.
The node's very first answers leave at once: whoever starts a device wants to see it answer, not
wait out the delay (one message more per start).

Nothing is counted done early: the inputs of waiting answers are finished (`notify_done`: a
directory source moves its file then) only once the message holding their answers is committed,
and they stay unfinished in the intake (`hold`) until then, so `queue.join()`, the SIGTERM drain,
still means "every answer committed". At shutdown the pipeline flushes what waits (`flush`).
What a crash loses is what waited, at most `max_delay_s` of answers, as it loses the inputs still
queued; the telemetry window counted them, and is lost with them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_node.errors import OutboxError
from edge_node.inference.model import ModelInfo
from edge_node.input.intake import InputItem, notify_done
from edge_node.routing.answers import AnswerBuilder
from edge_node.uplink.outbox import Outbox
from schemas import Answer

log = logging.getLogger(__name__)


@dataclass
class _Waiting:
    info: ModelInfo
    answers: list[Answer] = field(default_factory=list)
    items: list[InputItem] = field(default_factory=list)


def _nothing(count: int) -> None:
    """No intake attached (a pipeline driven without one)."""


class ResultCoalescer:
    """Holds answers until enough of them, or old enough, to fill one result/2 message."""

    def __init__(self, answers: AnswerBuilder, outbox: Outbox, max_answers: int, max_delay_s: float) -> None:
        self._answers = answers
        self._outbox = outbox
        self._max_answers = max_answers
        self._max_delay_s = max_delay_s
        self._waiting: _Waiting | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._commits: set[asyncio.Task[None]] = set()
        self._hold: Callable[[int], None] = _nothing
        self._release: Callable[[int], None] = _nothing
        self._first = True
        self.outbox_errors = 0

    @property
    def enabled(self) -> bool:
        return self._max_delay_s > 0

    def attach(self, hold: Callable[[int], None], release: Callable[[int], None]) -> None:
        """The intake's `hold` and `task_done`: inputs with waiting answers stay unfinished."""
        self._hold, self._release = hold, release

    def add(self, info: ModelInfo, answers: list[Answer], items: list[InputItem]) -> None:
        """Take answers and the inputs they finish; a full message is committed at once."""
        waiting = self._waiting
        if waiting is not None and waiting.info.ref.sha256 != info.ref.sha256:
            self._send()  # a switched model: the old one's answers go first
            waiting = None
        if waiting is None:
            waiting = self._waiting = _Waiting(info)
            self._timer = asyncio.get_running_loop().call_later(self._max_delay_s, self._send)
        waiting.answers.extend(answers)
        waiting.items.extend(items)
        self._hold(len(items))
        if self._first or len(waiting.answers) >= self._max_answers:
            self._first = False
            self._send()

    def _send(self) -> None:
        """Commit what waits, in a task of its own (the timer's, a full message's, a switch's)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, None
        if waiting is None:
            return
        task = asyncio.get_running_loop().create_task(self._commit(waiting))
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)

    async def _commit(self, waiting: _Waiting) -> None:
        try:
            await self._outbox.put_many(self._answers.results(waiting.info, waiting.answers))
        except OutboxError as exc:
            # Answered locally; only the uplink of these answers is lost (counted, as the pipeline does).
            self.outbox_errors += 1
            log.error("outbox refused the results of %d inputs: %s", len(waiting.items), exc)
        finally:
            notify_done(waiting.items, ok=True)
            self._release(len(waiting.items))

    async def flush(self) -> None:
        """Commit what waits now, and wait for every commit started (the SIGTERM drain)."""
        self._send()
        while self._commits:
            await asyncio.gather(*self._commits)
