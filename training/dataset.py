"""Point-in-time training sets: replay events through the stream's own fold.

For each cutoff ``c`` a user's features are ``streams.fold.features(state, c)`` where
``state`` folds exactly the events with ``ts <= c`` (the same ``apply`` the worker runs),
and the label is the user's order spend (USD, the fold's FX table) in ``(c, c + horizon]``.
Nothing after the cutoff can reach the features: the fold only ever sees events up to it
(``tests/unit/test_dataset.py`` proves both this and offline == online).

Review embeddings follow the worker: a review with non-empty text is folded with its
embedding (``encode``), a review without text is folded without one.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from streams.events import Event, Order, Rejection, Review, decode
from streams.fold import DAY, FEATURE_NAMES, FX_TO_USD, TEXT_DIM, State, apply, features, new_state, text_vector

HAS_TEXT = FEATURE_NAMES.index("has_text")

log = logging.getLogger("clv.dataset")
Encode = Callable[[list[str]], np.ndarray]


@dataclass
class Examples:
    user_ids: list[str]
    cutoff: float  # epoch seconds; features as of this moment
    horizon_days: float
    features: np.ndarray  # [N, len(FEATURE_NAMES)] float32
    text: np.ndarray  # [N, TEXT_DIM] float32 running mean embedding (zeros when none)
    texts: list[list[str]]  # each user's non-empty review texts up to the cutoff
    label: np.ndarray  # [N] float32 spend (USD) in (cutoff, cutoff + horizon]
    past_spend: np.ndarray  # [N] float32 spend up to the cutoff
    label_complete: bool = True  # False when the events end before cutoff + horizon

    def __len__(self) -> int:
        return len(self.user_ids)

    def subset(self, idx: Sequence[int] | np.ndarray) -> "Examples":
        idx = np.asarray(idx, dtype=np.int64)
        return Examples(
            [self.user_ids[i] for i in idx], self.cutoff, self.horizon_days,
            self.features[idx], self.text[idx], [self.texts[i] for i in idx],
            self.label[idx], self.past_spend[idx], self.label_complete,
        )


def order_usd(ev: Order) -> float:
    """An order's amount in USD, exactly as the fold converts it."""
    return ev.amount * FX_TO_USD[ev.currency]


# ---- event sources -------------------------------------------------------------------
def read_jsonl(path: Path, *, now: float = math.inf) -> Iterator[Event]:
    """Wire-format events, one JSON object a line (what ``clv simulate --out`` writes).

    Lines are decoded by ``streams.events.decode`` like the worker does; ``now`` bounds
    the clock-skew check (default: none, as for a recorded history). Invalid lines are
    skipped and counted in a warning, with the first reasons.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"events file {path} does not exist; write one with `clv simulate --out {path}`")
    bad: dict[str, int] = defaultdict(int)
    first: list[str] = []
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            ev = decode(line, now=now)
            if isinstance(ev, Rejection):
                bad[ev.reason] += 1
                if len(first) < 3:
                    first.append(f"line {n}: {ev.detail}")
                continue
            yield ev
    if bad:
        log.warning("%s: skipped %d invalid lines %s; first: %s", path, sum(bad.values()), dict(bad), first)


def sorted_events(events: Iterable[Event]) -> list[Event]:
    """Event-time order (stable: ties keep arrival order), each event_id once - what the
    archive's ``read_events`` yields, for any source."""
    seen: set[str] = set()
    out = []
    for ev in events:
        if ev.event_id not in seen:
            seen.add(ev.event_id)
            out.append(ev)
    out.sort(key=lambda e: e.ts)
    return out


# ---- point-in-time replay ------------------------------------------------------------
def embed_texts(texts: Sequence[str], encode: Encode, batch: int = 64) -> dict[str, np.ndarray]:
    """{text: embedding} for the distinct texts, in batches of similar length (little
    padding), with a progress bar."""
    flat = sorted(set(texts), key=lambda t: (len(t), t))
    out: dict[str, np.ndarray] = {}
    from tqdm import tqdm

    with tqdm(total=len(flat), desc="embed reviews", unit="text", leave=False,
              disable=len(flat) < 4 * batch) as bar:
        for i in range(0, len(flat), batch):
            chunk = flat[i:i + batch]
            vecs = np.asarray(encode(chunk), dtype=np.float32)
            if vecs.shape != (len(chunk), TEXT_DIM):
                raise ValueError(f"encode returned shape {vecs.shape}, expected ({len(chunk)}, {TEXT_DIM})")
            out.update(zip(chunk, vecs))
            bar.update(len(chunk))
    return out


def build_many(
    events: Iterable[Event],
    cutoffs: Sequence[float],
    horizon_days: float,
    encode: Encode | None = None,
    users: str = "active",
) -> list[Examples]:
    """One replay over the events, a snapshot at every cutoff (returned in the given order).

    users="active": users with >= 1 order up to the cutoff; "all": anyone with an event.
    encode=None: reviews are folded without embeddings (``text`` is zeros, has_text 0).
    """
    if users not in ("active", "all"):
        raise ValueError(f"users must be 'active' or 'all', got {users!r}")
    if not cutoffs:
        return []
    evs = sorted_events(events)
    order = sorted(range(len(cutoffs)), key=lambda i: cutoffs[i])
    until = max(cutoffs)
    embs = {} if encode is None else embed_texts(
        [e.text for e in evs if isinstance(e, Review) and e.text and e.ts <= until], encode)
    horizon_s = horizon_days * DAY
    last_ts = evs[-1].ts if evs else -math.inf

    states: dict[str, State] = {}
    texts: dict[str, list[str]] = defaultdict(list)
    spend_t: dict[str, list[float]] = defaultdict(list)  # order times per user
    spend_a: dict[str, list[float]] = defaultdict(list)  # USD amounts per user
    snaps: dict[int, Examples] = {}
    k = 0
    for ev in [*evs, None]:
        while k < len(order) and (ev is None or ev.ts > cutoffs[order[k]]):
            c = float(cutoffs[order[k]])
            snaps[order[k]] = _snapshot(states, texts, c, horizon_days, users, last_ts >= c + horizon_s)
            k += 1
        if ev is None:
            break
        uid = ev.user_id
        st = states.get(uid)
        if st is None:
            st = states[uid] = new_state()
        emb = None
        if isinstance(ev, Review) and ev.text:
            emb = embs.get(ev.text)
            texts[uid].append(ev.text)
        elif isinstance(ev, Order):
            spend_t[uid].append(ev.ts)
            spend_a[uid].append(order_usd(ev))
        apply(st, ev, emb=emb)

    for ex in snaps.values():  # labels: spend in (c, c + horizon]
        lo, hi = ex.cutoff, ex.cutoff + horizon_s
        for i, uid in enumerate(ex.user_ids):
            ts = spend_t.get(uid)
            if ts:
                t = np.asarray(ts)
                a = np.asarray(spend_a[uid])
                ex.label[i] = a[(t > lo) & (t <= hi)].sum()
    return [snaps[i] for i in range(len(cutoffs))]


def _snapshot(states: dict[str, State], texts: dict[str, list[str]], cutoff: float,
              horizon_days: float, users: str, complete: bool) -> Examples:
    uids = [u for u, s in states.items() if users == "all" or s.get("n_orders") > 0]
    uids.sort()
    n = len(uids)
    feats = np.zeros((n, len(FEATURE_NAMES)), np.float32)
    text = np.zeros((n, TEXT_DIM), np.float32)
    past = np.zeros(n, np.float32)
    for i, u in enumerate(uids):
        s = states[u]
        feats[i] = features(s, cutoff)
        text[i] = text_vector(s)
        past[i] = s.get("sum_amount")
    return Examples(uids, cutoff, float(horizon_days), feats, text, [list(texts.get(u, ())) for u in uids],
                    np.zeros(n, np.float32), past, complete)


def build_examples(
    events: Iterable[Event],
    cutoff: float,
    horizon_days: float,
    encode: Encode | None = None,
    users: str = "active",
) -> Examples:
    """Features as of ``cutoff`` and spend in the following ``horizon_days`` per user."""
    return build_many(events, [cutoff], horizon_days, encode, users)[0]


def user_means(texts_per_user: Sequence[Sequence[str]], encode: Encode, batch: int = 64) -> np.ndarray:
    """Per user, the mean embedding of their review texts (zeros without any): what the
    fold's running mean holds when the worker embedded each review with ``encode``."""
    emb = embed_texts([t for ts in texts_per_user for t in ts], encode, batch)
    out = np.zeros((len(texts_per_user), TEXT_DIM), np.float32)
    for i, ts in enumerate(texts_per_user):
        if ts:
            out[i] = np.mean([emb[t] for t in ts], axis=0)
    return out


def model_inputs(ex: Examples, encode: Encode | None) -> tuple[np.ndarray, np.ndarray]:
    """(features, text) as the stream hands them to a model whose encoder is ``encode``
    (None: a model without encoder - the worker then folds reviews without embeddings)."""
    feats = np.array(ex.features, dtype=np.float32, copy=True)
    if encode is None:
        feats[:, HAS_TEXT] = 0.0
        return feats, np.zeros((len(ex), TEXT_DIM), np.float32)
    feats[:, HAS_TEXT] = np.array([1.0 if t else 0.0 for t in ex.texts], np.float32)
    return feats, user_means(ex.texts, encode)


def concat(parts: Sequence[Examples]) -> Examples:
    """Stack several cutoffs' examples (cutoff = the latest; for training only)."""
    if not parts:
        raise ValueError("no examples to concatenate")
    hs = {p.horizon_days for p in parts}
    if len(hs) != 1:
        raise ValueError(f"examples have different horizons {sorted(hs)} days; a model has one horizon")
    return Examples(
        [u for p in parts for u in p.user_ids], max(p.cutoff for p in parts), parts[0].horizon_days,
        np.concatenate([p.features for p in parts]), np.concatenate([p.text for p in parts]),
        [t for p in parts for t in p.texts], np.concatenate([p.label for p in parts]),
        np.concatenate([p.past_spend for p in parts]), all(p.label_complete for p in parts),
    )


def summary(ex: Examples) -> dict:
    """Small JSON-able description (for logs and the model card)."""
    return {
        "cutoff": ex.cutoff, "horizon_days": ex.horizon_days, "users": len(ex),
        "buyers": int((ex.label > 0).sum()), "mean_label": float(ex.label.mean()) if len(ex) else 0.0,
        "with_text": int(sum(1 for t in ex.texts if t)), "label_complete": ex.label_complete,
    }


# ---- the same build on a Dask cluster ----------------------------------------------------
def build_partition(part: int, n_parts: int, root: str, cutoffs: Sequence[float], horizon_days: float,
                    users: str) -> tuple[list[Examples], float, int, float]:
    """One Dask task: ``build_many`` over the archived events of partition ``part`` of
    ``n_parts`` (by ``streams.archive.user_bucket``), read alone. Returns (examples per cutoff,
    last event time, events, the worker's peak RSS in MiB)."""
    from streams.archive import decode_rows, read_partition
    from streams.distributed import peak_rss_mb

    evs = list(decode_rows(read_partition(Path(root), part, n_parts)))
    last = evs[-1].ts if evs else -math.inf
    return build_many(evs, cutoffs, horizon_days, None, users), last, len(evs), peak_rss_mb()


def merge_partitions(parts: Sequence[Sequence[Examples]], cutoffs: Sequence[float], horizon_days: float,
                     last_ts: float) -> list[Examples]:
    """Per cutoff, the partitions' examples as one, users in ``build_many``'s (sorted) order;
    ``label_complete`` from the last event time over all partitions."""
    out = []
    for k, c in enumerate(cutoffs):
        ex = [p[k] for p in parts]
        uids = [u for e in ex for u in e.user_ids]
        order = np.asarray(sorted(range(len(uids)), key=uids.__getitem__), dtype=np.int64)
        texts = [t for e in ex for t in e.texts]

        def cat(name: str, width: int | None = None) -> np.ndarray:
            arrs = [getattr(e, name) for e in ex]
            if not arrs:
                return np.zeros((0, width) if width else 0, np.float32)
            return np.concatenate(arrs)[order]

        out.append(Examples(
            [uids[i] for i in order], float(c), float(horizon_days), cat("features", len(FEATURE_NAMES)),
            cat("text", TEXT_DIM), [texts[i] for i in order], cat("label"), cat("past_spend"),
            last_ts >= c + horizon_days * DAY))
    return out


def build_many_dask(root: Path, cutoffs: Sequence[float], horizon_days: float, client,
                    users: str = "active", n_parts: int = 0) -> list[Examples]:
    """``build_many(read_events(root), cutoffs, horizon_days, None, users)``, exactly, with one
    Dask task per user partition: no process holds the whole archive."""
    from streams.distributed import n_partitions, run_partitions

    if users not in ("active", "all"):
        raise ValueError(f"users must be 'active' or 'all', got {users!r}")
    if not cutoffs:
        return []
    res = run_partitions(client, build_partition, n_partitions(client, n_parts), str(root),
                         [float(c) for c in cutoffs], float(horizon_days), users, desc="training sets")
    return merge_partitions([r[0] for r in res], cutoffs, horizon_days, max(r[1] for r in res))
