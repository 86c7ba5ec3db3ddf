"""Thin HTTP adapters: quart-trio apps (and one raw ASGI route) around the core."""
