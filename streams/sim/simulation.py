"""Many simulated customers merged into one time-ordered stream of typed events.

Memory stays bounded by what is *pending*: customers are planned one at a time in sign-up
order and their raw events wait in a heap until the stream's clock reaches them, so only
the future events of customers who have already signed up are held (as small tuples), and
typed events are built one by one as the stream is consumed.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
import random
from datetime import date, datetime, timedelta, timezone
from typing import Iterator

from orjson import dumps as _dumps

from streams.events import SCHEMA_VERSION, Click, Event, LineItem, Order, Profile, Review
from streams.sim.world import (
    CLICK, DAY, KIND_NAMES, ORDER, PROFILE, SimConfig, UserTruth, plan_user,
)

_PROFILE_FIELDS = tuple(n for n in Profile.model_fields if n in ("age_band", "gender", "region", "channel"))

RawEvent = tuple  # (ts, user index, per-user sequence number, kind, payload)


def to_epoch(when: date | datetime | str | float | int | None, *, days: float = 0.0) -> float:
    """Epoch seconds for a start given as a date, datetime, ISO string or number.

    ``None`` means "``days`` before today (UTC midnight)", so a default stream ends now.
    """
    if when is None:
        today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        return (today - timedelta(days=days)).timestamp()
    if isinstance(when, (int, float)):
        return float(when)
    if isinstance(when, str):
        try:
            when = datetime.fromisoformat(when)
        except ValueError as exc:
            raise ValueError(f"start {when!r} is not an ISO date such as 2025-01-31") from exc
    if not isinstance(when, datetime):
        when = datetime(when.year, when.month, when.day)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


class Simulation:
    """A deterministic simulated shop. Iterate ``iter_events()`` (lazy) or read ``events``."""

    def __init__(self, n_users: int, start: float, days: float, seed: int = 0,
                 config: SimConfig = SimConfig(), user_prefix: str = "u"):
        if n_users < 1:
            raise ValueError(f"n_users must be >= 1, got {n_users}")
        if days <= 0:
            raise ValueError(f"days must be > 0, got {days}")
        if not 0.0 < config.signup_frac <= 1.0:
            raise ValueError(f"signup_frac must be in (0, 1], got {config.signup_frac}")
        self.n_users, self.days, self.seed = n_users, days, seed
        self.config, self.user_prefix = config, user_prefix
        self.start = float(start)
        self.end = self.start + days * DAY
        r = random.Random(f"clv-sim:{seed}:signups")
        span = days * DAY * config.signup_frac
        self.signups = [round(self.start + r.random() * span, 3) for _ in range(n_users)]
        self._truth: dict[int, UserTruth] = {}
        self._uids = [f"{user_prefix}{i:06d}" for i in range(n_users)]

    def user_id(self, idx: int) -> str:
        return self._uids[idx]

    def plan(self, idx: int) -> tuple[UserTruth, list[tuple]]:
        """One customer's truth and time-sorted raw plan (pure, deterministic)."""
        truth, plan = plan_user(self.seed, idx, self.user_id(idx), self.signups[idx], self.end,
                                self.config)
        self._truth.setdefault(idx, truth)
        return truth, plan

    # ---- streams ------------------------------------------------------------------
    def iter_raw(self, limit: int | None = None) -> Iterator[RawEvent]:
        """Raw events in global time order (ties: user index, then per-user sequence).

        A k-way merge whose heap holds only each signed-up customer's next event; a
        customer is planned when the stream's clock reaches their sign-up.
        """
        order = sorted(range(self.n_users), key=self.signups.__getitem__)
        heap: list[RawEvent] = []
        rest: dict[int, tuple[list, int]] = {}  # idx -> (plan, position of the next event)
        emitted = 0
        for pos in range(self.n_users + 1):
            next_signup = self.signups[order[pos]] if pos < self.n_users else math.inf
            while heap and heap[0][0] < next_signup:
                if limit is not None and emitted >= limit:
                    return
                head = heap[0]
                idx = head[1]
                plan, i = rest[idx]
                if i < len(plan):
                    ts, kind, payload = plan[i]
                    rest[idx] = (plan, i + 1)
                    heapq.heapreplace(heap, (ts, idx, i, kind, payload))
                else:
                    del rest[idx]
                    heapq.heappop(heap)
                yield head
                emitted += 1
            if pos == self.n_users:
                return
            idx = order[pos]
            _, plan = self.plan(idx)
            if plan:
                ts, kind, payload = plan[0]
                rest[idx] = (plan, 1)
                heapq.heappush(heap, (ts, idx, 0, kind, payload))

    def iter_events(self, limit: int | None = None) -> Iterator[Event]:
        """Typed events in time order, built lazily (memory stays bounded)."""
        make = self.materialize
        for raw in self.iter_raw(limit):
            yield make(raw)

    @property
    def events(self) -> list[Event]:
        """All events as a list (convenient for small runs; use ``iter_events`` for big ones)."""
        return list(self.iter_events())

    def materialize(self, raw: RawEvent) -> Event:
        ts, idx, n, kind, p = raw
        uid = self._uids[idx]
        eid = f"e{self.seed}-{idx}-{n}"
        if kind == CLICK:
            return Click(event_id=eid, user_id=uid, ts=ts, type="click", action=p[0],
                         item_id=p[1], category=p[2])
        if kind == ORDER:
            order_id, amount, currency, lines = p
            items = tuple(LineItem(item_id=i, category=c, qty=q, price=pr) for i, c, q, pr in lines)
            return Order(event_id=eid, user_id=uid, ts=ts, type="order", order_id=order_id,
                         amount=amount, currency=currency, items=items)
        if kind == PROFILE:
            return Profile(event_id=eid, user_id=uid, ts=ts, type="profile", **p)
        item_id, rating, text = p
        return Review(event_id=eid, user_id=uid, ts=ts, type="review", item_id=item_id,
                      rating=rating, text=text)

    def wire(self, raw: RawEvent) -> tuple[str, bytes, bytes]:
        """``(type, key, value)`` for a raw event: the same bytes as
        ``encode(materialize(raw))`` (a unit test proves it) at a fraction of the cost."""
        ts, idx, n, kind, p = raw
        uid = self._uids[idx]
        d = {"schema": SCHEMA_VERSION, "event_id": f"e{self.seed}-{idx}-{n}", "user_id": uid,
             "ts": ts, "type": KIND_NAMES[kind]}
        if kind == CLICK:
            d["action"] = p[0]
            if p[1] is not None:
                d["item_id"] = p[1]
            if p[2] is not None:
                d["category"] = p[2]
        elif kind == ORDER:
            d["order_id"], d["amount"], d["currency"] = p[0], p[1], p[2]
            d["items"] = [{"item_id": i, "category": c, "qty": q, "price": pr} for i, c, q, pr in p[3]]
        elif kind == PROFILE:
            for name in _PROFILE_FIELDS:
                if name in p:
                    d[name] = p[name]
        else:
            d["item_id"], d["rating"], d["text"] = p
        return d["type"], uid.encode(), _dumps(d)

    def iter_wire(self, limit: int | None = None) -> Iterator[tuple[str, bytes, bytes]]:
        """``(type, key, value)`` in time order: what goes to Kafka or a JSONL file."""
        wire = self.wire
        for raw in self.iter_raw(limit):
            yield wire(raw)

    # ---- ground truth ------------------------------------------------------------
    @property
    def truth(self) -> dict[str, UserTruth]:
        """Per-user hidden traits and realised orders, keyed by user_id."""
        for idx in range(self.n_users):
            if idx not in self._truth:
                self.plan(idx)
        return {self.user_id(i): self._truth[i] for i in range(self.n_users)}

    def customers_at(self, cutoff: float) -> list[str]:
        """Users who had signed up by ``cutoff``."""
        return [self.user_id(i) for i, s in enumerate(self.signups) if s <= cutoff]

    def future_spend(self, cutoff: float, horizon_days: float, *, strict: bool = True) -> dict[str, float]:
        """True USD spend in ``(cutoff, cutoff + horizon]`` for every user signed up by ``cutoff``.

        This is what the stream itself contains after the cutoff (orders converted with
        ``streams.fold.FX_TO_USD``), so it is the label a model should predict.
        """
        until = cutoff + horizon_days * DAY
        if strict and until > self.end + 1e-6:
            raise ValueError(
                f"cutoff + {horizon_days} days ends {(until - self.end) / DAY:.1f} days after the "
                "simulated span; pick an earlier cutoff, a shorter horizon or simulate more days "
                "(or pass strict=False to count only what was simulated)"
            )
        truth = self.truth
        return {uid: truth[uid].spend_between(cutoff, until) for uid in self.customers_at(cutoff)}


def simulate(n_users: int = 1000, start: date | datetime | str | float | None = None,
             days: float = 365, seed: int = 0, *, config: SimConfig | None = None,
             user_prefix: str = "u", **knobs) -> Simulation:
    """Build a simulated shop. ``knobs`` override fields of :class:`SimConfig`."""
    cfg = config or SimConfig()
    if knobs:
        valid = {f.name for f in dataclasses.fields(SimConfig)}
        unknown = sorted(set(knobs) - valid)
        if unknown:
            raise TypeError(f"unknown simulator knob(s) {unknown}; valid knobs: {sorted(valid)}")
        cfg = dataclasses.replace(cfg, **knobs)
    return Simulation(n_users, to_epoch(start, days=days), days, seed, cfg, user_prefix)


__all__ = ["Simulation", "SimConfig", "UserTruth", "simulate", "to_epoch"]
