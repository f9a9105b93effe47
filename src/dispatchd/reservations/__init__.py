"""Reservations: capacity-limited resources booked atomically, never overbooked (seed 003)."""
