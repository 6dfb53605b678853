"""Small, seeded event histories for the training tests (no simulator dependency).

Each user has a hidden value ``v`` in [0, 1]: it drives how often they order, how much,
how much they click and the tone of their reviews, so a model has something to learn.
"""
from __future__ import annotations

import json
import random
from hashlib import blake2b
from pathlib import Path

import numpy as np

from streams.events import AGE_BANDS, CHANNELS, CLICK_ACTIONS, CURRENCIES, REGIONS, encode, parse
from streams.fold import TEXT_DIM

DAY = 86400.0
T0 = 1_700_000_000.0  # 2023-11-14
GOOD = ["Love it, great quality, will buy again", "Fantastic shop, fast shipping and lovely packaging",
        "Exactly as described. Ordered two more for my family"]
BAD = ["Broke after a week, returning it", "Terrible support, never again", "Not worth the money"]


def fake_encode(texts: list[str]) -> np.ndarray:
    """Deterministic stand-in for the text encoder (unit vectors from a text hash)."""
    out = np.zeros((len(texts), TEXT_DIM), np.float32)
    for i, t in enumerate(texts):
        seed = int.from_bytes(blake2b(t.encode(), digest_size=8).digest(), "little")
        v = np.random.default_rng(seed).standard_normal(TEXT_DIM)
        out[i] = v / np.linalg.norm(v)
    return out


def history(n_users: int = 60, days: float = 120.0, seed: int = 0, text: bool = True) -> list:
    """Typed events (any order), several per user, over ``days`` from ``T0``."""
    r = random.Random(seed)
    evs = []
    n = 0

    def add(obj):
        nonlocal n
        n += 1
        evs.append(parse({"event_id": f"s{seed}-{n}", **obj}))

    for u in range(n_users):
        uid = f"user{u:04d}"
        v = r.random()
        start = T0 + r.uniform(0, days * 0.5) * DAY
        if r.random() < 0.7:
            add({"type": "profile", "user_id": uid, "ts": start, "age_band": r.choice(AGE_BANDS),
                 "region": r.choice(REGIONS), "channel": r.choice(CHANNELS)})
        t = start
        rate = 0.02 + 0.25 * v  # orders per day
        while True:
            t += r.expovariate(rate) * DAY
            if t > T0 + days * DAY:
                break
            for _ in range(r.randint(1, 3 + int(10 * v))):
                add({"type": "click", "user_id": uid, "ts": t - r.uniform(0, 3) * DAY,
                     "action": r.choice(CLICK_ACTIONS), "category": r.choice(["toys", "books", "garden", "audio"])})
            amount = round(r.lognormvariate(2.5 + 1.5 * v, 0.5), 2)
            add({"type": "order", "user_id": uid, "ts": t, "order_id": f"o{n}", "amount": amount,
                 "currency": r.choice(CURRENCIES),
                 "items": [{"item_id": "i1", "category": r.choice(["toys", "books"]), "qty": r.randint(1, 3),
                            "price": amount}]})
            if text and r.random() < 0.4:
                words = r.choice(GOOD if r.random() < v else BAD)
                add({"type": "review", "user_id": uid, "ts": t + DAY, "item_id": "i1",
                     "rating": 5 if words in GOOD else 1, "text": words if r.random() < 0.8 else ""})
        if r.random() < 0.3:  # browsers who never buy
            add({"type": "click", "user_id": f"browser{u:04d}", "ts": start, "action": "view"})
    return evs


def write_jsonl(evs: list, path: Path, bad_lines: int = 0) -> Path:
    with open(path, "wb") as fh:
        for ev in evs:
            fh.write(encode(ev) + b"\n")
        for i in range(bad_lines):
            fh.write(json.dumps({"type": "order", "user_id": f"x{i}"}).encode() + b"\n")
    return path


_ENCODER = None


def shared_encoder():
    """One CPU TextEncoder for the whole test session (loading it takes seconds)."""
    global _ENCODER
    if _ENCODER is None:
        from training.text import TextEncoder

        _ENCODER = TextEncoder("cpu")
    return _ENCODER


def encoder_cache(tmp_path_factory) -> Path:
    """A session-wide encoder cache folder: the pretrained encoder is exported once."""
    from training.export import cached_encoder

    d = tmp_path_factory.getbasetemp() / "encoder-cache"
    cached_encoder(shared_encoder(), d)
    return d
