"""Transaction CSVs for the backtest: parse dates/horizons, load and validate
``customer_id,date,amount`` files, and turn rows into ``Order`` events.

A transactions frame always has the columns ``customer_id`` (str), ``date``
(datetime64, day resolution) and ``amount`` (float64 >= 0), one row per purchase.
"""
from __future__ import annotations

import csv
import datetime as dt
import re
from hashlib import blake2b
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from streams.events import Order

REQUIRED = ("customer_id", "date", "amount")
DAY_S = 86400.0
_YYYYMMDD = re.compile(r"^\d{8}$")
_HORIZON = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([dwDW]?)\s*$")
MAX_ERRORS_SHOWN = 5


class InputError(ValueError):
    """Bad user input (file, date, horizon); the message says what and what to do."""


def parse_date(text: str, *, what: str = "date") -> pd.Timestamp:
    """ISO date (``1997-09-30``, time part ignored) or CDNOW-style ``19970930``."""
    s = str(text).strip()
    try:
        if _YYYYMMDD.match(s):
            ts = pd.Timestamp(dt.datetime.strptime(s, "%Y%m%d"))
        else:
            ts = pd.Timestamp(dt.datetime.fromisoformat(s.replace("Z", "+00:00")))
            if ts.tzinfo is not None:
                ts = ts.tz_convert("UTC").tz_localize(None)
    except ValueError:
        raise InputError(
            f"{what} {text!r} is not a date; write it as YYYY-MM-DD (e.g. 1997-09-30) or YYYYMMDD (19970930)"
        ) from None
    return ts.normalize()


def parse_horizon(text: str) -> float:
    """Horizon in days from ``39w`` (weeks), ``273d`` or a bare number of days."""
    m = _HORIZON.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise InputError(
            f"horizon {text!r} is not understood; write a positive number of weeks or days, e.g. 39w or 273d"
        )
    n = float(m.group(1))
    return n * 7.0 if m.group(2).lower() == "w" else n


def day_end_epoch(day: pd.Timestamp) -> float:
    """Epoch seconds (UTC) of the end of ``day`` (= midnight starting the next day).

    The cutoff date is inclusive: a purchase dated on the cutoff (stamped at noon) is in the
    calibration period, one dated the day after is in the horizon."""
    return (pd.Timestamp(day).normalize() + pd.Timedelta(days=1)).timestamp()


def load_transactions(
    path: str | Path, *, progress: Callable[[int], None] | None = None
) -> pd.DataFrame:
    """Read and validate a ``customer_id,date,amount`` CSV (extra columns are ignored).

    Raises :class:`InputError` naming the line and column of the first bad values."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"transactions file {str(path)!r} does not exist; pass a CSV with columns customer_id,date,amount")
    ids: list[str] = []
    dates: list[str] = []
    amounts: list[str] = []
    lines: list[int] = []
    errors: list[str] = []
    n_bad = 0
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise InputError(f"{path}: the file is empty; expected a header line customer_id,date,amount") from None
        except (UnicodeDecodeError, csv.Error) as exc:
            raise InputError(f"{path}: cannot read the header as UTF-8 CSV ({exc}); save the file as UTF-8 CSV") from None
        cols = [h.strip().lower() for h in header]
        missing = [c for c in REQUIRED if c not in cols]
        if missing:
            raise InputError(
                f"{path} line 1: header {header!r} lacks column(s) {missing}; the first line must name the "
                "columns customer_id,date,amount (any order, extra columns are ignored)"
            )
        ci, di, ai = (cols.index(c) for c in REQUIRED)
        width = max(ci, di, ai) + 1
        try:
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    continue  # blank line
                line = reader.line_num
                if len(row) < width:
                    n_bad += 1
                    if len(errors) < MAX_ERRORS_SHOWN:
                        errors.append(f"line {line}: {len(row)} field(s), expected at least {width} (customer_id,date,amount)")
                    continue
                cid = row[ci].strip()
                if not cid:
                    n_bad += 1
                    if len(errors) < MAX_ERRORS_SHOWN:
                        errors.append(f"line {line}, column 'customer_id': empty; every row needs a customer id")
                    continue
                if len(cid) > 128:
                    n_bad += 1
                    if len(errors) < MAX_ERRORS_SHOWN:
                        errors.append(f"line {line}, column 'customer_id': {len(cid)} characters, the limit is 128; shorten or hash the ids")
                    continue
                ids.append(cid)
                dates.append(row[di].strip())
                amounts.append(row[ai].strip())
                lines.append(line)
                if progress is not None and len(ids) % 100_000 == 0:
                    progress(100_000)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise InputError(
                f"{path} near line {reader.line_num}: not valid UTF-8 CSV ({exc}); save the file as UTF-8 CSV"
            ) from None
    if progress is not None:
        progress(len(ids) % 100_000)

    line_arr = np.asarray(lines, dtype=np.int64)
    date_ser = pd.Series(dates, dtype=object)
    parsed = _parse_dates(date_ser)
    bad_date = parsed.isna().to_numpy()
    amount = pd.to_numeric(pd.Series(amounts, dtype=object), errors="coerce").to_numpy(dtype=np.float64)
    bad_amount = ~np.isfinite(amount)
    neg_amount = np.isfinite(amount) & (amount < 0)
    for mask, msg in (
        (bad_date, "column 'date': {v!r} is not a date; use YYYY-MM-DD or YYYYMMDD"),
        (bad_amount, "column 'amount': {v!r} is not a number; use a plain decimal like 12.50 (no currency sign)"),
        (neg_amount, "column 'amount': {v!r} is negative; refunds are not supported, net them into the original purchase or drop the row"),
    ):
        idx = np.flatnonzero(mask)
        n_bad += idx.size
        src = dates if mask is bad_date else amounts
        for i in idx[: max(0, MAX_ERRORS_SHOWN - len(errors))]:
            errors.append(f"line {line_arr[i]}, " + msg.format(v=src[i]))
    if n_bad:
        more = f" (and {n_bad - len(errors)} more)" if n_bad > len(errors) else ""
        raise InputError(
            f"{path}: {n_bad} bad row(s){more}:\n  " + "\n  ".join(errors)
            + "\nFix those rows (or remove them) and run again."
        )
    if not ids:
        raise InputError(f"{path}: no transactions after the header; add rows customer_id,date,amount")
    return pd.DataFrame({"customer_id": ids, "date": parsed.to_numpy(), "amount": amount})


def _parse_dates(s: pd.Series) -> pd.Series:
    """Vectorised: YYYYMMDD strings and ISO strings; NaT where neither fits."""
    out = pd.Series(pd.NaT, index=s.index, dtype="datetime64[ns]")
    compact = s.str.fullmatch(r"\d{8}").fillna(False).to_numpy(dtype=bool)
    if compact.any():
        out[compact] = pd.to_datetime(s[compact], format="%Y%m%d", errors="coerce")
    rest = ~compact
    if rest.any():
        iso = pd.to_datetime(s[rest], format="ISO8601", errors="coerce", utc=True)
        out[rest] = iso.dt.tz_localize(None).to_numpy()
    return out.dt.normalize()


def spend_between(tx: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp, ids: Iterable[str]) -> np.ndarray:
    """Spend per customer (in ``ids`` order) dated in ``(start, end]``."""
    sel = tx[(tx["date"] > start) & (tx["date"] <= end)]
    return sel.groupby("customer_id")["amount"].sum().reindex(pd.Index(list(ids))).fillna(0.0).to_numpy()


def active_customers(tx: pd.DataFrame, cutoff: pd.Timestamp) -> list[str]:
    """Customers with at least one purchase on or before ``cutoff`` (sorted)."""
    return sorted(tx.loc[tx["date"] <= cutoff, "customer_id"].unique().tolist())


def to_orders(tx: pd.DataFrame, *, source: str = "csv") -> list[Order]:
    """One ``Order`` per row: user_id = customer_id, ts = the date at noon UTC.

    ``event_id`` is a hash of (customer, date, amount, occurrence number of that identical
    row), so ids do not depend on row order and repeated identical rows stay distinct
    (the fold would drop a repeated id as a duplicate)."""
    cid = tx["customer_id"].astype(str).to_numpy()
    days = tx["date"].to_numpy(dtype="datetime64[D]")
    amt = tx["amount"].to_numpy(dtype=np.float64)
    ts = days.astype("datetime64[s]").astype(np.int64).astype(np.float64) + DAY_S / 2
    day_str = np.datetime_as_string(days, unit="D")
    key = pd.Series([f"{c}|{d}|{a!r}" for c, d, a in zip(cid, day_str, amt)])
    occurrence = key.groupby(key).cumcount().to_numpy()
    out: list[Order] = []
    for k, n, c, t, a in zip(key, occurrence, cid, ts, amt):
        eid = f"{source}:" + blake2b(f"{k}|{n}".encode(), digest_size=10).hexdigest()
        out.append(Order(type="order", event_id=eid, user_id=c, ts=float(t), order_id=eid, amount=float(a)))
    return out

