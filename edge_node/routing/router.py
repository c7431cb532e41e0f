"""Routing one scored batch: samples what is uncertain, answers what is confident at the edge, and
escalates the rest to the cloud model, falling back to the edge's answer when the node is offline,
no escalation slot is free ("shed"), the escalation budget is spent ("budget"), or the reply does
not come in time.

The common case, every row confident (or escalation off), takes the batch's lists as they are.
An escalated input's answer leaves when its reply (or its deadline) comes, in a task of its own;
the batch goes on without it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy.typing as npt

from edge_node.config import EdgeConfig
from edge_node.inference.model import ModelInfo
from edge_node.inference.shadow import ShadowRunner
from edge_node.input.intake import InputItem, notify_done
from edge_node.routing.answers import AnswerBuilder, Final, Row
from edge_node.routing.budget import RateBudget
from edge_node.routing.coalesce import ResultCoalescer
from edge_node.routing.confidence import BatchDecision
from edge_node.routing.escalation import EscalationResult, Escalations
from edge_node.telemetry import Window
from edge_node.uplink.budget import Spend
from edge_node.uplink.outbox import Outbox, OutMessage
from schemas import Answer, Channel, EscalationReply


class Router:
    """Routes the batches of one pipeline (see the module docstring)."""

    def __init__(
        self,
        config: EdgeConfig,
        answers: AnswerBuilder,
        escalations: Escalations,
        outbox: Outbox,
        window: Callable[[], Window],
        online: Callable[[], bool],
        shadow: ShadowRunner | None = None,
    ) -> None:
        """`shadow` (a rollout's shadow stage) sees every scored batch once its answers are known."""
        self.config = config
        self.shadow = shadow
        self.answers = answers
        up = config.uplink
        self.coalescer = ResultCoalescer(answers, outbox, up.results_max_answers, up.results_max_delay_s)
        self.escalations = escalations
        self.budget = RateBudget(config.routing.max_escalations_per_minute)
        self.outbox = outbox
        self._window = window
        self._online = online

    def route(
        self,
        good: list[InputItem],
        batch: npt.NDArray[Any],
        decision: BatchDecision,
        info: ModelInfo,
        tasks: asyncio.TaskGroup,
    ) -> tuple[list[OutMessage], list[InputItem]]:
        """The messages of a scored batch, and its inputs answered by them (escalated inputs are
        answered later, by a task of `tasks`)."""
        answers = self.answers
        out: list[OutMessage] = []
        out += answers.samples(good, batch, decision, info)
        finals: list[Final] = []
        tally = self._window().escalations
        # Plain Python lists once per batch: indexing numpy per input costs a scalar object each.
        top1 = decision.top1.tolist()
        confidence = decision.confidence.tolist()  # within [0, 1] (decide)
        if self.shadow is not None:
            self.shadow.offer(good, batch, decision.top1, decision.confident, info.labels)
        # Positions in the batch of the edge answers and of `finals`, kept only when both exist.
        edge: list[int] = []
        fallback: list[int] = []
        # The common case: every answer is final at the edge, and the batch's lists serve as they are.
        edge_items, edge_top1, edge_confidence = good, top1, confidence
        if self.config.routing.escalate and not bool(decision.confident.all()):
            for i, local in enumerate(decision.confident.tolist()):
                if local:
                    edge.append(i)
                    continue
                row = Row(good[i], info, batch[i], top1[i], confidence[i], decision.probs[i])
                if not self._online():
                    tally.offline_fallback += 1
                    finals.append(Final(row, "edge_fallback", "offline"))
                elif self.escalations.paused():
                    tally.paused += 1
                    finals.append(Final(row, "edge_fallback", "budget"))
                elif self.escalations.outstanding >= self.escalations.max_outstanding:
                    tally.shed += 1
                    finals.append(Final(row, "edge_fallback", "shed"))
                elif not self._within_budget():
                    tally.over_budget += 1
                    finals.append(Final(row, "edge_fallback", "budget"))
                elif (request := self._escalate(row, tasks)) is None:
                    tally.shed += 1
                    finals.append(Final(row, "edge_fallback", "shed"))
                else:
                    out.append(request)
                    continue
                fallback.append(i)
            edge_items, edge_top1 = [good[i] for i in edge], [top1[i] for i in edge]
            edge_confidence = [confidence[i] for i in edge]
        now = asyncio.get_running_loop().time()
        given = answers.edge_answers(edge_items, edge_top1, edge_confidence, info, now)
        if finals:
            more = answers.final_answers(finals, now)
            if more:  # one message, in the inputs' order
                given = [a for _, a in sorted(zip(edge + fallback, given + more, strict=True), key=_first)]
        answered = edge_items + [f.row.item for f in finals]
        if given and self.coalescer.enabled:
            # The answers wait to share a message; their inputs finish when it is committed.
            self.coalescer.add(info, given, answered)
            return out, []
        if given:
            out += answers.results(info, given)
        return out, answered

    def _within_budget(self) -> bool:
        """May one more escalation go? Within [routing] max_escalations_per_minute and the link's
        daily byte budget ([uplink] daily_bytes)."""
        bytes_budget = self.answers.wire.budget
        if not bytes_budget.allows(Spend.ESCALATIONS):
            bytes_budget.hold(Channel.ESCALATE.value)
            return False
        return self.budget.admit(time.monotonic())

    def _escalate(self, row: Row, tasks: asyncio.TaskGroup) -> OutMessage | None:
        """Reserve a slot and build the request; the wait for its reply runs as its own task."""
        future = self.escalations.reserve(row.item.input_id)
        if future is None:
            return None
        timeout = self.config.routing.escalation_timeout_s
        now = time.time()
        request = self.answers.escalation(row, now, now + timeout)
        self._window().escalations.sent += 1
        tasks.create_task(self._await_reply(row, future, asyncio.get_running_loop().time() + timeout))
        return request

    async def _await_reply(self, row: Row, future: asyncio.Future[EscalationReply], deadline: float) -> None:
        result = await self.escalations.wait(row.item.input_id, future, deadline)
        final = self._after_escalation(row, result)
        answers = self.answers.final_answers([final], asyncio.get_running_loop().time())
        if answers and self.coalescer.enabled:
            self.coalescer.add(row.info, answers, [row.item])
            return
        out = self.answers.results(row.info, answers) if answers else []
        if out:
            await self.outbox.put_many(out)
        notify_done([row.item], ok=True)

    def _after_escalation(self, row: Row, result: EscalationResult) -> Final:
        tally = self._window().escalations
        reply = result.reply
        if result.outcome == "answered" and reply is not None and reply.index is not None:
            tally.answered += 1
            if reply.index == row.index:
                tally.agreed += 1
            if self.shadow is not None and reply.label is not None:
                self.shadow.cloud_answer(row.item.input_id, reply.label, reply.index == row.index)
            return Final(row, "cloud", None, reply)
        if result.outcome == "timeout":
            tally.timed_out += 1
            return Final(row, "edge_fallback", "timeout")
        tally.errors += 1
        return Final(row, "edge_fallback", "error")


def _first(pair: tuple[int, Answer]) -> int:
    return pair[0]
