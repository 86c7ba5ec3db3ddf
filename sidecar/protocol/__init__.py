"""Protocol logic with no I/O: messages, SSE frames, delivery states, replay merge, settings."""
