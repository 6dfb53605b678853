"""The event simulator: determinism, validity, ground truth, learnable signal, bad input."""
from __future__ import annotations

import collections
import random
import re
import statistics
import time
import types

import pytest
from typer.testing import CliRunner

from streams.events import Event, Rejection, decode, encode
from streams.fold import FX_TO_USD
from streams.sim import text as T
from streams.sim.bad import MAKERS
from streams.sim.world import DAY, PRE_PURCHASE_DAYS
from streams.simulate import DUPLICATE, EVENT, bad_messages, cli, mix, simulate

START = "2024-01-01"


@pytest.fixture(scope="module")
def small():
    """A small shop whose full stream is materialised (validity tests)."""
    sim = simulate(250, START, days=240, seed=11)
    return sim, sim.events


@pytest.fixture(scope="module")
def big():
    """A bigger shop for statistics: truth, raw click times and reviews only (cheap)."""
    sim = simulate(2500, START, days=365, seed=3)
    clicks = collections.defaultdict(list)
    reviews = []
    for raw in sim.iter_raw():
        if raw[3] == 1:
            clicks[sim.user_id(raw[1])].append(raw[0])
        elif raw[3] == 3:
            reviews.append(sim.materialize(raw))
    return types.SimpleNamespace(sim=sim, truth=sim.truth, clicks=clicks, reviews=reviews)


# ---- determinism and validity -----------------------------------------------------------
def test_same_seed_same_stream_other_seed_other_stream():
    a = [v for _, _, v in simulate(60, START, 90, seed=5).iter_wire()]
    b = [v for _, _, v in simulate(60, START, 90, seed=5).iter_wire()]
    c = [v for _, _, v in simulate(60, START, 90, seed=6).iter_wire()]
    assert a == b and len(a) > 500
    assert a != c


def test_every_event_decodes_and_ids_are_unique(small):
    sim, events = small
    assert len(events) > 5000
    ids, orders = set(), set()
    for _, key, value in sim.iter_wire():
        ev = decode(value, now=sim.end, key=key, expect_type=None)
        assert not isinstance(ev, Rejection), (ev, value[:200])
        decode_typed = decode(value, now=sim.end, key=key, expect_type=ev.type)
        assert decode_typed == ev
        ids.add(ev.event_id)
        if ev.type == "order":
            orders.add(ev.order_id)
    assert len(ids) == len(events)
    assert len(orders) == sum(e.type == "order" for e in events)
    assert {e.type for e in events} == {"click", "order", "review", "profile"}
    assert {e.action for e in events if e.type == "click"} == {
        "view", "search", "cart", "wishlist", "like", "share"}


def test_fast_wire_bytes_equal_encode(small):
    sim, _ = small
    for raw in sim.iter_raw():
        kind, key, value = sim.wire(raw)
        ev = sim.materialize(raw)
        assert value == encode(ev) and key == ev.user_id.encode() and kind == ev.type


def test_time_order_and_first_appearance(small):
    sim, events = small
    ts = [e.ts for e in events]
    assert ts == sorted(ts)
    assert sim.start <= ts[0] and ts[-1] < sim.end
    by_user: dict[str, list[Event]] = collections.defaultdict(list)
    for e in events:
        by_user[e.user_id].append(e)
    truth = sim.truth
    for uid, evs in by_user.items():
        assert evs[0].type == "profile" and evs[0].ts == truth[uid].signup_ts
        assert all(x.ts <= y.ts for x, y in zip(evs, evs[1:]))
        seqs = [int(e.event_id.rsplit("-", 1)[1]) for e in evs]
        assert seqs == list(range(len(evs)))


def test_orders_add_up_and_are_mostly_usd(small):
    _, events = small
    orders = [e for e in events if e.type == "order"]
    assert len(orders) > 100
    for o in orders:
        assert o.items and abs(sum(li.qty * li.price for li in o.items) - o.amount) < 0.006
        assert all(li.category for li in o.items)
    cur = collections.Counter(o.currency for o in orders)
    assert set(cur) == {"USD", "EUR", "GBP"}
    assert cur["USD"] / len(orders) > 0.75


def test_lazy_stream_and_limit():
    sim = simulate(400, START, 200, seed=1)
    it = sim.iter_events(limit=100)
    assert not isinstance(it, list)
    got = list(it)
    assert len(got) == 100
    assert len(sim._truth) < 400  # only the customers reached so far were planned
    assert [encode(e) for e in got] == [v for _, _, v in sim.iter_wire(limit=100)]


def test_knobs_and_bad_arguments():
    quiet = simulate(200, START, 120, seed=2, purchase_rate=0.005)
    loud = simulate(200, START, 120, seed=2, purchase_rate=0.1)
    n = lambda s: sum(len(t.order_ts) for t in s.truth.values())  # noqa: E731
    assert n(loud) > 3 * n(quiet)
    with pytest.raises(TypeError, match="unknown simulator knob"):
        simulate(10, START, 10, seed=1, purchse_rate=1.0)
    with pytest.raises(ValueError, match="ISO date"):
        simulate(10, "first of May", 10)


# ---- ground truth -------------------------------------------------------------------------
def test_future_spend_is_what_the_stream_contains(small):
    sim, events = small
    cutoff = sim.start + 120 * DAY
    fs = sim.future_spend(cutoff, 90)
    signed_up = {e.user_id for e in events if e.ts <= cutoff}
    assert set(fs) == signed_up
    from_stream: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.type == "order" and cutoff < e.ts <= cutoff + 90 * DAY:
            from_stream[e.user_id] += e.amount * FX_TO_USD[e.currency]
    for uid, spend in fs.items():
        assert spend == pytest.approx(from_stream.get(uid, 0.0), abs=1e-6)
    assert sum(fs.values()) > 0
    with pytest.raises(ValueError, match="after the simulated span"):
        sim.future_spend(cutoff, 365)
    assert sim.future_spend(cutoff, 365, strict=False)


def test_truth_traits_are_plausible(big):
    sim, truth = big.sim, big.truth
    for t in truth.values():
        assert t.purchase_rate > 0 and t.spend_level > 0
        assert t.signup_ts <= t.churn_ts <= t.base_churn_ts
        assert all(sim.start <= x < sim.end for x in t.order_ts)
        assert all(x < t.churn_ts for x in t.order_ts)  # the dead do not buy


# ---- signal a model can learn --------------------------------------------------------------
def test_future_spend_is_heavy_tailed(big):
    sim = big.sim
    spend = sorted(sim.future_spend(sim.start + 200 * DAY, 120).values(), reverse=True)
    total = sum(spend)
    assert total > 0
    assert sum(spend[: len(spend) // 10]) / total > 0.5  # top 10 % of customers: most revenue
    assert sum(s == 0 for s in spend) / len(spend) > 0.4  # many buy nothing in the horizon


def test_unhappy_reviewers_churn_more_happy_ones_stay(big):
    sim, truth = big.sim, big.truth
    end = sim.end

    def churn_within_60d(field: str) -> float:
        after = [t.churn_ts < r + 60 * DAY for t in truth.values() for r in getattr(t, field)
                 if r + 60 * DAY < end]
        assert len(after) > 150
        return sum(after) / len(after)

    assert churn_within_60d("neg_review_ts") > churn_within_60d("pos_review_ts") + 0.15
    neg = [t for t in truth.values() if t.neg_review_ts]
    happy = [t for t in truth.values() if t.pos_review_ts and not t.neg_review_ts]
    churned = lambda ts: sum(t.churn_ts < end for t in ts) / len(ts)  # noqa: E731
    assert churned(neg) > churned(happy)
    # the bad review comes first, churn follows soon
    gaps = [(t.churn_ts - t.neg_review_ts[0]) / DAY for t in neg if t.churn_ts < end]
    assert statistics.median(gaps) < 45


def test_browsing_intensifies_before_orders(big):
    sim, truth, clicks = big.sim, big.truth, big.clicks
    before, baseline = [], []
    for uid, t in truth.items():
        cs = clicks.get(uid, [])
        alive_days = (min(t.churn_ts, sim.end) - t.signup_ts) / DAY
        if not t.order_ts or alive_days < 60:
            continue
        baseline.append(len([c for c in cs if c < t.churn_ts]) / alive_days * PRE_PURCHASE_DAYS)
        for o in t.order_ts:
            before.append(sum(1 for c in cs if o - PRE_PURCHASE_DAYS * DAY <= c < o))
    assert statistics.mean(before) > 1.5 * statistics.mean(baseline)


def test_browsing_fades_after_churn(big):
    sim, truth, clicks = big.sim, big.truth, big.clicks
    alive, dead = 0, 0
    n = 0
    for uid, t in truth.items():
        if t.churn_ts + 90 * DAY > sim.end or t.churn_ts - 30 * DAY < t.signup_ts:
            continue
        cs = clicks.get(uid, [])
        alive += sum(1 for c in cs if t.churn_ts - 30 * DAY <= c < t.churn_ts)
        dead += sum(1 for c in cs if t.churn_ts + 30 * DAY <= c < t.churn_ts + 60 * DAY)
        n += 1
    assert n > 200
    assert dead < 0.25 * alive
    assert all(o < truth[u].churn_ts for u in truth for o in truth[u].order_ts)


def test_channel_and_age_change_value(big):
    truth = big.truth
    by = collections.defaultdict(list)
    for t in truth.values():
        by[t.channel].append(t.spend_level * t.purchase_rate)
        by[t.age_band].append(t.spend_level)
    assert statistics.mean(by["email"]) > 1.5 * statistics.mean(by["social"])
    assert statistics.median(by["45-54"]) > 1.4 * statistics.median(by["18-24"])


def test_review_text_carries_signal_beyond_rating(big):
    truth = big.truth
    churn_re = re.compile("|".join(re.escape(p) for p in T.CHURN))
    loyal_re = re.compile("|".join(re.escape(p) for p in T.LOYAL))
    left_churn, left_loyal, left_all = [], [], []
    spend_gift, spend_budget = [], []
    for ev in big.reviews:
        t = truth[ev.user_id]
        left = (t.churn_ts - ev.ts) / DAY
        left_all.append(left)
        if churn_re.search(ev.text):
            left_churn.append(left)
        elif loyal_re.search(ev.text):
            left_loyal.append(left)
        if "gift" in ev.text or "present" in ev.text:
            spend_gift.append(t.spend_level)
        if "coupon" in ev.text or "sale" in ev.text or "discount" in ev.text:
            spend_budget.append(t.spend_level)
    assert len(left_churn) > 20 and len(left_loyal) > 20
    assert statistics.median(left_churn) < 30 < statistics.median(left_all)
    assert statistics.median(left_loyal) > 2 * statistics.median(left_all)
    assert statistics.median(spend_gift) > statistics.median(spend_budget)


def test_review_text_varied_and_matches_rating():
    r = random.Random(4)
    texts = collections.defaultdict(list)
    kinds = (None, *T.INCIDENT_KINDS)
    for i in range(3000):
        rating = r.randint(1, 5)
        cues = T.Cues(loyal=r.random() < 0.2, churning=r.random() < 0.1,
                      incident=r.choice(kinds) if rating <= 3 and r.random() < 0.3 else None,
                      gift=r.random() < 0.2, budget=r.random() < 0.1, premium=r.random() < 0.1)
        texts[rating].append(T.review_text(r, rating, r.choice(("kettle", "novel", "tent")), cues))
    everything = [x for v in texts.values() for x in v]
    assert len(set(everything)) > 2000
    sentences = {s for x in everything for s in re.split(r"(?<=[.!?]) ", x)}
    assert len(sentences) > 500  # several hundred distinct phrasings
    word = lambda words: re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b")  # noqa: E731
    neg_re, pos_re = word(T.NEG_ADJ), word(T.POS_ADJ)
    assert not any(neg_re.search(x) for x in texts[4] + texts[5])
    assert not any(pos_re.search(x) for x in texts[1] + texts[2])
    assert all(len(x) < 1000 for x in everything)


# ---- wire: duplicates and bad messages -------------------------------------------------------
def test_bad_messages_decode_to_their_reason():
    msgs = bad_messages(random.Random(9), 900)
    now = time.time()
    reasons = collections.Counter()
    for m in msgs:
        raw, key, reason = m  # unpacks as (bytes, key, expected reason)
        got = decode(raw, now=now, key=key, expect_type=m.kind)
        assert isinstance(got, Rejection), (raw[:120] if raw else raw, reason)
        assert got.reason == reason, (raw[:160] if raw else raw, got)
        reasons[reason] += 1
    assert set(reasons) == {"invalid_json", "bad_field", "missing_field", "bad_amount",
                            "bad_timestamp", "too_large", "unknown_type",
                            "unsupported_schema", "key_mismatch", "empty", "text_too_long"}
    # bodies carry the given event time, so they fit a stream from any period
    old = bad_messages(random.Random(2), 300, ts=1.0e9)
    assert all(decode(m.raw, now=1.0e9, key=m.key, expect_type=m.kind).reason == m.reason
               for m in old)
    assert bad_messages(random.Random(9), 50) == msgs[:50]
    assert len(bad_messages(random.Random(1), 30, kinds=("tombstone",))) == 30
    with pytest.raises(ValueError, match="unknown bad-message kind"):
        bad_messages(random.Random(1), 1, kinds=("gremlins",))
    assert len(MAKERS) >= 12


def test_mix_adds_duplicates_and_bad_messages(small):
    sim, _ = small
    events = list(sim.iter_wire(limit=6000))
    out = list(mix(events, duplicates=0.05, bad=0.02, seed=3, users=250))
    assert out == list(mix(events, duplicates=0.05, bad=0.02, seed=3, users=250))
    originals = [m for m in out if m.label == EVENT]
    dups = [i for i, m in enumerate(out) if m.label == DUPLICATE]
    bad = [m for m in out if m.label not in (EVENT, DUPLICATE)]
    assert [(m.kind, m.key, m.value) for m in originals] == events
    assert 200 <= len(dups) <= 400  # 5 % of 6000 = 300
    assert 60 <= len(bad) <= 190  # 2 % of 6000 = 120
    first_seen = {}
    for i, m in enumerate(out):
        if m.label == EVENT:
            first_seen.setdefault(m.value, i)
    for i in dups:
        j = first_seen[out[i].value]
        assert 0 < i - j <= 12 and out[i].key == out[j].key  # re-sent shortly after
    now = sim.end
    for m in bad:
        got = decode(m.value, now=now, key=m.key, expect_type=m.kind)
        assert isinstance(got, Rejection) and got.reason == m.label
    assert list(mix(events[:10])) == [m for m in mix(events[:10], duplicates=0, bad=0)]
    with pytest.raises(ValueError, match="fraction"):
        list(mix(events, duplicates=1.5))


def test_cli_writes_decodable_jsonl(tmp_path):
    out, truth = tmp_path / "events.jsonl", tmp_path / "truth.jsonl"
    res = CliRunner().invoke(cli, ["--users", "40", "--days", "60", "--start", START, "--seed", "2",
                                   "--out", str(out), "--truth", str(truth), "--no-progress",
                                   "--duplicates", "0.02", "--bad", "0.01"])
    assert res.exit_code == 0, res.output
    lines = out.read_bytes().splitlines()
    sim = simulate(40, START, 60, seed=2)
    decoded = [decode(x, now=sim.end) for x in lines]
    good = [d for d in decoded if not isinstance(d, Rejection)]
    assert 0 < len(lines) - len(good) < 0.1 * len(lines)
    # a file has no Kafka key, so an injected key_mismatch message reads as valid there
    assert {e.event_id for e in good if not e.event_id.startswith("bad-")} == {
        e.event_id for e in sim.events}
    assert len(truth.read_text().splitlines()) == 40


def test_generation_is_fast():
    sim = simulate(300, START, 365, seed=8)
    t0 = time.perf_counter()
    n = sum(1 for _ in sim.iter_wire())
    rate = n / (time.perf_counter() - t0)
    assert n > 15000
    assert rate > 15000, f"only {rate:.0f} events/s"  # ~100k/s on an idle core


def test_review_text_tells_a_latent_plan_that_orders_do_not_show_yet(big):
    """A review may mention the customer's plan (leaving / buying much more) before it
    happens: the orders before the review look alike, the orders after it differ."""
    truth, sim = big.truth, big.sim
    res = {k: re.compile("|".join(re.escape(p) for p in v)) for k, v in T.PLAN.items()}
    before, after = collections.defaultdict(list), collections.defaultdict(list)
    for ev in big.reviews:
        if ev.ts + 180 * DAY > sim.end or ev.ts - 90 * DAY < sim.start:
            continue
        t = truth[ev.user_id]
        said = next((k for k, rx in res.items() if rx.search(ev.text)), "none")
        if said != "none":
            assert t.plan == said and ev.ts < t.plan_ts  # told before it happens, never made up
        before[said].append(t.orders_between(ev.ts - 90 * DAY, ev.ts))
        after[said].append(t.orders_between(ev.ts, ev.ts + 180 * DAY))
    assert len(after["switch"]) > 40 and len(after["commit"]) > 40
    mean = statistics.mean
    b = {k: mean(v) for k, v in before.items()}
    a = {k: mean(v) for k, v in after.items()}
    assert max(b.values()) < 1.6 * min(b.values())  # the past hardly tells them apart ...
    growth = {k: a[k] / b[k] for k in a}  # orders in 180 d after / 90 d before the review
    assert growth["commit"] > 1.5 * growth["none"] and growth["switch"] < 0.6 * growth["none"]  # the future does
    # the plan does not follow the rating: both plans are told in happy and unhappy reviews
    for k, rx in res.items():
        ratings = {ev.rating for ev in big.reviews if rx.search(ev.text)}
        assert {1, 2} & ratings and {4, 5} & ratings, (k, ratings)
