"""Kafka connection settings shared by every client (aiokafka producers/consumers/admin and
the Faust app), so security (SASL / SSL) is configured in one place: Settings."""
from __future__ import annotations

import logging
import ssl

log = logging.getLogger("clv.kafka")


def _ssl_context(settings) -> ssl.SSLContext | None:
    if "SSL" not in settings.kafka_security_protocol:
        return None
    ctx = ssl.create_default_context(cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None)
    return ctx


def client_kwargs(settings) -> dict:
    """Keyword arguments for aiokafka clients (AIOKafkaProducer/Consumer/AdminClient)."""
    kw: dict = {"bootstrap_servers": settings.kafka_bootstrap,
                "security_protocol": settings.kafka_security_protocol}
    if settings.kafka_security_protocol.startswith("SASL"):
        kw["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kw["sasl_plain_username"] = settings.kafka_sasl_username
        kw["sasl_plain_password"] = (
            settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None
        )
    ctx = _ssl_context(settings)
    if ctx is not None:
        kw["ssl_context"] = ctx
    return kw


def faust_credentials(settings):
    """Faust's broker_credentials for the same settings (None for PLAINTEXT)."""
    import faust

    proto = settings.kafka_security_protocol
    if proto == "PLAINTEXT":
        return None
    if proto.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None,
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=_ssl_context(settings),
        )
    return faust.SSLCredentials(_ssl_context(settings))


async def ensure_topics(settings, partitions: int | None = None) -> list[str]:
    """Create the event, scores and DLQ topics when missing. Returns the names created."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    n = partitions or settings.topic_partitions
    names = [*settings.event_topics, settings.topic_scores, settings.topic_dlq]
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in names if t not in existing]
        if missing:
            try:
                await admin.create_topics([NewTopic(t, n, 1) for t in missing])
            except TopicAlreadyExistsError:
                pass
            log.info("created topics %s with %d partitions", missing, n)
        return missing
    finally:
        await admin.close()
