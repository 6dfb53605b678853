"""The generative story of one customer (see docs/simulator.md).

``plan_user`` draws a customer's hidden traits and lives their life: a Pareto/NBD-style
buyer (Poisson purchases at a personal rate until a silent churn time), a Gamma-Gamma-style
spend level, background browsing that fades after churn, bursts of browsing before each
order, reviews whose rating follows satisfaction and delivery incidents, and churn hazard
raised by bad experiences. The result is the customer's ground truth plus a compact,
time-sorted plan of raw events (tuples, not pydantic objects, so plans are cheap to hold).

Everything is a pure function of ``(seed, user index, signup time, config)``: a customer's
plan does not depend on which other customers exist or in which order they are generated.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from streams.events import AGE_BANDS, CHANNELS, GENDERS, REGIONS
from streams.fold import FX_TO_USD
from streams.sim.catalog import CATEGORY_NAMES, CATEGORY_WEIGHTS, SHELVES, Item
from streams.sim.text import INCIDENT_KINDS, Cues, review_text

DAY = 86400.0
PRE_PURCHASE_DAYS = 14.0

# raw event kinds in a plan (the number also breaks ties between equal timestamps)
PROFILE, CLICK, ORDER, REVIEW = 0, 1, 2, 3
KIND_NAMES = ("profile", "click", "order", "review")

_CHANNEL_W = (0.35, 0.25, 0.20, 0.10, 0.10)  # organic, paid_search, social, email, referral
_AGE_W = (0.15, 0.28, 0.24, 0.16, 0.11, 0.06)
_GENDER_W = (0.49, 0.47, 0.04)
_REGION_W = (0.22, 0.26, 0.20, 0.24, 0.08)
# value effects: multipliers on purchase rate, spend level and lifetime
CHANNEL_FREQ = {"organic": 1.0, "paid_search": 0.9, "social": 0.7, "email": 1.4, "referral": 1.2}
CHANNEL_SPEND = {"organic": 1.0, "paid_search": 0.95, "social": 0.8, "email": 1.15, "referral": 1.1}
CHANNEL_LIFE = {"organic": 1.0, "paid_search": 0.9, "social": 0.75, "email": 1.25, "referral": 1.1}
AGE_SPEND = {"18-24": 0.65, "25-34": 0.9, "35-44": 1.15, "45-54": 1.3, "55-64": 1.2, "65+": 1.0}
_INCIDENT_W = (0.5, 0.25, 0.15, 0.10)  # late, damaged, wrong_item, missing


@dataclass(frozen=True)
class SimConfig:
    """The knobs of the generative story (all have sensible defaults)."""

    signup_frac: float = 0.8  # sign-ups are uniform over the first 80 % of the span
    purchase_rate: float = 0.035  # mean orders per day while alive (Gamma across users)
    purchase_shape: float = 0.7  # Gamma shape of purchase rates (smaller = more unequal)
    lifetime_days: float = 180.0  # mean time from sign-up to silent churn
    lifetime_shape: float = 1.5  # Gamma shape of churn rates across users
    order_usd: float = 45.0  # median spend level (mean order value, USD)
    spend_sigma: float = 0.6  # log-normal spread of spend levels across users
    order_shape: float = 3.0  # Gamma shape of one order's value around the spend level
    first_order: float = 0.35  # base chance of buying within an hour of signing up
    browse_rate: float = 0.15  # background browsing sessions per day (median user)
    fade_days: float = 12.0  # e-folding time of browsing after churn
    prepurchase_sessions: float = 2.0  # mean extra sessions in the 14 days before an order
    review_rate: float = 0.2  # mean chance to review an order (Beta across users)
    incident_rate: float = 0.05  # chance an order goes wrong (x2.8 for region "abroad")
    incident_churn: float = 0.55  # chance an incident cuts the customer's life short
    unhappy_churn: float = 0.35  # chance a 1-2 star review (no incident) does
    profile_update: float = 0.15  # chance a customer updates the profile later
    # a latent plan, invisible in orders and clicks until it happens, told in review text
    plan_switch: float = 0.2  # chance the customer will leave at the plan time (moving, switching shop)
    plan_commit: float = 0.2  # chance the customer will buy much more from the plan time on
    plan_after: tuple[float, float] = (30.0, 300.0)  # plan time: sign-up + Uniform(lo, hi) days
    plan_boost: float = 2.5  # purchase-rate multiplier of committed customers after the plan time
    plan_mention: float = 0.6  # chance a review written before the plan time mentions the plan


@dataclass(frozen=True, slots=True)
class UserTruth:
    """One customer's hidden traits and what really happened (the simulator's ground truth)."""

    user_id: str
    signup_ts: float
    churn_ts: float  # silent churn (may lie after the simulated end)
    base_churn_ts: float  # the churn time drawn at sign-up, before incidents/bad reviews
    purchase_rate: float  # orders per day while alive
    spend_level: float  # mean order value, USD
    satisfaction: float  # standard normal; drives ratings and lifetime
    review_prob: float
    browse_rate: float  # background sessions per day while alive
    channel: str
    age_band: str
    gender: str
    region: str
    currency: str
    gift_buyer: bool
    incidents: int
    plan: str = "none"  # latent plan: "none", "switch" (leaves at plan_ts), "commit" (buys more from plan_ts)
    plan_ts: float | None = None
    order_ts: tuple[float, ...] = field(default=())
    order_usd: tuple[float, ...] = field(default=())
    neg_review_ts: tuple[float, ...] = field(default=())  # reviews rated 1-2
    pos_review_ts: tuple[float, ...] = field(default=())  # reviews rated 4-5

    def spend_between(self, after: float, until: float) -> float:
        """USD spent in orders with ``after < ts <= until``."""
        return sum(a for t, a in zip(self.order_ts, self.order_usd) if after < t <= until)

    def orders_between(self, after: float, until: float) -> int:
        return sum(1 for t in self.order_ts if after < t <= until)

    def alive_at(self, ts: float) -> bool:
        return self.signup_ts <= ts < self.churn_ts


def _pick(r: random.Random, values, weights):
    return r.choices(values, weights)[0]


def _poisson(r: random.Random, mean: float) -> int:
    k, p, limit = 0, r.random(), math.exp(-mean)
    while p > limit:
        k += 1
        p *= r.random()
    return k


class _Life:
    """Mutable scratch space while one customer's plan is drawn."""

    def __init__(self, r: random.Random, cfg: SimConfig, signup: float, end: float,
                 rp: random.Random | None = None):
        self.r, self.cfg, self.signup, self.end = r, cfg, signup, end
        self.out: list[tuple] = []  # (ts, kind, payload)
        ch = self.channel = _pick(r, CHANNELS, _CHANNEL_W)
        age = self.age_band = _pick(r, AGE_BANDS, _AGE_W)
        self.gender = _pick(r, GENDERS, _GENDER_W)
        self.region = _pick(r, REGIONS, _REGION_W)
        if self.region == "abroad":
            self.currency = _pick(r, ("EUR", "GBP", "USD"), (0.55, 0.35, 0.10))
        else:
            self.currency = _pick(r, ("USD", "EUR", "GBP"), (0.93, 0.04, 0.03))
        self.fx = FX_TO_USD[self.currency]
        self.satisfaction = r.gauss(0.0, 1.0)
        k = cfg.purchase_shape
        self.rate = max(1e-9, r.gammavariate(k, cfg.purchase_rate / k) * CHANNEL_FREQ[ch])
        s = cfg.lifetime_shape
        churn_rate = r.gammavariate(s, 1.0 / (cfg.lifetime_days * (s - 1))) if s > 1 else 1 / cfg.lifetime_days
        life = r.expovariate(churn_rate) * math.exp(0.5 * self.satisfaction) * CHANNEL_LIFE[ch]
        self.base_churn = self.churn = signup + life * DAY
        self.spend = (cfg.order_usd * CHANNEL_SPEND[ch] * AGE_SPEND[age]
                      * math.exp(r.gauss(0.0, cfg.spend_sigma)))
        a = 2.0
        self.review_prob = r.betavariate(a, a * (1 - cfg.review_rate) / cfg.review_rate)
        self.browse = (cfg.browse_rate * math.exp(r.gauss(0.0, 0.5))
                       * (0.6 + 0.4 * self.rate / cfg.purchase_rate))
        self.gift_buyer = r.random() < 0.5 / (1.0 + (cfg.order_usd / self.spend) ** 2)
        self.incident_p = cfg.incident_rate * (2.8 if self.region == "abroad" else 1.0)
        cats = r.choices(CATEGORY_NAMES, CATEGORY_WEIGHTS, k=3)
        self.prefs = cats
        self.pref_w = (0.6, 0.85, 1.0)  # cumulative: favourite, second, third
        self.incidents = 0
        self.plan, self.plan_ts = "none", math.inf
        rp = rp or random.Random(f"{r.random()}:plan")  # its own generator: the other draws stay put
        x = rp.random()
        if x < cfg.plan_switch + cfg.plan_commit:
            self.plan = "switch" if x < cfg.plan_switch else "commit"
            self.plan_ts = signup + rp.uniform(*cfg.plan_after) * DAY
        if self.plan == "switch":  # leaves at the plan time (silent, like any churn)
            self.base_churn = self.churn = min(self.churn, self.plan_ts)
        elif self.plan == "commit":  # stays at least a while after committing
            self.base_churn = self.churn = max(self.churn, self.plan_ts + (90.0 + rp.expovariate(1 / 180.0)) * DAY)

    # ---- browsing ---------------------------------------------------------------
    def category(self) -> str:
        x = self.r.random()
        if x < 0.08:
            return self.r.choice(CATEGORY_NAMES)  # exploring
        return self.prefs[0 if x < self.pref_w[0] else 1 if x < self.pref_w[1] else 2]

    def session(self, t: float, cart_p: float, focus: tuple[Item, ...] = ()) -> float:
        """A burst of clicks from ``t``; returns the time after the last click."""
        r, out = self.r, self.out
        if r.random() < 0.35:
            out.append((t, CLICK, ("search", None, self.category())))
            t += r.uniform(5.0, 40.0)
        views = 1
        while views < 12 and r.random() < 0.62:
            views += 1
        for _ in range(views):
            if focus and r.random() < 0.6:
                item = r.choice(focus)
            else:
                item = SHELVES[self.category()].popular(r)
            out.append((t, CLICK, ("view", item.item_id, item.category)))
            t += r.uniform(10.0, 150.0)
            x = r.random()
            if x < cart_p:
                action = "cart"
            elif x < cart_p + 0.05:
                action = "like"
            elif x < cart_p + 0.085:
                action = "wishlist"
            elif x < cart_p + 0.097:
                action = "share"
            else:
                continue
            out.append((t, CLICK, (action, item.item_id, item.category)))
            t += r.uniform(5.0, 60.0)
        return t

    def background(self) -> None:
        """Sessions at the personal browsing rate while alive, fading after churn."""
        r, fade = self.r, self.cfg.fade_days * DAY
        if r.random() < 0.7:
            self.session(self.signup + r.uniform(2.0, 30.0), 0.04)
        stop = min(self.end, self.churn + 6.0 * fade)
        t = self.signup
        while True:
            t += r.expovariate(self.browse) * DAY
            if t >= stop:
                return
            if t > self.churn and r.random() > math.exp(-(t - self.churn) / fade):
                continue
            self.session(t, 0.06)

    def before_order(self, t_order: float, lines: tuple[Item, ...]) -> None:
        """Browsing intensifies in the two weeks before a purchase; the last session carts."""
        r, lo = self.r, self.signup + 30.0

        def not_before_signup(t: float) -> float:  # an order soon after sign-up
            return t if t >= lo else r.uniform(lo, max(lo, t_order - 60.0 * (1 + len(lines))))

        for _ in range(_poisson(r, self.cfg.prepurchase_sessions)):
            d = min(PRE_PURCHASE_DAYS - 0.1, r.expovariate(1.0 / 3.0)) * DAY + 3600.0
            self.session(not_before_signup(t_order - d), 0.2, lines)
        t = not_before_signup(t_order - r.uniform(300.0, 2400.0) - 120.0 * len(lines))
        for item in lines:
            self.out.append((t, CLICK, ("view", item.item_id, item.category)))
            t = min(t + r.uniform(10.0, 60.0), t_order - 2.0)
            self.out.append((t, CLICK, ("cart", item.item_id, item.category)))
            t = min(t + r.uniform(10.0, 60.0), t_order - 1.0)

    # ---- purchases ---------------------------------------------------------------
    def rate_at(self, t: float) -> float:
        return self.rate * (self.cfg.plan_boost if self.plan == "commit" and t >= self.plan_ts else 1.0)

    def next_order(self, t: float) -> float:
        """Next order time of the Poisson process after ``t`` (the rate steps up at a commit)."""
        nxt = t + self.r.expovariate(self.rate_at(t)) * DAY
        if self.plan == "commit" and t < self.plan_ts <= nxt:  # memoryless: restart at the step
            nxt = self.plan_ts + self.r.expovariate(self.rate_at(self.plan_ts)) * DAY
        return nxt

    def basket(self) -> tuple[float, tuple, tuple[Item, ...]]:
        """One order: line items priced near this customer's spend level."""
        r = self.r
        k = self.cfg.order_shape
        target = r.gammavariate(k, self.spend / k)
        n = 1
        more = 0.3 if self.spend < 80 else 0.45
        while n < 8 and r.random() < more:
            n += 1
        share = target / n
        lines, picked = [], []
        for _ in range(n):
            item = SHELVES[self.category()].near_price(r, share)
            qty = max(1, min(10, round(share / item.price_usd))) if r.random() < 0.5 else 1
            price = round(item.price_usd / self.fx, 2)
            lines.append((item.item_id, item.category, qty, price))
            picked.append(item)
        amount = round(sum(q * p for _, _, q, p in lines), 2)
        return amount, tuple(lines), tuple(picked)

    def rating(self, incident: str | None) -> int:
        r = self.r
        if incident:
            return _pick(r, (1, 2, 3), (0.55, 0.35, 0.10))
        return min(5, max(1, round(4.0 + 0.75 * self.satisfaction + r.gauss(0.0, 0.9))))


def plan_user(
    seed: int, idx: int, user_id: str, signup: float, end: float, cfg: SimConfig
) -> tuple[UserTruth, list[tuple]]:
    """Draw one customer's life. Returns (truth, plan) where the plan is a time-sorted list
    of ``(ts, kind, payload)`` with ``signup <= ts < end``."""
    r = random.Random(f"clv-sim:{seed}:{idx}")
    L = _Life(r, cfg, signup, end, random.Random(f"clv-sim:{seed}:{idx}:plan"))
    out = L.out

    profile = {}
    for name, value, p in (("age_band", L.age_band, 0.7), ("gender", L.gender, 0.6),
                           ("region", L.region, 0.85), ("channel", L.channel, 0.9)):
        if r.random() < p:
            profile[name] = value
    out.append((signup, PROFILE, profile))

    orders: list[tuple[float, float]] = []
    reviews: list[tuple[float, Item, int, str | None]] = []
    p_first = min(0.85, cfg.first_order * (0.5 + L.rate / cfg.purchase_rate))
    if r.random() < p_first:
        t = signup + r.uniform(120.0, 3600.0)
    else:
        t = L.next_order(signup)
    n_orders = 0
    while t < min(L.churn, end):
        amount, lines, items = L.basket()
        L.before_order(t, items)
        out.append((t, ORDER, (f"o{seed}-{idx}-{n_orders}", amount, L.currency, lines)))
        orders.append((t, amount * L.fx))
        n_orders += 1
        incident = _pick(r, INCIDENT_KINDS, _INCIDENT_W) if r.random() < L.incident_p else None
        t_effect = t + 3.0 * DAY
        if r.random() < (min(0.9, 2.5 * L.review_prob + 0.2) if incident else L.review_prob):
            if incident == "late":
                t_rev = t + (10.0 + r.expovariate(1 / 7.0)) * DAY
            elif incident:
                t_rev = t + (1.0 + r.expovariate(1 / 3.0)) * DAY
            else:
                t_rev = t + (1.5 + r.expovariate(1 / 6.0)) * DAY
            rating = L.rating(incident)
            reviews.append((t_rev, r.choice(items), rating, incident))
            t_effect = t_rev
            if not incident and rating <= 2 and r.random() < cfg.unhappy_churn:
                L.churn = min(L.churn, t_rev + r.expovariate(1 / 25.0) * DAY)
        if incident:
            L.incidents += 1
            if r.random() < cfg.incident_churn:
                L.churn = min(L.churn, t_effect + r.expovariate(1 / 20.0) * DAY)
        t = L.next_order(t)

    for t_rev, item, rating, incident in reviews:
        out.append((t_rev, REVIEW, (item.item_id, rating,
                                    review_text(r, rating, item.noun, _cues(L, t_rev, rating, incident)))))

    L.background()
    _profile_updates(L, profile)

    # millisecond timestamps; the truth uses the very same rounded values as the events
    plan = sorted(((round(ts, 3), kind, p) for ts, kind, p in out), key=lambda e: (e[0], e[1]))
    plan = [e for e in plan if e[0] < end]
    truth = UserTruth(
        user_id=user_id, signup_ts=signup, churn_ts=L.churn, base_churn_ts=L.base_churn,
        purchase_rate=L.rate, spend_level=L.spend, satisfaction=L.satisfaction,
        review_prob=L.review_prob, browse_rate=L.browse, channel=L.channel,
        age_band=L.age_band, gender=L.gender, region=L.region, currency=L.currency,
        gift_buyer=L.gift_buyer, incidents=L.incidents,
        plan=L.plan, plan_ts=None if L.plan == "none" else L.plan_ts,
        order_ts=tuple(round(t, 3) for t, _ in orders), order_usd=tuple(a for _, a in orders),
        neg_review_ts=tuple(round(t, 3) for t, _, rt, _ in reviews if rt <= 2 and round(t, 3) < end),
        pos_review_ts=tuple(round(t, 3) for t, _, rt, _ in reviews if rt >= 4 and round(t, 3) < end),
    )
    return truth, plan


def _cues(L: _Life, t_rev: float, rating: int, incident: str | None) -> Cues:
    """What the review mentions, from the hidden truth: time left before churn, spend level."""
    r = L.r
    days_left = (L.churn - t_rev) / DAY
    if days_left < 30:
        churning = r.random() < {1: 0.55, 2: 0.5, 3: 0.3, 4: 0.08, 5: 0.04}[rating]
    else:
        churning = r.random() < {1: 0.06, 2: 0.04}.get(rating, 0.0)
    if rating >= 3 and days_left > 120:
        loyal = r.random() < (0.55 if rating == 5 else 0.45)
    elif rating >= 3 and days_left > 45:
        loyal = r.random() < 0.15
    else:
        loyal = rating >= 4 and r.random() < 0.02
    ref = L.cfg.order_usd
    return Cues(
        loyal=loyal and not churning,
        churning=churning,
        incident=incident if incident and r.random() < 0.85 else None,
        gift=r.random() < (0.45 if L.gift_buyer else 0.03),
        budget=r.random() < (0.35 if L.spend < 0.55 * ref else 0.02),
        premium=r.random() < (0.35 if L.spend > 2.5 * ref else 0.02),
        plan=L.plan if L.plan != "none" and t_rev < L.plan_ts and r.random() < L.cfg.plan_mention else None,
    )


def _profile_updates(L: _Life, profile: dict) -> None:
    """Occasional later profile edits: fill a missing field, move region, age a band."""
    r = L.r
    if r.random() >= L.cfg.profile_update:
        return
    n = 2 if r.random() < 0.2 else 1
    hi = min(L.churn, L.end)
    if hi <= L.signup + DAY:
        return
    for _ in range(n):
        t = r.uniform(L.signup + DAY, hi)
        missing = [k for k in ("age_band", "gender", "region", "channel") if k not in profile]
        x = r.random()
        if missing and x < 0.5:
            name = r.choice(missing)
            upd = {name: getattr(L, name)}
        elif x < 0.8:
            upd = {"region": r.choice([g for g in REGIONS if g != profile.get("region")])}
        else:
            i = AGE_BANDS.index(L.age_band)
            upd = {"age_band": AGE_BANDS[min(i + 1, len(AGE_BANDS) - 1)]}
        profile.update(upd)
        L.out.append((t, PROFILE, upd))
