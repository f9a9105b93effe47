"""The conversation dispatcher (seed 001): every inbound customer conversation reaches one online agent,
round-robin, exactly once, across instances."""
