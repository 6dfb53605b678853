"""The one frozen Settings object. Every knob is an env var with the ``CLV_`` prefix.

Nothing else in the code base reads ``os.environ``: take a ``Settings`` (usually
``get_settings()``) and pass what you need down.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLV_", frozen=True, extra="ignore")

    # --- Kafka -----------------------------------------------------------
    kafka_bootstrap: str = "127.0.0.1:19092"
    kafka_security_protocol: str = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
    )
    kafka_sasl_mechanism: str = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    topic_clicks: str = "clv.clicks"
    topic_orders: str = "clv.orders"
    topic_reviews: str = "clv.reviews"
    topic_profiles: str = "clv.profiles"
    topic_scores: str = "clv.scores"
    topic_dlq: str = "clv.dlq"
    topic_partitions: int = 4
    consumer_group: str = "clv-worker"
    kafka_session_timeout_s: float = Field(
        10.0, description="consumer-group session timeout: how long a crashed worker's partitions "
        "stay unassigned before the group hands them to a live member (Faust's default is 60 s; "
        "the broker accepts 6-1800 s by default)")

    # --- Redis -----------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:16379/0"
    redis_password: SecretStr | None = None
    redis_tls_ca: Path | None = None
    redis_prefix: str = "clv"

    # --- worker ----------------------------------------------------------
    engine: Literal["faust", "kafka"] = Field(
        "faust", description="how `clv worker` consumes: 'faust' (Faust agents, streams/app.py) or "
        "'kafka' (one aiokafka consumer-group loop, streams/engine.py: same batch step and "
        "guarantees without Faust's per-message path, ~7x the events/s per core)")
    batch_max: int = 5000
    batch_within_s: float = 0.02
    stream_buffer_maxsize: int = 65536
    top_keep: int = Field(
        10_000, description="how many of the highest-CLV users the `top` zset keeps (the ops page's "
        "top list; ~100 bytes of Redis each); streams/keys.py TOP_KEEP")
    retry_backoff_initial_s: float = 0.2
    retry_backoff_max_s: float = 10.0
    worker_web_port: int = 6066
    model_poll_s: float = 5.0

    # --- archive / models -------------------------------------------------
    data_dir: Path = Path("var")
    archive_batch_max: int = 50000
    archive_within_s: float = 5.0
    # archive compaction, retention and Dask replays (streams/compact.py, streams/distributed.py,
    # docs/archive.md)
    archive_retention_days: int = Field(
        0, description="`clv archive compact` drops archive days (ingest date, UTC) older than this "
        "many days; 0 keeps everything. The trainer and `clv replay` then see only what is kept")
    archive_compact_grace_s: float = Field(
        3600.0, description="a day is compacted only this long after it ended (UTC): a write in "
        "flight at midnight or a worker with a late clock may still add a file to it until then")
    dask_scheduler: str | None = Field(
        None, description="Dask scheduler address (tcp://host:8786) for `clv replay` and the "
        "training-set build; unset: one process (or --dask-workers N for a local cluster)")
    dask_partitions: int = Field(
        0, description="user partitions (one Dask task each) of a replay or training-set build; "
        "0 = 4 per worker thread. Any number gives the same result")

    # --- validation limits -------------------------------------------------
    max_message_bytes: int = 256 * 1024
    max_text_chars: int = 5000
    max_amount: float = 1_000_000.0
    max_clock_skew_s: float = 24 * 3600.0
    min_event_ts: float = 631152000.0  # 1990-01-01: older than this is absurd

    # --- API ---------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_token: SecretStr | None = None

    # --- scoring -----------------------------------------------------------
    onnx_providers: str = Field(
        "auto", description="'auto' (CUDA first when present, else CPU) or a comma list"
    )
    score_horizon_weeks: int = 39

    @field_validator("archive_retention_days", "dask_partitions")
    @classmethod
    def _not_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("topic_partitions", "batch_max", "archive_batch_max", "top_keep")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @property
    def event_topics(self) -> tuple[str, str, str, str]:
        return (self.topic_clicks, self.topic_orders, self.topic_reviews, self.topic_profiles)

    def to_env(self) -> dict[str, str]:
        """These settings as CLV_* variables, to start another process with them."""
        out = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            out[f"CLV_{name.upper()}"] = str(value)
        return out

    @property
    def archive_dir(self) -> Path:
        return self.data_dir / "archive"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
