"""Decoder cost per message: streams.events.decode (pydantic) vs the msgspec prototype.

    .venv/bin/python bench/decode.py [--events 50000] [--bad 2000] [--runs 3] [--json OUT]

Same simulated wire messages (plus ``streams.sim.bad.bad_messages``) through both decoders,
alternating run by run; reports µs per message for valid events and for bad ones, and how often the two agree on
accept/reject and on the rejection reason (the prototype must reach 100 % on accept/reject
before it could replace the real one; reason texts differ by design).
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import typer

from common import Report, load, sim_messages

app = typer.Typer(add_completion=False)


@app.command()
def main(events: int = typer.Option(50_000), bad: int = typer.Option(2000), runs: int = typer.Option(3, min=1),
         json_out: Path = typer.Option(None, "--json")) -> None:
    from bench.prototypes import fast_decode
    from streams.events import Rejection, decode
    from streams.sim.bad import FAR_FUTURE, bad_messages

    good = [(m.value, m.key, m.kind) for m in sim_messages(events, duplicates=0.0, bad=0.0)]
    bads = [(b.raw, b.key, b.kind, b.reason) for b in bad_messages(random.Random(3), bad)]
    now = time.time()
    rep = Report("Decode + validate per message: pydantic (streams.events.decode) vs msgspec prototype",
                 ["decoder", "messages", "run", "µs/message", "speed-up", "load"])
    for label, msgs in (("valid events", good), ("bad messages", [(r, k, t) for r, k, t, _ in bads])):
        base = []
        for run in range(runs):
            for name, fn in (("pydantic (as shipped)", decode), ("msgspec prototype", fast_decode.decode)):
                t0 = time.perf_counter()
                for raw, key, kind in msgs:
                    fn(raw, now=now if label == "valid events" else FAR_FUTURE - 1, key=key, expect_type=kind)
                us = 1e6 * (time.perf_counter() - t0) / len(msgs)
                if name.startswith("pydantic"):
                    base.append(us)
                rep.add(name, label, run + 1, us, f"{base[-1] / us:.1f}x", load())
    agree_ok = agree_reason = 0
    for raw, key, kind, _want in bads:
        a = decode(raw, now=FAR_FUTURE - 1, key=key, expect_type=kind)
        b = fast_decode.decode(raw, now=FAR_FUTURE - 1, key=key, expect_type=kind)
        agree_ok += isinstance(a, Rejection) == isinstance(b, Rejection)
        agree_reason += isinstance(a, Rejection) and isinstance(b, Rejection) and a.reason == b.reason
    good_ok = sum(not isinstance(fast_decode.decode(r, now=now, key=k, expect_type=t), Rejection) for r, k, t in good)
    rep.notes.append(f"agreement on {len(bads)} bad messages: accept/reject {100 * agree_ok / len(bads):.1f} %, "
                     f"same reason {100 * agree_reason / len(bads):.1f} %; valid events accepted by the prototype: "
                     f"{100 * good_ok / len(good):.1f} %")
    rep.show()
    rep.save(json_out)


if __name__ == "__main__":
    app()
