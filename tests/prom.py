"""Read one value out of a Prometheus exposition (``GET /metrics``): tests assert values that move."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name`` (``reservations_total``, ``…_bucket``, ``…_count``) whose labels
    include ``labels``; 0.0 when absent (a labelled counter not yet incremented has no sample)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return found.value
    return 0.0
