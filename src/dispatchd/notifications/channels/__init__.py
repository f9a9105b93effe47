"""Outbound channels: each turns one outbox row into one provider call."""
