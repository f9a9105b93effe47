"""Matching: every booking broadcast to every available driver, the first accept wins (seed 000)."""
