"""A paced live feed for the latency benchmarks (run as its own process).

    python bench/feed.py --rate 5000 --events 100000 [--seed 3]

Reads the CLV_* settings (topics, bootstrap) like the worker. Events are simulated up front;
while sending, every 2 ms tick hands the producer the events due by then, each re-stamped
with ``ts`` = the wall clock at that moment (so ts = send time, as a live shop would).
Prints one JSON line at the end: events sent, seconds, achieved rate.
"""
from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import typer  # noqa: E402

app = typer.Typer(add_completion=False)


async def _send(rate: float, events: int, seed: int) -> dict:
    import orjson
    from aiokafka import AIOKafkaProducer

    from common import sim_messages
    from streams.kafka import client_kwargs
    from streams.settings import get_settings
    from streams.sim.publish import topic_for

    s = get_settings()
    msgs = [m for m in sim_messages(events, seed=seed, duplicates=0.0, bad=0.0)][:events]
    objs = [(topic_for(s)[m.kind], m.key, orjson.loads(m.value)) for m in msgs]
    # the pre-simulated events (a live shop does not hold them) out of the GC's full
    # collections: those took ~60 ms each while events were already stamped, which is latency
    # the worker did not cause
    del msgs
    gc.collect()
    gc.freeze()
    p = AIOKafkaProducer(**client_kwargs(s), acks="all", linger_ms=1, enable_idempotence=True)
    await p.start()
    futs = []
    try:
        t0 = time.perf_counter()
        i = 0
        dumps = orjson.dumps
        while i < len(objs):
            due = min(len(objs), int((time.perf_counter() - t0) * rate) + 1)
            now = round(time.time(), 6)
            while i < due:
                topic, key, obj = objs[i]
                obj["ts"] = now
                futs.append(await p.send(topic, dumps(obj), key=key))
                i += 1
            if len(futs) > 20000:
                await asyncio.gather(*futs)
                futs.clear()
            await asyncio.sleep(0.002)
        await asyncio.gather(*futs)
        secs = time.perf_counter() - t0
    finally:
        await p.stop()
    return {"events": len(objs), "seconds": secs, "rate": len(objs) / secs}


@app.command()
def main(rate: float = typer.Option(5000.0), events: int = typer.Option(100_000), seed: int = typer.Option(3)) -> None:
    import uvloop

    print(json.dumps(uvloop.run(_send(rate, events, seed))))


if __name__ == "__main__":
    app()
