"""Lookup API latency under load: `clv serve` in one process, the load generator in another.

    .venv/bin/python bench/api_lookup.py [--rates 500,1000,2000] [--seconds 10] [--users 10000]
                                         [--runs 2] [--json OUT]

Redis gets ``--users`` scored users (written like the worker writes them), `clv serve`
(uvicorn + uvloop + httptools, one process) serves them, and ``bench/loadgen.py`` offers a
fixed request rate of ``GET /v1/users/{id}/clv`` on 16 keep-alive connections (open loop,
latency from each request's due time). Also shown: the server's CPU µs per request and its
own mean handler time (``clv_api_request_seconds``, Redis round trip included, HTTP parsing
excluded).
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import typer

from common import REPO, Report, cpu_seconds, load, median, stack

app = typer.Typer(add_completion=False)
TARGET_P99_MS = 2.0


async def _populate(settings, users: int) -> None:
    import random

    from redis_memory import MODEL_VERSION, folded_states
    from streams.store import RedisStore, Score, Update, redis_client

    states, _ = folded_states(500)
    store = RedisStore(redis_client(settings), settings.redis_prefix)
    await store.write_meta()
    rng = random.Random(2)
    chunk = []
    for i in range(users):
        chunk.append(Update(f"u{i:07d}", states[i % len(states)].copy(), 0,
                            Score(rng.lognormvariate(4, 1.5), rng.random(), "mid", MODEL_VERSION, time.time())))
        if len(chunk) == 1000:
            await store.save_many(chunk)
            chunk = []
    if chunk:
        await store.save_many(chunk)
    await store.r.aclose()


def _handler_mean_ms(port: int) -> float:
    import httpx

    s = c = 0.0
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines():
        if line.startswith('clv_api_request_seconds_sum{route="lookup"}'):
            s = float(line.split()[-1])
        if line.startswith('clv_api_request_seconds_count{route="lookup"}'):
            c = float(line.split()[-1])
    return 1000 * s / c if c else float("nan")


def _loadgen(port: int, rate: float, seconds: float, users: int) -> dict:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "loadgen.py"), "--url", f"http://127.0.0.1:{port}",
                          "--rate", str(rate), "--seconds", str(seconds), "--users", str(users)],
                         capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


SERVERS = {
    "clv serve": [sys.executable, "-m", "clv_cli", "serve", "--port", "{port}"],
    "floor: uvicorn+HMGET": [sys.executable, "-m", "uvicorn", "bench.asgi_floor:redis", "--port", "{port}",
                             "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"],
    "floor: uvicorn static": [sys.executable, "-m", "uvicorn", "bench.asgi_floor:static", "--port", "{port}",
                              "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"],
}


def _serve_and_load(svc, s, server: str, rates: str, seconds: float, users: int, runs: int, rep, p99s) -> None:
    import httpx

    from tests.conftest import free_ports

    (port,) = free_ports(1)
    env = {**os.environ, **s.to_env(), "PYTHONUNBUFFERED": "1"}
    log = open(svc.root / "api.log", "ab")
    argv = [a.replace("{port}", str(port)) for a in SERVERS[server]]
    srv = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/users/u0000001/clv", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if srv.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{server} did not start: {(svc.root / 'api.log').read_text()[-2000:]}")
            time.sleep(0.2)
        _loadgen(port, 200, 2, users)  # warm-up
        for rate in [float(r) for r in rates.split(",") if r.strip()]:
            for run in range(runs):
                c0 = cpu_seconds(srv.pid)
                res = _loadgen(port, rate, seconds, users)
                cpu = cpu_seconds(srv.pid) - c0
                bad = sum(v for k, v in res["status"].items() if k != "200")
                handler = _handler_mean_ms(port) if server == "clv serve" else float("nan")
                rep.add(server, rate, run + 1, res["achieved"], res["p50"], res["p90"], res["p99"], res["p999"],
                        res["max"], bad, 1e6 * cpu / res["requests"], handler, load())
                p99s.setdefault((server, rate), []).append(res["p99"])
    finally:
        srv.terminate()
        srv.wait(20)


@app.command()
def main(rates: str = typer.Option("500,1000,2000"), seconds: float = typer.Option(10.0),
         servers: str = typer.Option("clv serve,floor: uvicorn+HMGET,floor: uvicorn static",
                                     help="which servers to load (clv serve, and the floors of bench/asgi_floor.py)"),
         users: int = typer.Option(10_000), runs: int = typer.Option(2, min=1),
         json_out: Path = typer.Option(None, "--json")) -> None:
    rep = Report("Lookup API latency under load (GET /v1/users/{id}/clv, separate load-generator process)",
                 ["server", "offered req/s", "run", "achieved req/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms",
                  "non-200", "server CPU µs/req", "handler mean ms", "load"])
    p99s: dict = {}
    with stack(need_kafka=False) as svc:
        s = svc.fresh("api")
        asyncio.run(_populate(s, users))
        for server in servers.split(","):
            _serve_and_load(svc, s, server.strip(), rates, seconds, users, runs, rep, p99s)
    for (server, rate), v in p99s.items():
        if server != "clv serve":
            continue
        rep.target(f"lookup p99 at {rate:,.0f} req/s", f"<= {TARGET_P99_MS} ms", f"{median(v):.2f} ms (median of runs)",
                   median(v) <= TARGET_P99_MS)
    rep.notes.append(f"{users:,} users in Redis; 16 keep-alive connections; uvicorn 1 process (loop uvloop, "
                     "http httptools); the load generator and server share the machine's 2 cores with everything else")
    rep.show()
    rep.save(json_out)


if __name__ == "__main__":
    app()
