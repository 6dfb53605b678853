"""A model may only score the review embeddings in Redis if it was trained with the encoder
that built them: the first text model to score records its encoder id in ``clv:v1:meta``
(``encoder_id``); a champion with another encoder waits (the current model keeps serving, or
nothing scores if the current one is incompatible) until `clv replay` re-embeds the archive and
records the new space. Real Redis, real ONNX models from tests/chaos/models.py."""
from __future__ import annotations

import asyncio
import uuid

import pytest

from serving.registry import Registry
from serving.scorer import HotScorer
from streams.app import Worker
from tests.chaos.models import register

pytestmark = pytest.mark.integration


def test_a_champion_with_another_encoder_waits_for_a_replay(services, tmp_path, caplog):
    s = services.settings(redis_prefix=f"space{uuid.uuid4().hex[:8]}", data_dir=tmp_path / "var")
    reg = Registry(s.models_dir)
    register(reg, "m1", champion=True, encoder=True, encoder_id="encA")
    scorer = HotScorer(reg, ["CPUExecutionProvider"])
    worker = Worker(s, None, scorer)

    async def go():
        store = worker.store
        await worker.reload_model()  # the first text model claims the space
        assert await store.embedding_space() == "encA"
        assert scorer.current.version == "m1"

        register(reg, "m2", champion=True, encoder=True, encoder_id="encB", seed=1)
        await worker.reload_model()
        assert scorer.current.version == "m1", "m2 must wait: its encoder is not the stored one"
        assert any("clv replay" in why for why in scorer.held.values())
        await worker.reload_model()  # held, not reloaded every poll
        assert scorer.current.version == "m1"

        await store.claim_embedding_space("encB", replace=True)  # what `clv replay` records
        await worker.reload_model()
        assert scorer.current.version == "m2"

        # a worker started on a champion whose encoder is not the stored one scores nothing
        await store.claim_embedding_space("encA", replace=True)
        fresh = HotScorer(reg, ["CPUExecutionProvider"])
        w2 = Worker(s, None, fresh)
        await w2.reload_model()
        assert fresh.current is None
        # head-only models (no text) can score any space
        register(reg, "m3", champion=True, seed=2)
        await w2.reload_model()
        assert fresh.current.version == "m3"
        await store.r.aclose()
        await w2.store.r.aclose()

    asyncio.run(go())
    assert "encoder encB, but the user embeddings in Redis were built with encoder encA" in caplog.text
