"""FastAPI dependencies shared by the HTTP routers of every layer: the settings and the Kafka producer.

`create_app(settings)` binds `get_settings` to its own settings through `dependency_overrides`
(FastAPI's way), so routers never read `app.state` for them; the producer lives as long as the app.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from kafka import KafkaProducer

from ground.settings import Settings, get_settings

SettingsDep = Annotated[Settings, Depends(get_settings)]


def app_producer(request: Request) -> KafkaProducer:
    """The app's one producer: `app.state.producer` of an app that mounts these routers itself. proxyloop.http
    overrides this dependency with a producer opened on first use (the app starts without a broker)."""
    producer: KafkaProducer = request.app.state.producer
    return producer


ProducerDep = Annotated[KafkaProducer, Depends(app_producer)]
