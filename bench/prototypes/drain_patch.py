"""Prototype patch of faust's ``Consumer._drain_messages`` (faust-streaming 0.15.3).

Faust hands every fetched message to the conductor with
``await self.wait_first(callback(message), self.suspend_flow.wait())``: two new tasks and an
``asyncio.wait`` per message, only so that a rebalance (``suspend_flow`` set) can interrupt
a callback blocked on a full stream buffer. The patch awaits the callback directly while flow
is not suspended and keeps the original race when it is. Applied by rewriting the one line
in the method's source (the rest of the method is faust's own code).
"""
from __future__ import annotations

import inspect
import textwrap

OLD = """await self.wait_first(
                                callback(message), self.suspend_flow.wait()
                            )"""
NEW = """if suspend_flow_is_set():
                                await self.wait_first(
                                    callback(message), self.suspend_flow.wait()
                                )
                            else:
                                await callback(message)"""


def apply() -> None:
    from faust.transport import consumer as mod

    src = inspect.getsource(mod.Consumer._drain_messages)
    if OLD not in src:
        raise RuntimeError("faust's Consumer._drain_messages changed; the drain patch does not apply")
    src = src.replace(OLD, NEW).replace(
        "callback = self.callback", "callback = self.callback\n        suspend_flow_is_set = self.suspend_flow.is_set", 1)
    ns: dict = {}
    exec(compile(textwrap.dedent(src), mod.__file__, "exec"), vars(mod), ns)  # noqa: S102 - our own patch text
    mod.Consumer._drain_messages = ns["_drain_messages"]
