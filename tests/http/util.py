"""Shared by the /collect tests: a Collector on a fresh queue and registry, and a metric reader."""

from __future__ import annotations

from typing import Any

from estat_ingest.config import Settings
from estat_ingest.http.collect import Collector
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.queue import EventQueue


def make(**overrides: Any) -> tuple[Collector, EventQueue[tuple[float, bytes]], Metrics]:
    settings = Settings.from_env({}, **overrides)
    q: EventQueue[tuple[float, bytes]] = EventQueue(settings.channel_size)
    m = Metrics()
    c = Collector(settings, q, m, clock=lambda: 1764821594.25)
    c.accepting = True
    return c, q, m


def value(m: Metrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels or None)
    return 0.0 if v is None else v
