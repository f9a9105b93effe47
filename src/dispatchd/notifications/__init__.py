"""Notifications: the durable outbox of every outgoing message (seed 004)."""
