"""Realtime (seed 002): the event log pushed over SSE and WebSocket, resumable, per principal."""
