"""The periodic trainer: archive (or JSONL) -> point-in-time sets -> fit -> hold-out
evaluation -> ONNX export -> registry -> promotion if the challenger is at least as good.

Time split (``plan``): with ``T`` the last event time and ``h`` the horizon, the hold-out
cutoff is ``T - h`` (its labels are complete) and training cutoffs are ``T - 2h``,
``T - 2h - step``, ... so every training label ends before the hold-out starts. When the
data are shorter than about two horizons, the hold-out is a random 20 % of the users at
``T - h`` instead (recorded as ``holdout: user_split`` in the card).

Promotion (``Policy``): challenger and champion are scored through their ONNX graphs
(``serving.scorer.Scorer``, each with its own text encoder) on the same newest hold-out.
The challenger is promoted when its normalised Gini is at least the champion's (minus
``gini_tolerance``) and its decile MAPE is not worse by more than ``mape_tolerance``. A
challenger that does not load or breaks the contract is refused; a champion that no
longer loads (contract changed) is replaced by any challenger that does.

Refit (``Job.refit_latest``, default on): the validated model never saw the newest ``h`` of
data. When it is to be promoted, the same ``TrainConfig`` (same seed, the validated model's text
encoder) is refit on the newest cutoffs ``T - h``, ``T - h - step``, ... (labels end at ``T``) and
served in its place as ``VERSION-refit``, carrying the validated metrics. It has no hold-out of its
own, so ``refit_guard`` compares its predictions with the validated model's on the hold-out users
(as of ``T - h``) and the validated model is served instead when they disagree wildly. A refit
champion is compared with later challengers through its validated twin (the refit has seen the
labels of the next hold-outs). The ``user_split`` protocol (short data) is not refit.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from serving.registry import Registry
from streams.fold import DAY
from training.dataset import Examples, build_many, model_inputs, read_jsonl, sorted_events

log = logging.getLogger("clv.trainer")
HOLDOUT_USER_SHARE = 0.2
# Refit guard: the refit is the validated configuration on data one horizon newer, so it may
# move the spend level with the business, but not halve or double it (a gap or a partial window
# in the newest data does that), and it must rank the same users about the same way (measured
# on 1,000 simulated users: ratio 1.07-1.20, Spearman 0.89-0.92; unit-test history: 1.02, 0.997).
# A refusal is safe: the validated model is served.
REFIT_TOTAL_RATIO = (0.5, 2.0)  # refit / validated total predicted spend on the hold-out users
REFIT_MIN_SPEARMAN = 0.8  # rank correlation of the two models' expected CLV on those users


@dataclass
class Policy:
    gini_tolerance: float = 0.0  # challenger Gini >= champion Gini - this
    mape_tolerance: float = 0.02  # challenger decile MAPE <= champion's + this

    def decide(self, challenger: dict, champion: dict | None) -> tuple[bool, str]:
        g, m = challenger.get("gini"), challenger.get("decile_mape")
        if g is None or not math.isfinite(g):
            return False, "challenger has no finite Gini on the hold-out (no buyers in it?)"
        if champion is None:
            return True, "no champion to beat"
        cg, cm = champion.get("gini"), champion.get("decile_mape")
        if cg is None or not math.isfinite(cg):
            return True, "champion has no finite Gini on this hold-out"
        if g < cg - self.gini_tolerance:
            return False, f"Gini {g:.4f} < champion {cg:.4f} (tolerance {self.gini_tolerance})"
        if m is not None and cm is not None and math.isfinite(m) and math.isfinite(cm) and m > cm + self.mape_tolerance:
            return False, f"decile MAPE {m:.4f} > champion {cm:.4f} + {self.mape_tolerance}"
        return True, f"Gini {g:.4f} vs champion {cg:.4f}, decile MAPE {m:.4f} vs {cm:.4f}"


@dataclass
class Job:
    """What one training run does (``clv train`` options)."""

    horizon_weeks: int = 39
    events_file: Path | None = None  # JSONL of wire-format events; None: the archive
    n_cutoffs: int = 3  # training cutoffs (more rows; labels all end before the hold-out)
    step_days: float = 28.0
    min_history_days: float = 14.0  # a cutoff needs this much data before it
    users: str = "all"  # "all": anyone seen (the stream scores everyone); "active": buyers
    promote: bool = True
    refit_latest: bool = True  # serve a refit on the newest cutoffs (module doc)
    policy: Policy = field(default_factory=Policy)
    cfg: object = None  # training.train.TrainConfig

    @property
    def horizon_days(self) -> float:
        return 7.0 * self.horizon_weeks


@dataclass
class Plan:
    train_cutoffs: list[float]
    holdout_cutoff: float
    holdout: str  # "temporal" or "user_split"


@dataclass
class Outcome:
    version: str
    model_dir: Path
    metrics: dict
    champion: str | None
    champion_metrics: dict | None
    promoted: bool
    reason: str
    seconds: float
    refit: dict | None = None  # card["refit"] when promoted: done, cutoffs, guard, validated_version


def plan(t_first: float, t_last: float, horizon_days: float, n_cutoffs: int = 3,
         step_days: float = 28.0, min_history_days: float = 14.0) -> Plan:
    h = horizon_days * DAY
    hold = t_last - h
    if hold - t_first < min_history_days * DAY:
        span = (t_last - t_first) / DAY
        raise ValueError(
            f"the events span {span:.0f} days, too short for a {horizon_days:.0f}-day horizon plus "
            f"{min_history_days:.0f} days of history; use a shorter --horizon-weeks or more data"
        )
    cuts = [hold - h - k * step_days * DAY for k in range(max(1, n_cutoffs))]
    cuts = [c for c in cuts if c - t_first >= min_history_days * DAY]
    if cuts:
        return Plan(sorted(cuts), hold, "temporal")
    return Plan([hold], hold, "user_split")


def load_events(settings, events_file: Path | None) -> list:
    if events_file is not None:
        return sorted_events(read_jsonl(Path(events_file)))
    from streams import archive

    root = settings.archive_dir
    if not archive.files(root):
        raise FileNotFoundError(
            f"no archived events under {root}; run the worker's archiver, or train from a file: "
            "clv train --events FILE.jsonl (clv simulate --out FILE.jsonl writes one)"
        )
    return list(archive.read_events(root))


def new_version(seed_text: str = "") -> str:
    now = time.gmtime()
    h = hashlib.sha256(f"{seed_text}|{time.time_ns()}".encode()).hexdigest()[:6]
    return time.strftime("%Y%m%dT%H%MZ", now) + "-" + h


def _split(ex: Examples, share: float, seed: int) -> tuple[Examples, Examples]:
    rng = np.random.default_rng(seed + 7919)
    hold = rng.random(len(ex)) < share
    return ex.subset(np.flatnonzero(~hold)), ex.subset(np.flatnonzero(hold))


def score_onnx(scorer, ex: Examples):
    """p_repeat, expected_clv from a loaded ``serving.scorer.Scorer`` (its own encoder)."""
    encode = scorer.encode if scorer.encoder is not None else None
    feats, text = model_inputs(ex, encode)
    s = scorer.score(feats, text)
    return s.p_repeat, s.expected_clv


def holdout_metrics(y: np.ndarray, p: np.ndarray, ev: np.ndarray) -> dict:
    from training.evaluate import all_metrics

    m = all_metrics(y, ev, p)
    m.update({"users": int(len(y)), "buyers": int((y > 0).sum()), "actual_total": float(y.sum()),
              "predicted_total": float(ev.sum())})
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}


def refit_guard(ev_validated: np.ndarray, ev_refit: np.ndarray) -> tuple[bool, dict, str]:
    """Is the refit's expected CLV on the hold-out users close enough to the validated model's?"""
    from training.evaluate import spearman

    total_v, total_r = float(np.sum(ev_validated)), float(np.sum(ev_refit))
    finite = bool(np.all(np.isfinite(ev_refit))) and total_v > 0
    ratio = total_r / total_v if finite else float("nan")
    rho = spearman(ev_validated, ev_refit) if finite else float("nan")
    figures = {"users": int(len(ev_refit)), "total_ratio": _round(ratio), "spearman": _round(rho),
               "total_ratio_bounds": list(REFIT_TOTAL_RATIO), "min_spearman": REFIT_MIN_SPEARMAN}
    lo, hi = REFIT_TOTAL_RATIO
    if not lo <= ratio <= hi:  # also catches NaN
        return False, figures, f"total predicted spend ratio {ratio:.3f} outside [{lo}, {hi}]"
    if not rho >= REFIT_MIN_SPEARMAN:  # also catches NaN
        return False, figures, f"Spearman {rho:.3f} with the validated model < {REFIT_MIN_SPEARMAN}"
    return True, figures, f"total ratio {ratio:.3f}, Spearman {rho:.3f}"


def _round(x: float) -> float | None:
    return round(x, 4) if math.isfinite(x) else None  # JSON has no NaN


def _refit_latest(settings, job: Job, cfg, events: list, p: Plan, parts: dict, version: str,
                  holdout: Examples, ev_validated: np.ndarray, registry: Registry, providers) -> tuple[str, dict]:
    """Refit the validated configuration on the newest cutoffs and register it as
    ``VERSION-refit`` if ``refit_guard`` accepts it. Returns (version to serve, card record)."""
    from serving.scorer import Scorer
    from training.export import write_card
    from training.train import fit

    cuts = sorted(p.holdout_cutoff - k * job.step_days * DAY for k in range(len(p.train_cutoffs)))
    rec = {"done": False, "cutoffs": cuts, "validated_version": version, "validated_cutoffs": p.train_cutoffs}
    if not job.refit_latest:
        return version, {**rec, "reason": "--no-refit-latest"}
    if p.holdout != "temporal":
        log.info("no refit: the data are too short for a temporal hold-out (user_split); serving %s", version)
        return version, {**rec, "reason": "user_split hold-out (short data): the validated model is served"}
    vdir = registry.path(version)
    if (vdir / "encoder.onnx").exists():  # the very encoder validated, not a new fine-tune
        cfg = dataclasses.replace(cfg, encoder_from=str(vdir))
    t0 = time.perf_counter()
    log.info("refit: training %s's configuration on the newest cutoffs %s (labels to %s; validated on %s)",
             version, [_day(c) for c in cuts], _day(p.holdout_cutoff + job.horizon_days * DAY),
             [_day(c) for c in p.train_cutoffs])
    refit_version = version + "-refit"
    staging = settings.data_dir / "staging" / refit_version
    try:
        missing = [c for c in cuts if c not in parts]
        parts.update(zip(missing, build_many(events, missing, job.horizon_days, encode=None, users=job.users)))
        fitted = fit([parts[c] for c in cuts], cfg)
        fitted.export(staging, refit_version, job.horizon_weeks, cache_dir=Path(cfg.cache_dir))
        _, ev = score_onnx(Scorer(staging, providers=providers), holdout)  # it loads under the contract
        ok, rec["guard"], why = refit_guard(ev_validated, ev)
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        if not ok:
            log.warning("refit refused (%s); serving the validated model %s", why, version)
            registry.log("refit_refused", version, why, guard=rec["guard"])
            return version, {**rec, "reason": f"guard: {why}"}
        rec.update(done=True, reason=f"guard passed: {why}")
        card = _read_card(staging)
        card.update(metrics=registry.card(version)["metrics"], refit=rec,
                    data={**registry.card(version)["data"], "train_cutoffs": cuts})
        write_card(staging, card)
        registry.register(staging, refit_version, f"refit of {version} on cutoffs to {_day(cuts[-1])}")
        log.info("refit %s trained in %.1fs; guard passed (%s)", refit_version, rec["seconds"], why)
        return refit_version, rec
    except Exception as exc:  # noqa: BLE001 - the validated model is still fit to serve
        log.exception("refit failed (%s); serving the validated model %s", exc, version)
        return version, {**rec, "reason": f"refit failed: {exc}", "seconds": round(time.perf_counter() - t0, 1)}
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _validated_twin(registry: Registry, version: str) -> str | None:
    """The validated model a refit champion was made from (when still registered)."""
    twin = (registry.card(version).get("refit") or {}).get("validated_version")
    return twin if twin and twin != version and (registry.path(twin) / "head.onnx").exists() else None


def _providers() -> list[str]:
    try:
        import torch

        if torch.cuda.is_available():
            from serving.scorer import pick_providers

            return pick_providers()
    except ImportError:
        pass
    return ["CPUExecutionProvider"]


def train_once(settings, job: Job, registry: Registry | None = None) -> Outcome:
    """One full cycle; returns what happened (raises on bad input or a failed export)."""
    from serving.contract import ContractError
    from serving.scorer import Scorer
    from training.export import write_card
    from training.train import TrainConfig, fit

    t0 = time.perf_counter()
    cfg = job.cfg or TrainConfig()
    if cfg.cache_dir is None:
        cfg = dataclasses.replace(cfg, cache_dir=str(settings.data_dir / "cache"))
    registry = registry or Registry(settings.models_dir)
    cfg = _keep_embedding_space(cfg, registry)
    src = str(job.events_file) if job.events_file else str(settings.archive_dir)
    log.info("reading events from %s", src)
    events = load_events(settings, job.events_file)
    if not events:
        raise ValueError(f"{src} holds no valid events; nothing to train on")
    t_first, t_last = events[0].ts, events[-1].ts
    p = plan(t_first, t_last, job.horizon_days, job.n_cutoffs, job.step_days, job.min_history_days)
    log.info("%d events, %s .. %s; hold-out cutoff %s (%s), training cutoffs %s", len(events),
             _day(t_first), _day(t_last), _day(p.holdout_cutoff), p.holdout, [_day(c) for c in p.train_cutoffs])
    cutoffs = sorted(set(p.train_cutoffs) | {p.holdout_cutoff})
    parts = dict(zip(cutoffs, build_many(events, cutoffs, job.horizon_days, encode=None, users=job.users)))
    holdout = parts[p.holdout_cutoff]
    if p.holdout == "temporal":
        train_parts = [parts[c] for c in p.train_cutoffs]
    else:
        train_part, holdout = _split(holdout, HOLDOUT_USER_SHARE, cfg.seed)
        train_parts = [train_part]
    log.info("training rows %s, hold-out users %d (%d buyers)", [len(x) for x in train_parts], len(holdout),
             int((holdout.label > 0).sum()))
    fitted = fit(train_parts, cfg)

    version = new_version(f"{src}|{t_last}|{cfg}")
    staging = settings.data_dir / "staging" / version
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        fitted.export(staging, version, job.horizon_weeks, cache_dir=Path(cfg.cache_dir))
        providers = _providers()
        challenger = Scorer(staging, providers=providers)  # proves it loads under the contract
        pr, ev = score_onnx(challenger, holdout)
        metrics = holdout_metrics(holdout.label, pr, ev)
        card = _read_card(staging)
        card.update({
            "metrics": metrics,
            "data": {"source": src, "events": len(events), "first_ts": t_first, "last_ts": t_last,
                     "holdout": p.holdout, "holdout_cutoff": p.holdout_cutoff,
                     "train_cutoffs": p.train_cutoffs, "users": job.users},
        })
        write_card(staging, card)
        registry.register(staging, version, "trained")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("model %s: hold-out Gini %.4f, decile MAPE %.4f, AUC %.4f (%d users)", version,
             metrics["gini"] or float("nan"), metrics["decile_mape"] or float("nan"),
             metrics["auc"] or float("nan"), metrics["users"])

    champ = registry.champion()
    champ_metrics = None
    if champ is not None and champ != version:
        try:
            scorer = Scorer(registry.path(champ), providers=providers)  # the champion still loads
            twin = _validated_twin(registry, champ)
            if twin:  # the refit trained on labels inside this hold-out: compare its validated twin
                scorer = Scorer(registry.path(twin), providers=providers)
            cp, cev = score_onnx(scorer, holdout)
            champ_metrics = holdout_metrics(holdout.label, cp, cev)
            if twin:
                champ_metrics["scored_as"] = twin
            log.info("champion %s%s on the same hold-out: Gini %.4f, decile MAPE %.4f", champ,
                     f" (through its validated twin {twin})" if twin else "",
                     champ_metrics["gini"] or float("nan"), champ_metrics["decile_mape"] or float("nan"))
        except (ContractError, OSError) as exc:
            log.warning("champion %s cannot be scored any more (%s); any loadable challenger replaces it", champ, exc)
    ok, reason = job.policy.decide(metrics, champ_metrics)
    promoted, served, refit = False, version, None
    if ok and job.promote:
        served, refit = _refit_latest(settings, job, cfg, events, p, parts, version, holdout, ev, registry,
                                      providers)
        if served != version:
            reason = (f"refit of {version} on the newest cutoffs (to {_day(p.holdout_cutoff)}, labels to "
                      f"{_day(t_last)}), carrying its hold-out metrics; validated: {reason}")
        registry.set_champion(served, reason)
        promoted = True
        log.info("promoted %s: %s", served, reason)
    elif ok:
        registry.log("not_promoted", version, f"--no-promote ({reason})", metrics=metrics)
        log.info("kept %s as champion (--no-promote); %s would qualify: %s", champ, version, reason)
    else:
        registry.log("rejected", version, reason, metrics=metrics, champion=champ, champion_metrics=champ_metrics)
        log.info("kept champion %s; challenger %s rejected: %s", champ, version, reason)
    for v in dict.fromkeys([version, served]):
        card = registry.card(v)
        card["promotion"] = {"promoted": promoted, "reason": reason, "champion_before": champ,
                             "champion_metrics": champ_metrics, "served_as": served}
        if refit is not None:
            card["refit"] = refit
        write_card(registry.path(v), card)
    return Outcome(served, registry.path(served), metrics, champ, champ_metrics, promoted, reason,
                   round(time.perf_counter() - t0, 1), refit)


def _keep_embedding_space(cfg, registry: Registry):
    """Retrain the head on the champion's text encoder unless told to refit it: a new encoder
    puts new embeddings in another space than the review means stored in Redis, and workers
    will not serve it until `clv replay` re-embeds the archive (docs/redis.md)."""
    if not cfg.use_text or cfg.encoder_from or cfg.refit_encoder:
        if cfg.refit_encoder:
            log.warning("--refit-encoder: this model gets a new text encoder; once promoted, workers keep "
                        "serving the old champion until `clv replay` (workers stopped) re-embeds the archive")
        return cfg
    champ = registry.champion()
    if champ is None or not (registry.path(champ) / "encoder.onnx").exists():
        return cfg  # first text model: it defines the space (fine-tuned as configured)
    log.info("reusing champion %s's text encoder: the embeddings in Redis stay valid "
             "(--refit-encoder fine-tunes a new one)", champ)
    return dataclasses.replace(cfg, encoder_from=str(registry.path(champ)))


def _read_card(d: Path) -> dict:
    import json

    return json.loads((Path(d) / "card.json").read_text())


def _day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def parse_every(text: str) -> float:
    """'6h', '30m', '90s', '1d', '1h30m' or plain seconds -> seconds."""
    import re

    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        secs = float(s)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([dhms])", s)
        if not parts or "".join(f"{a}{b}" for a, b in parts) != s.replace(" ", ""):
            raise ValueError(f"--every {text!r} is not a period; write e.g. 6h, 30m, 90s or 1d")
        secs = sum(float(a) * {"d": 86400, "h": 3600, "m": 60, "s": 1}[b] for a, b in parts)
    if secs <= 0:
        raise ValueError(f"--every {text!r} must be positive")
    return secs


def run_forever(settings, job: Job, every_s: float, *, stop: threading.Event | None = None,
                max_runs: int | None = None, once: Callable = train_once) -> int:
    """Train now and then every ``every_s`` seconds until ``stop`` is set (or ``max_runs``).
    A failed run is logged with its cause and retried at the next period. Returns runs done."""
    stop = stop or threading.Event()
    runs = 0
    while not stop.is_set():
        started = time.time()
        runs += 1
        log.info("training run %d starting", runs)
        try:
            out = once(settings, job)
            log.info("run %d done in %.0fs: model %s %s (%s)", runs, out.seconds, out.version,
                     "promoted" if out.promoted else "not promoted", out.reason)
        except (ValueError, FileNotFoundError) as exc:  # bad or missing input: the message says it all
            log.error("training run %d failed: %s; retrying at the next period", runs, exc)
        except Exception as exc:  # noqa: BLE001 - the loop must survive any failed run
            log.exception("training run %d failed: %s; retrying at the next period", runs, exc)
        if max_runs is not None and runs >= max_runs:
            break
        wait = max(0.0, started + every_s - time.time())
        log.info("next training run at %s UTC (in %.0fs)",
                 time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() + wait)), wait)
        stop.wait(wait)
    return runs
