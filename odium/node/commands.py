"""A node's broadcast commands: each run once (over PUB or fetched) if the node's state
satisfies it, in the executor's workers; acknowledged while it runs; its output and result
sent to the hub; interrupts."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from ..core import wire as P
from ..core.clock import hub_times
from ..core.requirements import satisfies
from .ports import NodeRuntime, Sends
from .workers.kinds import Workers
from .workers.results import RESULT_BUDGET, fit_result

ACK_AFTER = 0.05  # seconds a command runs before the node acknowledges it
ENVELOPE = 4096  # bytes a message takes beside its body (envelope, signature), at most


class Received:
    """The commands received already (the last ``size``): each is run once, whether it came
    over PUB, was fetched, or both."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self.cmds: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, cmd: object) -> bool:
        return cmd in self.cmds

    def first(self, cmd: str) -> bool:
        """Note ``cmd`` as received; whether it is new."""
        if cmd in self.cmds:
            return False
        self.cmds[cmd] = None
        while len(self.cmds) > self.size:
            self.cmds.popitem(last=False)
        return True


class Commands:
    """Runs the hub's commands for the node called ``name`` (from the node's loop thread)."""

    def __init__(self, rt: NodeRuntime, name: str, send: Sends, received: Received,
                 workers: Workers) -> None:
        self.rt = rt
        self.name = name
        self.send = send
        self.received = received
        self.executor = workers.commands(rt.loop, str(rt.app), self._on_event)

    def on_exec(self, msg: P.Message, body: P.Exec) -> None:
        if self.name not in msg.env.to or not self.received.first(body.cmd):
            return  # not for this node, or exactly once: already received (PUB or fetch)
        if not satisfies(body.require, self.rt.state, self.rt.state):
            now = time.time()
            self.send("result", P.ResultBody(
                body.cmd, "state_mismatch", now, now,
                error=P.ErrorInfo("StateMismatch", f"this node's state is {self.rt.state}, the "
                                  f"command requires {body.require}"),
                mismatch={"required": body.require, "state": self.rt.state}), keep=True)
            return
        # one deadline, the hub's: counted from the issue, whether it waits in its session or
        # runs (the node's clock is the hub's time, odium.core.clock)
        left = (body.deadline - self.rt.clock() if body.deadline is not None else body.timeout)
        self.executor.submit(body.cmd, body.kind, body.code, body.session, body.timeout,
                             ephemeral=body.ephemeral,
                             deadline=None if left is None else time.monotonic() + left)
        # a command still running after ACK_AFTER is acknowledged; quick ones just answer
        cmd = body.cmd
        self.rt.loop.call_later(ACK_AFTER, lambda: self.send("ack", P.Ack(cmd))
                                if cmd in self.executor.runs else None)

    def on_interrupt(self, msg: P.Message, body: P.Interrupt) -> None:
        if self.name in msg.env.to:
            self.executor.interrupt(body.cmd)

    def _on_event(self, ev: dict[str, Any]) -> None:
        """From the executor: a command's output, or its result."""
        if ev["op"] == "out":
            self._send_output(ev["cmd"], ev["stream"], ev["text"])
        elif ev["op"] == "done":
            self.send("result", self._result_body(ev["cmd"], ev["result"]), keep=True)

    def _send_output(self, cmd: str, stream: str, text: str) -> None:
        """Output as messages within the limit as JSON (a NUL takes 6 bytes there): halved
        until each part fits."""
        body = P.Output(cmd, stream, text)  # type: ignore[arg-type]
        # (measured only when it might not fit: no character takes more than 6 bytes as JSON)
        if len(text) > 1 and 6 * len(text) + ENVELOPE > P.MAX_MESSAGE and not fits(body):
            half = len(text) // 2
            self._send_output(cmd, stream, text[:half])
            self._send_output(cmd, stream, text[half:])
            return
        self.send("output", body)

    def _result_body(self, cmd: str, res: dict[str, Any]) -> P.ResultBody:
        """The result's body, checked against the limit as it goes (JSON, escapes included);
        one over it is fitted again, smaller (its worker measured it another way)."""
        budget = RESULT_BUDGET
        for _ in range(4):
            body = _result(cmd, hub_times(res, self.rt.clock.skew()))
            size = len(P.encode_json(body))
            if size + ENVELOPE <= P.MAX_MESSAGE:
                return body
            budget = int(budget * (P.MAX_MESSAGE - ENVELOPE) / size * 0.9)
            res = fit_result(res, budget)
        return P.ResultBody(cmd, res["status"], res["started"], res["finished"],
                            stderr=f"[odium: the result ({size} bytes as JSON) could not be "
                            "made to fit in one message; only its status is sent]\n")


def fits(body: P.Body) -> bool:
    """Whether a message with this body is within the limit of one message, as JSON."""
    return len(P.encode_json(body)) + ENVELOPE <= P.MAX_MESSAGE


def _result(cmd: str, r: dict[str, Any]) -> P.ResultBody:
    """A result's body: its fields (what only the node needs, e.g. ``sizes``, stays)."""
    err = r.get("error")
    return P.ResultBody(
        cmd, r["status"], r["started"], r["finished"], r.get("stdout", ""),
        r.get("stderr", ""), r.get("value"), r.get("value_repr"), r.get("value_json", True),
        P.ErrorInfo(err["ename"], err["evalue"], err.get("traceback", "")) if err else None,
        r.get("exit"), outputs=[P.Display(o["data"], o.get("metadata") or {})
                                for o in r.get("outputs") or []])


__all__ = ["ACK_AFTER", "Commands", "Received"]
