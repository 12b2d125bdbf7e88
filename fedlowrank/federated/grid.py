"""A Grid wrapper whose ``send_and_receive`` polls for replies every ``poll_s`` seconds.

Flower 1.41's deployed Grid (``flwr.superlink.grid.http_grid``) sleeps a fixed 3 s between reply pulls,
so every deployed round pays up to 3 s after the last reply arrived. This wrapper keeps Flower's
semantics (push all, pull until every reply is in or ``timeout`` passes; ``timeout=None`` waits forever)
with the public ``push_messages``/``pull_messages`` calls and a shorter poll. Everything else is
delegated to the wrapped Grid.
"""
from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class PollingGrid(Grid):
    """``Grid`` delegating to ``inner``, with ``send_and_receive`` polling every ``poll_s`` seconds."""

    def __init__(self, inner: Grid, poll_s: float) -> None:
        if not poll_s > 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        self.inner, self.poll_s = inner, poll_s

    def set_run(self, run) -> None:  # noqa: D102
        self.inner.set_run(run)

    @property
    def run(self):  # noqa: D102
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:  # noqa: D102
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.inner.get_node_ids()

    def get_nodes(self):  # noqa: D102
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``; pull replies every ``poll_s`` s until all are in or ``timeout`` s passed."""
        pending = set(self.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        out: list[Message] = []
        while pending and (timeout is None or time.time() < end):
            got = list(self.pull_messages(pending))
            out.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(self.poll_s)
        return out
