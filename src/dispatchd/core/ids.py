"""Identifiers: a readable prefix and 128 random bits, e.g. ``bkg_3f2a…`` (Stripe-style)."""

import uuid


def new_id(prefix: str) -> str:
    """Return ``"{prefix}_{32 hex chars}"``."""
    return f"{prefix}_{uuid.uuid4().hex}"
