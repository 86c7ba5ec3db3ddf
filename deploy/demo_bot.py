"""A stand-in bot for deploy/compose.yaml: posts a message through the sidecars' send API
on an interval, round-robin over the given send URLs. Standard library only.

Environment: BOT_SEND_URLS (comma-separated .../v1/send URLs), BOT_SEND_TOKEN (bearer token,
optional), BOT_RECIPIENT, BOT_CONNECTOR, BOT_INTERVAL_SECONDS, BOT_COUNT (stop after that
many messages; 0 or unset: never).
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import sys
import time
import urllib.error
import urllib.request


def send(url: str, token: str, connector: str, recipient: str, text: str) -> str:
    body = {
        "connectorId": connector,
        "recipientId": recipient,
        # Tock's shape: the send API on MongoDB takes only what Tock can decode.
        "response": {"responses": [{"type": "WebMessage", "text": text, "version": "1"}]},
    }
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, object] = json.load(response)
    return f"{answer['id']} (open streams on that instance: {answer['deliveredTo']})"


def main() -> int:
    urls = [u.strip() for u in os.environ["BOT_SEND_URLS"].split(",") if u.strip()]
    token = os.environ.get("BOT_SEND_TOKEN", "")
    recipient = os.environ.get("BOT_RECIPIENT", "demo")
    connector = os.environ.get("BOT_CONNECTOR", "web")
    interval = float(os.environ.get("BOT_INTERVAL_SECONDS", "5"))
    count = int(os.environ.get("BOT_COUNT", "0") or 0)
    sent = 0
    for n, url in zip(itertools.count(1), itertools.cycle(urls)):
        now = datetime.datetime.now().strftime("%H:%M:%S")
        try:
            result = send(url, token, connector, recipient, f"Message {n} at {now} via {url}")
            print(f"sent {result}", flush=True)
            sent += 1
        except (OSError, urllib.error.URLError, ValueError) as exc:
            print(f"send to {url} failed: {exc}", file=sys.stderr, flush=True)
        if count and n >= count:
            break
        time.sleep(interval)
    return 0 if sent else 1


if __name__ == "__main__":
    sys.exit(main())
