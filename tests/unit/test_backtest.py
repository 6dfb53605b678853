"""`clv backtest`: input parsing and validation, CSV -> Order events, the baselines-only run
end to end on the CDNOW sample, no leakage past the cutoff, and (marked train) the model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from training.transactions import (
    InputError, day_end_epoch, load_transactions, parse_date, parse_horizon, to_orders,
)


# ---- parsing -------------------------------------------------------------------------------
def test_parse_date_accepts_iso_and_cdnow_style():
    assert parse_date("1997-09-30") == pd.Timestamp("1997-09-30")
    assert parse_date("19970930") == pd.Timestamp("1997-09-30")
    assert parse_date("1997-09-30T17:45:00Z") == pd.Timestamp("1997-09-30")
    with pytest.raises(InputError, match="YYYY-MM-DD"):
        parse_date("30/09/1997")
    with pytest.raises(InputError, match="YYYYMMDD"):
        parse_date("19971340")


def test_parse_horizon_weeks_and_days():
    assert parse_horizon("39w") == 273.0
    assert parse_horizon("273d") == 273.0
    assert parse_horizon("90") == 90.0
    for bad in ("39 weeks", "-3w", "0d", "w"):
        with pytest.raises(InputError, match="39w or 273d"):
            parse_horizon(bad)


def test_cutoff_day_is_inclusive():
    # an order dated on the cutoff is stamped at noon, before the end of the cutoff day
    (o,) = to_orders(pd.DataFrame({"customer_id": ["a"], "date": [pd.Timestamp("1997-09-30")], "amount": [1.0]}))
    assert o.ts < day_end_epoch(pd.Timestamp("1997-09-30")) < o.ts + 86400


# ---- CSV validation ---------------------------------------------------------------------------
def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "tx.csv"
    p.write_text(text)
    return p


def test_load_transactions_good_file(tmp_path):
    p = write(tmp_path, "date,Amount,customer_id,extra\n19970101,11.77,00001,x\n\n1997-01-12,12,00002,y\n"
                        "1997-01-12T10:00:00,3.5,00002,z\n")
    tx = load_transactions(p)
    assert tx["customer_id"].tolist() == ["00001", "00002", "00002"]
    assert tx["date"].tolist() == [pd.Timestamp("1997-01-01"), pd.Timestamp("1997-01-12"), pd.Timestamp("1997-01-12")]
    assert tx["amount"].tolist() == [11.77, 12.0, 3.5]


@pytest.mark.parametrize("body, expect", [
    ("customer_id,date,amount\na,19970101,1\nb,1997-13-01,2\n", "line 3, column 'date': '1997-13-01' is not a date"),
    ("customer_id,date,amount\na,19970101,1\n\nb,19970102,$3\n", "line 4, column 'amount': '$3' is not a number"),
    ("customer_id,date,amount\na,19970101,-5\n", "line 2, column 'amount': '-5' is negative"),
    ("customer_id,date,amount\n,19970101,5\n", "line 2, column 'customer_id': empty"),
    ("customer_id,date,amount\na,19970101\n", "line 2: 2 field(s), expected at least 3"),
    ("customer,date,amount\na,19970101,5\n", "line 1: header"),
    ("", "the file is empty"),
    ("customer_id,date,amount\n", "no transactions after the header"),
])
def test_bad_csv_names_line_column_and_fix(tmp_path, body, expect):
    with pytest.raises(InputError) as err:
        load_transactions(write(tmp_path, body))
    assert expect in str(err.value)


def test_many_bad_rows_are_counted(tmp_path):
    rows = "".join(f"c{i},notadate,1\n" for i in range(12))
    with pytest.raises(InputError, match=r"12 bad row\(s\) \(and 7 more\)") as err:
        load_transactions(write(tmp_path, "customer_id,date,amount\n" + rows))
    assert "Fix those rows" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_transactions(tmp_path / "nope.csv")


# ---- CSV rows -> Order events -------------------------------------------------------------------
def test_to_orders_deterministic_ids_and_repeated_rows_stay_distinct():
    tx = pd.DataFrame({"customer_id": ["a", "a", "b"],
                       "date": pd.to_datetime(["1997-01-01", "1997-01-01", "1997-01-02"]),
                       "amount": [5.0, 5.0, 7.0]})
    orders = to_orders(tx)
    assert len({o.event_id for o in orders}) == 3  # identical rows are two orders
    assert [o.user_id for o in orders] == ["a", "a", "b"]
    assert orders[0].ts == pd.Timestamp("1997-01-01 12:00", tz="UTC").timestamp()
    assert orders[2].amount == 7.0 and orders[2].order_id == orders[2].event_id
    # ids depend on the rows, not their order in the file
    again = to_orders(tx.iloc[[2, 0, 1]].reset_index(drop=True))
    assert {o.event_id for o in again} == {o.event_id for o in orders}


# ---- end to end (baselines only) on the CDNOW sample ------------------------------------------
@pytest.fixture(scope="module")
def sample_csv(tmp_path_factory) -> Path:
    from training import cdnow

    return cdnow.to_csv(cdnow.load(sample=True), tmp_path_factory.mktemp("cdnow") / "cdnow_sample.csv")


def test_cli_backtest_baselines_with_report(sample_csv, tmp_path):
    from clv_cli import app

    rep = tmp_path / "report"
    r = CliRunner().invoke(app, ["backtest", "--transactions", str(sample_csv), "--cutoff", "19970930",
                                 "--horizon", "39w", "--no-model", "--bootstrap", "20", "--report", str(rep)])
    assert r.exit_code == 0, r.output
    for name in ("BG/NBD+GG", "LightGBM-RFM", "naive", "Gini", "dec.MAPE", "Spearman", "AUC any", "F1@20%"):
        assert name in r.output
    assert {p.name for p in rep.iterdir()} >= {"index.html", "gain.png", "deciles.png", "calibration.png", "metrics.json"}
    for png in ("gain.png", "deciles.png", "calibration.png"):
        assert (rep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((rep / "metrics.json").read_text())
    assert m["n_customers"] == 2357 and m["n_boot"] == 20
    g = m["point"]["BG/NBD+GG"]["gini"]
    assert m["lo"]["BG/NBD+GG"]["gini"] <= g <= m["hi"]["BG/NBD+GG"]["gini"]
    assert "gain.png" in (rep / "index.html").read_text()


def test_cli_bad_csv_exits_2_with_line(tmp_path):
    from clv_cli import app

    bad = write(tmp_path, "customer_id,date,amount\na,19970101,1\na,1997-02-30,1\n")
    r = CliRunner().invoke(app, ["backtest", "-t", str(bad), "--cutoff", "1997-01-15", "--no-model"])
    assert r.exit_code == 2
    assert "line 3, column 'date'" in r.output


def test_cli_cutoff_outside_data(sample_csv):
    from clv_cli import app

    r = CliRunner().invoke(app, ["backtest", "-t", str(sample_csv), "--cutoff", "1999-01-01", "--no-model"])
    assert r.exit_code == 2 and "outside the transactions" in r.output


def _perturb_after(tx: pd.DataFrame, cut: pd.Timestamp) -> pd.DataFrame:
    """Change everything after the cutoff: scale amounts, add a new big spender's rows."""
    after = tx["date"] > cut
    out = tx.copy()
    out.loc[after, "amount"] = out.loc[after, "amount"] * 7 + 1
    extra = pd.DataFrame({"customer_id": [tx["customer_id"].iloc[0]] * 3,
                          "date": [cut + pd.Timedelta(days=d) for d in (1, 30, 200)], "amount": [999.0] * 3})
    return pd.concat([out, extra], ignore_index=True)


def test_baselines_see_nothing_after_the_cutoff():
    from training import cdnow
    from training.backtest import run_backtest

    tx = cdnow.load(sample=True)
    cut = pd.Timestamp("1997-09-30")
    a = run_backtest(tx, cut, 273.0, model=False, n_boot=0, progress=False)
    b = run_backtest(_perturb_after(tx, cut), cut, 273.0, model=False, n_boot=0, progress=False)
    assert a.ids == b.ids
    assert not np.allclose(a.y, b.y)  # the actuals did change ...
    for ma, mb in zip(a.models, b.models):  # ... the predictions did not
        assert ma.name == mb.name
        np.testing.assert_array_equal(ma.expected, mb.expected)
    # the validated horizon factor is measured on data up to the cutoff only
    assert set(a.meta["horizon factors"]) == {"LightGBM-RFM"}
    assert a.meta["horizon factors"] == b.meta["horizon factors"]


# ---- the model (needs torch) ---------------------------------------------------------------------
@pytest.mark.train
def test_model_backtest_on_cdnow_sample_without_leakage():
    pytest.importorskip("torch")
    from training import cdnow
    from training.backtest import run_backtest
    from training.train import TrainConfig

    tx = cdnow.load(sample=True)
    cut = pd.Timestamp("1997-09-30")
    cfg = TrainConfig(seed=0, quick=True, device="cpu", epochs=8)
    a = run_backtest(tx, cut, 273.0, model=True, cfg=cfg, n_boot=10, n_train_cutoffs=1,
                     baselines=("bgnbd",), progress=False)
    assert [m.name for m in a.models] == ["model", "BG/NBD+GG"]
    model = a.models[0]
    assert model.expected.shape == (2357,) and np.all(np.isfinite(model.expected)) and np.all(model.expected >= 0)
    assert np.all((model.p_any >= 0) & (model.p_any <= 1))
    assert a.evaluation.point["model"]["gini"] > 0.5
    assert ("model", "BG/NBD+GG") in a.evaluation.diffs
    b = run_backtest(_perturb_after(tx, cut), cut, 273.0, model=True, cfg=cfg, n_boot=0, n_train_cutoffs=1,
                     baselines=(), progress=False)
    np.testing.assert_allclose(b.models[0].expected, model.expected, rtol=1e-5)
    assert "model" in a.meta["horizon factors"]
    assert b.meta["horizon factors"]["model"] == pytest.approx(a.meta["horizon factors"]["model"], rel=1e-5)
    # intervals: conformal scales from the validation replay (labels end at the cutoff), so
    # they too ignore everything after the cutoff; coverage reported per decile
    assert set(model.interval_scale) == {"0.5", "0.8"} and model.interval_scale == b.models[0].interval_scale
    iv = a.meta["intervals"]["model"]
    assert set(iv) == {"total_ratio", "raw 80%", "50%", "80%"} and len(iv["80%"]["by_decile"]) == 10
    assert iv["80%"]["coverage"] >= iv["50%"]["coverage"] and 0.6 < iv["80%"]["coverage"] <= 1.0
    assert iv["80%"]["ci"][0] < iv["80%"]["coverage"] < iv["80%"]["ci"][1]
    assert set(a.meta["intervals"]["BG/NBD+GG"]) == {"total_ratio"}


# ---- --events sources ----------------------------------------------------------------------------
def _side_events():
    from streams.events import parse

    base = pd.Timestamp("1997-03-01", tz="UTC").timestamp()
    return [
        parse({"type": "click", "event_id": "c1", "user_id": "0001", "ts": base, "action": "view"}),
        parse({"type": "review", "event_id": "r1", "user_id": "0001", "ts": base + 60, "item_id": "i",
               "rating": 5, "text": "Will order again."}),
        parse({"type": "order", "event_id": "o1", "user_id": "0001", "ts": base + 120, "order_id": "o1", "amount": 3.0}),
        parse({"type": "profile", "event_id": "p1", "user_id": "0002", "ts": base, "channel": "email"}),
    ]


def test_load_side_events_from_jsonl_drops_orders(tmp_path):
    from streams.events import encode
    from training.backtest import load_side_events

    p = tmp_path / "events.jsonl"
    p.write_bytes(b"".join(encode(e) + b"\n" for e in _side_events()) + b"not json\n")
    evs, counts = load_side_events(p)
    assert counts == {"click": 1, "review": 1, "order": 1, "profile": 1}
    assert sorted(e.type for e in evs) == ["click", "profile", "review"]
    # a directory of JSONL files reads the same
    evs2, _ = load_side_events(tmp_path)
    assert sorted(e.event_id for e in evs2) == sorted(e.event_id for e in evs)


def test_load_side_events_from_archive_dir(tmp_path):
    from streams.archive import ArchiveWriter
    from streams.events import encode
    from streams.pipeline import Record
    from training.backtest import load_side_events

    evs = _side_events()
    items = [(Record(f"clv.{e.type}s", 0, i, e.user_id.encode(), encode(e)), e) for i, e in enumerate(evs)]
    ArchiveWriter(tmp_path / "archive").write(items + items[:2])  # redelivered duplicates too
    got, counts = load_side_events(tmp_path / "archive")
    assert counts == {"click": 1, "review": 1, "order": 1, "profile": 1}
    assert {e.event_id for e in got} == {"c1", "r1", "p1"}


def test_load_side_events_missing(tmp_path):
    from training.backtest import load_side_events

    with pytest.raises(InputError, match="does not exist"):
        load_side_events(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no archive"):
        load_side_events(tmp_path / "empty")


# ---- --ablation ------------------------------------------------------------------------------------
@pytest.mark.train
def test_cli_ablation_on_a_small_shop(tmp_path):
    """`clv backtest --ablation` on a user's CSV + events JSONL: five arms, the baselines, the
    paired step gains, and each arm saw only its own events."""
    pytest.importorskip("torch")
    from clv_cli import app
    from streams.events import encode
    from streams.simulate import simulate
    from training.ablation import ARMS, orders_frame

    events = list(simulate(n_users=400, start="2024-01-01", days=300, seed=3).iter_events())
    tx = orders_frame(events)
    csv = tmp_path / "tx.csv"
    tx.assign(date=tx["date"].dt.strftime("%Y-%m-%d")).to_csv(csv, index=False)
    side = tmp_path / "events.jsonl"
    side.write_bytes(b"".join(encode(e) + b"\n" for e in events))  # orders in it are dropped
    args = ["backtest", "-t", str(csv), "--cutoff", "2024-07-31", "--horizon", "8w", "--quick",
            "--bootstrap", "10", "--train-cutoffs", "1"]
    r = CliRunner().invoke(app, [*args, "--ablation", "--events", str(side), "--report", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    for name, _, _ in ARMS:
        assert f"{name} - " in r.output  # the paired step table
    for name in ("BG/NBD+GG", "LightGBM-RFM", "naive"):
        assert name in r.output
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert set(m["point"]) == {a[0] for a in ARMS} | {"BG/NBD+GG", "LightGBM-RFM", "naive"}
    assert "+ review text - + reviews (ratings)" in m["diffs"]
    assert m["point"]["orders only"]["gini"] > 0.3
    r = CliRunner().invoke(app, [*args, "--ablation"])
    assert r.exit_code == 2 and "--events" in r.output
