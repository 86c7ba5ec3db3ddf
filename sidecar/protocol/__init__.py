"""Protocol logic with no I/O, each rule in one module: the message record and its ids
(`message`), SSE frames (`sse`), a stream's position in its user's log and what a connect
replays (`delivery`), what Tock can decode (`tock`), and signed identity tokens (`token`)."""
