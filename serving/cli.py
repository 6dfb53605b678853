"""`clv serve` (lookup API + ops page) and `clv lag` (consumer lag straight from Kafka)."""
from __future__ import annotations

import typer

cli = typer.Typer()


@cli.command()
def serve(
    host: str = typer.Option(None, help="bind address [default: CLV_API_HOST]"),
    port: int = typer.Option(None, help="port [default: CLV_API_PORT]"),
    workers: int = typer.Option(1, help="uvicorn worker processes"),
    access_log: bool = typer.Option(False, help="log every request (costs latency)"),
) -> None:
    """Serve the CLV lookup API, /ops page and /docs (read-only on Redis)."""
    import uvicorn

    from streams.settings import get_settings

    settings = get_settings()
    host = host or settings.api_host
    port = port or settings.api_port
    typer.echo(f"CLV API on http://{host}:{port}  (docs /docs, ops page /ops)"
               + ("  bearer token required on /v1" if settings.api_token else ""))
    uvicorn.run("serving.api:create_app", factory=True, host=host, port=port, workers=workers,
                loop="uvloop", http=_http_impl(), access_log=access_log, log_level="warning")


def _http_impl() -> str:
    try:
        import httptools  # noqa: F401
        return "httptools"
    except ImportError:
        return "h11"


@cli.command()
def lag(
    interval: float = typer.Option(5.0, help="seconds between the two samples (rates)"),
    topic: list[str] = typer.Option(None, help="topic(s) [default: the four event topics]"),
    group: str = typer.Option(None, help="consumer group [default: CLV_CONSUMER_GROUP]"),
    wait: float = typer.Option(0.0, help="first wait up to this many seconds for lag 0 on every partition"),
) -> None:
    """Per-partition consumer lag, consume rate and time to catch up, straight from Kafka."""
    import asyncio
    import logging

    from rich.console import Console

    from serving.lag import KafkaUnavailable
    from streams.settings import get_settings

    settings = get_settings()
    console = Console()
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # we say what failed, once
    try:
        if wait > 0:
            waited = asyncio.run(_wait_zero(settings, topic or None, group, wait))
            console.print(f"caught up in {waited:.1f}s" if waited is not None
                          else f"[yellow]still lagging after {wait:.0f}s[/yellow]")
        first, second, dt = asyncio.run(_two_samples(settings, topic or None, group, interval))
    except KafkaUnavailable as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    console.print(lag_table(first, second, dt, group or settings.consumer_group))
    if not second:
        console.print(f"[yellow]no partitions: none of the topics {', '.join(topic or settings.event_topics)}"
                      " exist yet (the worker or `clv topics` creates them)[/yellow]")


async def _wait_zero(settings, topics, group, timeout: float) -> float | None:
    """Seconds until every partition has lag 0 and a commit (None on timeout)."""
    import asyncio
    import time

    from serving.lag import LagReader

    reader = LagReader(settings, topics, group, timeout_s=10.0)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < timeout:
            lags = await reader.read()
            if lags and all(pl.lag == 0 and (pl.committed is not None or pl.end == 0) for pl in lags):
                return time.monotonic() - t0
            await asyncio.sleep(1.0)
        return None
    finally:
        await reader.close()


@cli.command()
def top(n: int = typer.Option(10, "-n", "--limit", help="how many users")) -> None:
    """The top users by expected CLV, straight from Redis."""
    from rich.console import Console
    from rich.table import Table

    from serving.client import _sync_redis, lookup_many
    from streams.keys import Keys
    from streams.settings import get_settings

    s = get_settings()
    r = _sync_redis(s)
    keys = Keys(s.redis_prefix)
    rows = r.zrevrange(keys.top, 0, n - 1, withscores=True)
    total = r.zcard(keys.top)
    found = lookup_many([u.decode() for u, _ in rows], s)
    t = Table(title=f"top {len(rows)} of {total} scored users by expected CLV")
    for col in ("user", "expected CLV", "P(buy again)", "segment", "model"):
        t.add_column(col)
    for u, clv in rows:
        rec = found.get(u.decode(), {})
        t.add_row(u.decode(), f"{clv:,.2f}", f"{rec.get('p_repeat', float('nan')):.2f}",
                  str(rec.get("segment")), str(rec.get("model_version")))
    Console().print(t)


@cli.command()
def lookup(user_id: str, features: bool = typer.Option(False, help="also show the feature vector")) -> None:
    """One user's CLV as a lookup service sees it (Redis, no API needed)."""
    import json

    from serving.client import lookup as _lookup
    from streams.settings import get_settings

    s = get_settings()
    rec = _lookup(user_id, s)
    if rec is None:
        typer.echo(f"no score for user {user_id!r} (unknown user, or not scored yet)", err=True)
        raise typer.Exit(1)
    if features:
        import time

        from serving.client import _sync_redis
        from streams.fold import FEATURE_NAMES, decode_state, features as feats
        from streams.keys import Keys

        blob, emb = _sync_redis(s).hmget(Keys(s.redis_prefix).user(user_id), "s", "e")
        if blob:
            st = decode_state(blob, emb)
            rec["features"] = dict(zip(FEATURE_NAMES, (round(float(x), 4) for x in feats(st, time.time()))))
    typer.echo(json.dumps(rec, indent=2))


async def _two_samples(settings, topics, group, interval):
    import time

    from serving.lag import LagReader

    reader = LagReader(settings, topics, group, timeout_s=10.0)
    try:
        t0 = time.monotonic()
        first = await reader.read()
        if interval > 0:
            await asyncio_sleep(interval)
        second = await reader.read()
        return first, second, time.monotonic() - t0
    finally:
        await reader.close()


async def asyncio_sleep(s: float) -> None:
    import asyncio

    from rich.progress import Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("sampling lag"), TimeRemainingColumn(), transient=True) as prog:
        task = prog.add_task("", total=s)
        step = 0.25
        done = 0.0
        while done < s:
            await asyncio.sleep(min(step, s - done))
            done += step
            prog.update(task, completed=min(done, s))


def catch_up_s(lag: int, consumed_per_s: float, produced_per_s: float) -> float | None:
    """Seconds until lag is 0 at the measured rates; None when it does not shrink."""
    if lag <= 0:
        return 0.0
    drain = consumed_per_s - produced_per_s
    return lag / drain if drain > 0 else None


def fmt_catch_up(seconds: float | None, consuming: bool) -> str:
    if seconds is None:
        return "never (not draining)" if consuming else "never (not consuming)"
    if seconds == 0:
        return "caught up"
    s = seconds
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def lag_table(first, second, dt: float, group: str):
    """A rich Table from two snapshots taken ``dt`` seconds apart."""
    from rich.table import Table

    before = {(p.topic, p.partition): p for p in first}
    t = Table(title=f"consumer group {group}", show_footer=True)
    cols = ("topic", "partition", "end offset", "committed", "lag", "consumed/s", "produced/s",
            "time to catch up")
    tot_lag = tot_c = tot_p = 0.0
    worst: float | None = 0.0
    rows = []
    for p in second:
        b = before.get((p.topic, p.partition))
        c_rate = pr_rate = 0.0
        if b is not None and dt > 0:
            if p.committed is not None:
                was = b.committed if b.committed is not None else p.beginning
                c_rate = max(0, p.committed - was) / dt
            pr_rate = max(0, p.end - b.end) / dt
        eta = catch_up_s(p.lag, c_rate, pr_rate)
        worst = None if eta is None or worst is None else max(worst, eta)
        tot_lag += p.lag
        tot_c += c_rate
        tot_p += pr_rate
        rows.append((p.topic, str(p.partition), f"{p.end:,}",
                     "none" if p.committed is None else f"{p.committed:,}", f"{p.lag:,}",
                     f"{c_rate:,.1f}", f"{pr_rate:,.1f}", fmt_catch_up(eta, c_rate > 0)))
    footers = ("total", "", "", "", f"{int(tot_lag):,}", f"{tot_c:,.1f}", f"{tot_p:,.1f}",
               fmt_catch_up(worst, tot_c > 0))
    for name, foot in zip(cols, footers):
        t.add_column(name, footer=foot, justify="left" if name == "topic" else "right")
    for r in rows:
        t.add_row(*r)
    return t
