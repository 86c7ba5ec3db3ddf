"""tock-sse-sidecar: Server-Sent Events delivery of Tock bot responses."""

__version__ = "0.1.0"
