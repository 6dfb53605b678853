"""Open-loop HTTP/1.1 load generator for the lookup API (run as its own process).

    python bench/loadgen.py --url http://127.0.0.1:8000 --rate 1000 --seconds 10 --conns 16 \
                            --users 10000 [--prefix u]

Request i is due at ``t0 + i / rate`` (open loop: a slow answer does not slow the offered
load, so queueing is measured rather than hidden - no coordinated omission). Each request
goes out on an idle keep-alive connection; latency = response fully read - due time. A tiny
asyncio client (raw sockets, Content-Length framing) keeps the client's own cost per request
to a few µs, so what is measured is the server. Prints one JSON line with percentiles (ms).
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from urllib.parse import urlsplit

import typer

app = typer.Typer(add_completion=False)


async def _conn(host: str, port: int):
    return await asyncio.open_connection(host, port)


async def _request(reader, writer, path: bytes, host: bytes) -> int:
    writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    i = head.lower().find(b"content-length:")
    n = int(head[i + 15:head.index(b"\r\n", i)]) if i >= 0 else 0
    if n:
        await reader.readexactly(n)
    return status


async def _run(url: str, rate: float, seconds: float, conns: int, users: int, prefix: str) -> dict:
    u = urlsplit(url)
    host = u.hostname or "127.0.0.1"
    port = u.port or 80
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(conns):
        pool.put_nowait(await _conn(host, port))
    rng = random.Random(0)
    n = int(rate * seconds)
    paths = [f"/v1/users/{prefix}{rng.randrange(users):07d}/clv".encode() for _ in range(n)]
    lat: list[float] = []
    status: dict = {}
    hbytes = f"{host}:{port}".encode()

    async def one(path: bytes, due: float) -> None:
        r, w = await pool.get()
        try:
            st = await _request(r, w, path, hbytes)
        except (ConnectionError, asyncio.IncompleteReadError):
            st = 0
            r, w = await _conn(host, port)
        pool.put_nowait((r, w))
        lat.append(time.perf_counter() - due)
        status[st] = status.get(st, 0) + 1

    tasks = []
    t0 = time.perf_counter() + 0.05
    for i, path in enumerate(paths):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(path, due)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    while not pool.empty():
        _, w = pool.get_nowait()
        w.close()
    lat.sort()

    def q(p: float) -> float:
        return 1000 * lat[min(len(lat) - 1, int(p / 100 * len(lat)))]

    return {"requests": n, "achieved": n / wall, "p50": q(50), "p90": q(90), "p99": q(99), "p999": q(99.9),
            "max": 1000 * lat[-1], "status": {str(k): v for k, v in status.items()}}


@app.command()
def main(url: str = typer.Option(...), rate: float = typer.Option(1000.0), seconds: float = typer.Option(10.0),
         conns: int = typer.Option(16), users: int = typer.Option(10000), prefix: str = typer.Option("u")) -> None:
    import uvloop

    print(json.dumps(uvloop.run(_run(url, rate, seconds, conns, users, prefix))))


if __name__ == "__main__":
    app()
