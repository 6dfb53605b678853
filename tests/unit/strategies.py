"""Hypothesis strategies for valid events (shared by the fold and pipeline tests)."""
from __future__ import annotations

from hypothesis import strategies as st

from streams.events import AGE_BANDS, CHANNELS, CLICK_ACTIONS, GENDERS, REGIONS, parse

T0 = 1.7e9
users = st.sampled_from(["alice", "bob", "carol"])
ts = st.floats(min_value=T0, max_value=T0 + 400 * 86400, allow_nan=False)
cats = st.sampled_from(["books", "music", "toys", "garden", None])


def _click(i, u, t, a, c):
    return parse(dict(type="click", event_id=f"c{i}", user_id=u, ts=t, action=a, category=c))


def _order(i, u, t, amt, cur):
    return parse(dict(type="order", event_id=f"o{i}", user_id=u, ts=t, order_id=f"o{i}", amount=amt,
                      currency=cur, items=[{"item_id": "x", "category": "books", "qty": 1, "price": amt}]))


def _review(i, u, t, r):
    return parse(dict(type="review", event_id=f"r{i}", user_id=u, ts=t, item_id="x", rating=r, text="ok"))


def _profile(i, u, t, a, g, r, ch):
    return parse(dict(type="profile", event_id=f"p{i}", user_id=u, ts=t, age_band=a, gender=g, region=r, channel=ch))


def event(i: int, user=users):
    return st.one_of(
        st.builds(_click, st.just(i), user, ts, st.sampled_from(CLICK_ACTIONS), cats),
        st.builds(_order, st.just(i), user, ts,
                  st.floats(min_value=0, max_value=5000, allow_nan=False), st.sampled_from(["USD", "EUR", "GBP"])),
        st.builds(_review, st.just(i), user, ts, st.integers(1, 5)),
        st.builds(_profile, st.just(i), user, ts, st.sampled_from([None, *AGE_BANDS]),
                  st.sampled_from([None, *GENDERS]), st.sampled_from([None, *REGIONS]),
                  st.sampled_from([None, *CHANNELS])),
    )


@st.composite
def event_lists(draw, min_size=0, max_size=40, user=users):
    n = draw(st.integers(min_size, max_size))
    return [draw(event(i, user)) for i in range(n)]


def fixed_events(n: int, users=("alice", "bob", "carol"), seed: int = 0) -> list:
    """A deterministic mixed list of valid events (for example-based tests)."""
    import random

    r = random.Random(seed)
    out = []
    for i in range(n):
        u, t = r.choice(users), T0 + r.uniform(0, 400 * 86400)
        k = r.randrange(4)
        if k == 0:
            out.append(_click(i, u, t, r.choice(CLICK_ACTIONS), r.choice(["books", "toys", None])))
        elif k == 1:
            out.append(_order(i, u, t, round(r.uniform(1, 300), 2), r.choice(["USD", "EUR", "GBP"])))
        elif k == 2:
            out.append(_review(i, u, t, r.randint(1, 5)))
        else:
            out.append(_profile(i, u, t, r.choice(AGE_BANDS), None, r.choice(REGIONS), None))
    return out
