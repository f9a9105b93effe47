"""Prometheus metrics of seed 003 §3.2, named as the seed names them."""

from prometheus_client import Counter, Gauge, Histogram

RESERVATIONS = Counter("reservations", "Reservations confirmed")
REJECTIONS = Counter("rejections", "Reservations refused, by code", ["code"])
COMMIT_DURATION = Histogram(
    "commit_duration_seconds",
    "Time of one reservation commit (transaction included)",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
ACTIVE_RESOURCES = Gauge("active_resources", "OPEN resources (refreshed at each scrape)")
CAPACITY_UTILIZATION = Gauge(
    "capacity_utilization", "Reserved / capacity over OPEN resources (at each scrape)"
)
