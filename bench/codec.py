"""State codec cost per user: ``streams.fold.encode_state`` / ``decode_state`` (state version 2).

    .venv/bin/python bench/codec.py [--users 300] [--days 120] [--runs 7] [--baseline FILE] [--json OUT]

States come from replaying a simulated archive (one State per user, as the worker would hold
them). Each run times one encode and one decode of every user; the table shows the best and the
median run in µs per user, and the mean blob size. ``--baseline FILE`` loads another copy of
``streams/fold.py`` (e.g. ``git show REV:streams/fold.py > /tmp/fold_old.py``) and times its codec
on the same states in alternating runs, checks that both write the same bytes and read the same
values, and reports the speed-up.
"""
from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import typer

from common import Report, load

app = typer.Typer(add_completion=False)


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location("fold_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def _time_codec(encode, decode, states, blobs) -> tuple[float, float]:
    """µs per user for one pass of encode over ``states`` and decode over ``blobs``."""
    t0 = time.perf_counter()
    for s in states:
        encode(s)
    t1 = time.perf_counter()
    for b in blobs:
        decode(b)
    t2 = time.perf_counter()
    n = len(states)
    return (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6


@app.command()
def main(users: int = typer.Option(300), days: int = typer.Option(120), runs: int = typer.Option(7, min=1),
         baseline: Path = typer.Option(None, help="another streams/fold.py to compare against"),
         json_out: Path = typer.Option(None, "--json")) -> None:
    from streams.fold import decode_state, encode_state, replay
    from streams.simulate import simulate

    sim = simulate(n_users=users, start="2025-01-01", days=days, seed=11)
    per: dict[str, list] = {}
    for ev in sorted(sim.iter_events(), key=lambda e: e.ts):
        per.setdefault(ev.user_id, []).append(ev)
    states = [replay((e, None) for e in evs) for evs in per.values()]
    blobs = [encode_state(s) for s in states]

    codecs = [("streams.fold (this tree)", encode_state, decode_state)]
    if baseline is not None:
        old = _load_module(baseline)
        old_blobs = [old.encode_state(s) for s in states]
        if old_blobs != blobs:
            raise SystemExit(f"the baseline {baseline} writes different bytes for the same states; "
                             "compare codecs of the same state version")
        if [old.decode_state(b).v for b in blobs] != [decode_state(b).v for b in blobs]:
            raise SystemExit(f"the baseline {baseline} reads different values from the same blobs")
        codecs.insert(0, (f"baseline ({baseline.name})", old.encode_state, old.decode_state))

    times: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in codecs}
    for _ in range(runs):  # alternate codecs run by run so load swings hit both alike
        for name, enc, dec in codecs:
            times[name].append(_time_codec(enc, dec, states, blobs))

    size = sum(map(len, blobs)) / len(blobs)
    rep = Report(f"State codec (version 2), {len(states)} simulated users, {runs} runs",
                 ["codec", "encode µs/user (best)", "encode (median)", "decode µs/user (best)",
                  "decode (median)", "blob bytes (mean)", "load"])
    best = {}
    for name, _, _ in codecs:
        enc, dec = zip(*times[name])
        best[name] = (min(enc), min(dec))
        rep.add(name, min(enc), statistics.median(enc), min(dec), statistics.median(dec), size, load())
    if baseline is not None:
        (b_enc, b_dec), (n_enc, n_dec) = best[codecs[0][0]], best[codecs[1][0]]
        rep.notes.append(f"speed-up (best runs): encode {b_enc / n_enc:.1f}x, decode {b_dec / n_dec:.1f}x; "
                         "same bytes and values checked for every user")
    rep.show()
    rep.save(json_out)


if __name__ == "__main__":
    app()
