"""CDNOW (the standard CLV benchmark): load it as a transactions frame, a CSV, or Order events.

``CDNOW_master.txt`` ships in the ``lifetimes`` wheel (``lifetimes/datasets``): 23,570
customers who first bought in Q1 1997, their purchases until 1998-06-30, whitespace
separated columns customer id, date (YYYYMMDD), number of CDs, dollar value.
Standard split: calibration up to 1997-09-30 (inclusive), 39-week hold-out after it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

from streams.events import Order
from training.transactions import InputError, to_orders

CALIBRATION_END = "1997-09-30"
HORIZON = "39w"


def default_path(name: str = "CDNOW_master.txt") -> Path:
    spec = importlib.util.find_spec("lifetimes")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("CDNOW ships with the 'lifetimes' package; install the training extra: pip install -e '.[train]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / name
    if not path.is_file():
        raise InputError(f"{path} is missing from the lifetimes install; reinstall lifetimes==0.11.3")
    return path


def load(path: str | Path | None = None, *, sample: bool = False) -> pd.DataFrame:
    """Transactions frame: customer_id (str, zero-padded as in the file), date, amount, n_items.

    ``sample=True`` loads ``CDNOW_sample.txt`` (2,357 customers, a 1/10 sample; its
    customers are renumbered 0001..2357), which is what the fast tests use."""
    if path is None:
        path = default_path("CDNOW_sample.txt" if sample else "CDNOW_master.txt")
    raw = pd.read_csv(path, sep=r"\s+", header=None, dtype=str, comment=None)
    if raw.shape[1] == 5:  # the sample has an extra leading column (original customer id)
        raw = raw.iloc[:, 1:]
    raw.columns = ["customer_id", "date", "n_items", "amount"]
    raw = raw[raw["date"].str.fullmatch(r"\d{8}")]  # drops the header line of the master file
    return pd.DataFrame({
        "customer_id": raw["customer_id"].to_numpy(),
        "date": pd.to_datetime(raw["date"], format="%Y%m%d").to_numpy(),
        "amount": raw["amount"].astype(float).to_numpy(),
        "n_items": raw["n_items"].astype(int).to_numpy(),
    })


def to_csv(tx: pd.DataFrame, path: str | Path) -> Path:
    """Write the backtest's CSV (customer_id,date,amount with YYYYMMDD dates, as CDNOW has)."""
    path = Path(path)
    out = tx[["customer_id", "date", "amount"]].copy()
    out["date"] = out["date"].dt.strftime("%Y%m%d")
    out.to_csv(path, index=False)
    return path


def events(tx: pd.DataFrame | None = None) -> list[Order]:
    """CDNOW as Order events (one per row; see ``training.transactions.to_orders``)."""
    return to_orders(load() if tx is None else tx, source="cdnow")
