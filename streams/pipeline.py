"""The worker's batch step, independent of Faust so it can be tested and benchmarked alone.

``Pipeline.process(records)`` takes one micro-batch of raw Kafka records and:
decodes + validates (rejects -> DLQ list), embeds review texts (one encoder call), loads the
batch's users (one Redis call), folds, scores all touched users (one head call), and writes
state + score + the ops counters atomically with compare-and-set (one Redis call; conflicting
users are re-read and re-folded, which the dedupe markers make safe). It returns what to publish.

Failure policy: a transient dependency error (Redis down) propagates as ``Transient`` so the
caller retries the whole batch with backoff (idempotent). A scoring failure never blocks the
state update: state is written, the score is left as it was, and it is counted. Any other
unexpected error is isolated per user: that user's records go to the DLQ with the reason.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from streams.events import Event, Limits, Rejection, Review, decode
from streams.fold import State, apply, features_batch, new_state, text_batch
from streams.store import FeatureStore, Score, Update

log = logging.getLogger("clv.pipeline")
TOPIC_TYPES = ("click", "order", "review", "profile")
TEXT_CACHE = 4096  # recent review texts whose embeddings are kept (a repeated text is not re-encoded)


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float | None = None  # broker/producer timestamp, seconds


@dataclass(slots=True)
class DeadLetter:
    record: Record
    reason: str
    detail: str


@dataclass(slots=True)
class ScoreOut:
    user_id: str
    score: Score
    event_ts: float


@dataclass(slots=True)
class BatchResult:
    n_records: int = 0
    n_valid: int = 0
    n_applied: int = 0
    n_duplicates: int = 0
    dead: list[DeadLetter] = field(default_factory=list)
    scores: list[ScoreOut] = field(default_factory=list)
    score_failed: int = 0
    conflicts: int = 0
    by_topic: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    valid_events: list[tuple[Record, Event]] = field(default_factory=list)
    dlq_reasons: dict[str, int] = field(default_factory=dict)
    score_event_ts: list[float] = field(default_factory=list)  # event times of scored events


class Transient(Exception):
    """A dependency is unavailable; retry the same batch later."""


class Pipeline:
    def __init__(
        self,
        settings,
        store: FeatureStore,
        scorer=None,  # serving.scorer.HotScorer or None (state only)
        clock: Callable[[], float] = time.time,
    ):
        self.s = settings
        self.store = store
        self.scorer = scorer
        self.clock = clock
        self.limits = Limits.from_settings(settings)
        self.topic_index = {t: i for i, t in enumerate(settings.event_topics)}
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()  # recent text -> embedding
        self._cache_model = None  # the Scorer whose embeddings the cache holds

    # ---- decode ---------------------------------------------------------------------
    def decode(self, records: Sequence[Record], result: BatchResult) -> dict[str, list]:
        now = self.clock()
        by_user: dict[str, list] = defaultdict(list)
        for rec in records:
            t_idx = self.topic_index.get(rec.topic)
            if t_idx is None:
                result.dead.append(DeadLetter(rec, "unknown_topic", f"worker does not read {rec.topic}"))
                continue
            ev = decode(rec.value, now=now, key=rec.key, expect_type=TOPIC_TYPES[t_idx], limits=self.limits)
            if isinstance(ev, Rejection):
                result.dead.append(DeadLetter(rec, ev.reason, ev.detail))
                continue
            by_user[ev.user_id].append((ev, (t_idx, rec.offset), rec))
            result.valid_events.append((rec, ev))
        result.n_valid = len(result.valid_events)
        return by_user

    def embed(self, by_user: dict[str, list]) -> dict[int, np.ndarray]:
        """Embed every review text in the batch with one encoder call; id(event) -> vector."""
        model = self.scorer.current if self.scorer is not None else None
        if model is None or model.encoder is None:
            return {}
        reviews = [ev for items in by_user.values() for ev, _, _ in items
                   if isinstance(ev, Review) and ev.text]
        if not reviews:
            return {}
        cache = self._text_cache
        if self._cache_model is not model:  # another model, another embedding space
            cache.clear()
            self._cache_model = model
        # each distinct text once, and not again while it is among the recent ones
        todo = list(dict.fromkeys(r.text for r in reviews if r.text not in cache))
        fresh = dict(zip(todo, model.encode(todo))) if todo else {}
        out = {}
        for r in reviews:
            vec = fresh.get(r.text)
            if vec is None:
                vec = cache[r.text]
                cache.move_to_end(r.text)
            out[id(r)] = vec
        cache.update(fresh)  # a batch with more new texts than the cache holds keeps the newest
        while len(cache) > TEXT_CACHE:
            cache.popitem(last=False)
        return out

    # ---- main step -----------------------------------------------------------------------
    async def process(self, records: Sequence[Record]) -> BatchResult:
        result = BatchResult(n_records=len(records))
        t0 = time.perf_counter()
        by_user = self.decode(records, result)
        try:
            embs = self.embed(by_user)
        except Exception as exc:  # noqa: BLE001 - a broken encoder must not stop state updates
            log.error("text encoder failed on a batch (%s); folding reviews without embeddings", exc)
            result.score_failed += 1
            embs = {}
        t1 = time.perf_counter()
        # ops counters ride on the saves (no round trip of their own): ``owed`` is what the next
        # save adds to the ``stats`` hash, ``sent`` what this batch has added so far
        owed: dict[str, int] = {"events": result.n_records}
        sent: dict[str, int] = {}
        pending = dict(by_user)
        attempts = 0
        while pending:
            attempts += 1
            conflicts = await self._round(pending, embs, result, owed, sent)
            if not conflicts:
                break
            result.conflicts += len(conflicts)
            if attempts >= 10:
                # the batch is retried from the start: take back what it counted
                await _redis("stats", self.store.record_stats({k: -v for k, v in sent.items()}, {}))
                raise Transient(f"{len(conflicts)} users kept changing under us (another worker?)")
            pending = {u: by_user[u] for u in conflicts}
        result.timings["decode_embed"] = t1 - t0
        result.timings["total"] = time.perf_counter() - t0
        for rec, _ in result.valid_events:
            result.by_topic[rec.topic] = result.by_topic.get(rec.topic, 0) + 1
        for d in result.dead:
            result.dlq_reasons[d.reason] = result.dlq_reasons.get(d.reason, 0) + 1
        if result.scores:
            scored = {so.user_id for so in result.scores}
            result.score_event_ts = [ev.ts for _, ev in result.valid_events if ev.user_id in scored]
        if not by_user:  # nothing to save (all dead letters): the counters go on their own
            self._owe_dead(result, owed, sent)
            await _redis("stats", self.store.record_stats(owed, {"ts_last": repr(self.clock())}))
        return result

    @staticmethod
    def _owe_dead(result: BatchResult, owed: dict[str, int], sent: dict[str, int]) -> None:
        """Add the dead letters not yet counted (neither sent nor owed) to ``owed`` (the
        ``stats`` hash's dlq counters)."""
        new = result.dead[sent.get("dlq", 0) + owed.get("dlq", 0):]
        if new:
            owed["dlq"] = owed.get("dlq", 0) + len(new)
            for d in new:
                owed[f"dlq:{d.reason}"] = owed.get(f"dlq:{d.reason}", 0) + 1

    async def _round(self, by_user: dict[str, list], embs, result: BatchResult,
                     owed: dict[str, int], sent: dict[str, int]) -> list[str]:
        """Load, fold, score and save ``by_user`` once; returns the users whose save conflicted.
        The save also adds ``owed`` to the ops counters (running counters for the ops page;
        Prometheus has the authoritative ones), counting every user as written: a conflicting
        user's counts are taken back by the next round's save, which counts them again."""
        users = list(by_user)
        t0 = time.perf_counter()
        loaded = await _redis("load", self.store.load_many(users))
        t1 = time.perf_counter()
        touched: list[tuple[str, State, int, float]] = []
        marks: list[Update] = []  # users whose records were all duplicates: save the watermarks
        counts: dict[str, tuple[int, int]] = {}
        for uid in users:
            cur = loaded[uid]
            st = cur.state.copy() if cur.state is not None else new_state()
            wm_before = list(st.wm)
            applied = dups = 0
            last_ts = 0.0
            try:
                for ev, pos, _rec in by_user[uid]:
                    if apply(st, ev, emb=embs.get(id(ev)), pos=pos):
                        applied += 1
                        last_ts = max(last_ts, ev.ts)
                    else:
                        dups += 1
            except Exception as exc:  # noqa: BLE001 - isolate a poison user, keep the batch
                log.exception("fold failed for user %s; sending their records to the DLQ", uid)
                for _ev, _pos, rec in by_user[uid]:
                    result.dead.append(DeadLetter(rec, "processing_error", f"{type(exc).__name__}: {exc}"))
                continue
            counts[uid] = (applied, dups)
            if applied:
                touched.append((uid, st, cur.ver, last_ts))
            elif st.wm != wm_before:
                marks.append(Update(uid, st, cur.ver, None))
        t2 = time.perf_counter()
        scores = self._score(touched, result)
        t3 = time.perf_counter()
        updates = [Update(uid, st, ver, scores.get(uid)) for uid, st, ver, _ in touched] + marks
        self._owe_dead(result, owed, sent)
        owed["processed"] = owed.get("processed", 0) + sum(a for a, _ in counts.values())
        owed["duplicates"] = owed.get("duplicates", 0) + sum(d for _, d in counts.values())
        put = {"ts_last": repr(self.clock())}
        if scores:
            put["mv"] = next(iter(scores.values())).model_version
        conflicts = await _redis("save", self.store.save_many(updates, {k: v for k, v in owed.items() if v}, put))
        t4 = time.perf_counter()
        for k, v in owed.items():
            sent[k] = sent.get(k, 0) + v
        owed.clear()
        cset = set(conflicts)
        for uid in cset:  # not written: counted again when the next round writes them
            applied, dups = counts[uid]
            owed["processed"] = owed.get("processed", 0) - applied
            owed["duplicates"] = owed.get("duplicates", 0) - dups
        # count only what was written; conflicting users are re-folded in the next round
        for uid, (applied, dups) in counts.items():
            if uid not in cset:
                result.n_applied += applied
                result.n_duplicates += dups
        for uid, _st, _ver, last_ts in touched:
            sc = scores.get(uid)
            if sc is not None and uid not in cset:
                result.scores.append(ScoreOut(uid, sc, last_ts))
        tm = result.timings
        tm["redis"] = tm.get("redis", 0.0) + (t1 - t0) + (t4 - t3)
        tm["fold"] = tm.get("fold", 0.0) + (t2 - t1)
        tm["score"] = tm.get("score", 0.0) + (t3 - t2)
        return conflicts

    def _score(self, touched, result: BatchResult) -> dict[str, Score]:
        model = self.scorer.current if self.scorer is not None else None
        if model is None or not touched:
            return {}
        states = [st for _, st, _, _ in touched]
        # score as of the user's latest event time: deterministic under replay
        as_of = [st.v[1] for st in states]
        feats, texts = features_batch(states, as_of), text_batch(states)
        try:
            sc = model.score(feats, texts)
        except Exception as exc:  # noqa: BLE001 - scoring failure never blocks state updates
            sc = self._fallback(model, exc, feats, texts)
            if sc is None:
                log.error("model %s failed to score a batch of %d: %s", model.version, len(states), exc)
                result.score_failed += len(states)
                return {}
        now = self.clock()
        return {
            uid: Score(float(sc.expected_clv[i]), float(sc.p_repeat[i]), sc.segments[i], sc.model_version, now)
            for i, (uid, _, _, _) in enumerate(touched)
        }

    def _fallback(self, model, exc: Exception, feats, texts):
        """The served model raised: if the model it replaced scores this batch, that one serves
        again (``HotScorer.demote``) and its scores are used; else None."""
        prev = getattr(self.scorer, "previous", None)
        if prev is None:
            return None
        try:
            sc = prev.score(feats, texts)
        except Exception:  # noqa: BLE001 - the batch itself is the problem: keep the new model
            return None
        self.scorer.demote(model, f"{type(exc).__name__}: {exc}")
        return sc


async def _redis(what: str, call):
    """Await a store call; a dependency outage becomes ``Transient`` (the batch is retried)."""
    try:
        return await call
    except Exception as exc:
        if _is_transient(exc):
            raise Transient(f"redis {what} failed: {exc}") from exc
        raise


def _is_transient(exc: Exception) -> bool:
    try:
        import redis.exceptions as rx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (rx.ConnectionError, rx.TimeoutError, rx.BusyLoadingError, OSError)) or (
        isinstance(exc, rx.ResponseError) and ("LOADING" in str(exc) or "NOSCRIPT" in str(exc))
    )
