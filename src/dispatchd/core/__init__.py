"""Shared kernel: database, clock, events, sweeper, auth, errors. Imports no domain."""
