"""tock-sse-sidecar: Server-Sent Events delivery of Tock bot responses.

Layers, lowest first. A module imports from its own layer and the layers above it in this
list, never from one below it (tests/test_layers.py reads this list and holds every module
of the package to it; a module it does not place fails that test). A name covers the
module of that name and, for a package, every module in it.

    errors, logs: the error tree, log records and the current request id, for every layer
    protocol: the rules without I/O (messages, the feed's vocabulary, frames, tokens)
    config, identity, metrics: settings, who a request is for, the Prometheus counts
    store: the message stores (they take `StoreOptions`, never the settings)
    hub: who is listening on this instance
    stream: one SSE stream, written to a sink
    http, net: the listeners' applications and their sockets
    app: one instance, assembled (the settings become store options here)
    cli, startup, __main__: the command line and what it checks before serving
"""

__version__ = "0.1.0"
