"""The browser side in a real headless Chromium (Debian's `chromium`), driven by Playwright:
the demo page and /sidecar-sse.js against a sidecar on loopback, and a page that uses
EventSource directly the way tock-react-kit does.

Playwright's async API runs on asyncio only, and pytest-trio runs these tests on trio:
trio-asyncio opens an asyncio loop inside the test's trio run (`trio_asyncio.open_loop`) and
`aio_as_trio` runs each Playwright coroutine on it, so the browser, the in-process sidecar
and the test's deadlines all live in one trio run. (Playwright's sync API would need one
dedicated thread for every call of a test, since its objects are bound to the thread that
made them, and a trio deadline could not interrupt a call blocked in it.)

Chromium is never downloaded (`playwright install` is not used): `CHROMIUM` points at the
system's. Without it these tests skip, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio
import trio_asyncio
from playwright.async_api import Browser, Page, Route, async_playwright

from sidecar.hub import CloseReason
from sidecar.protocol.message import Message, State, new_id
from sidecar.store.sqlite import SqliteStore
from tests.sidecar_harness import Sidecar, running_sidecar, settings_for, spawn_sidecar

CHROMIUM = os.environ.get("SIDECAR_TEST_CHROMIUM", "/usr/bin/chromium")
# Headless, and quiet: no GPU, no QUIC, and none of the background requests Chromium makes
# to Google's services (this machine has no network beyond loopback). Playwright gives every
# launch a fresh temporary profile (--user-data-dir) of its own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HAVE_CHROMIUM = Path(CHROMIUM).exists()
WAIT_MS = 15_000

T = TypeVar("T")


def aio(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """An asyncio coroutine function (Playwright's) made callable from trio."""
    wrapped: Callable[..., Awaitable[T]] = trio_asyncio.aio_as_trio(fn)
    return wrapped


@asynccontextmanager
async def open_browser() -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM:
        message = f"no Chromium at {CHROMIUM} (.ci/run installs Debian's chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    async with trio_asyncio.open_loop():
        playwright = await aio(async_playwright().start)()
        try:
            browser = await aio(playwright.chromium.launch)(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
            )
            try:
                yield browser
            finally:
                await aio(browser.close)()
        finally:
            await aio(playwright.stop)()


@asynccontextmanager
async def open_page() -> AsyncIterator[Page]:
    async with open_browser() as browser:
        page = await aio(browser.new_page)()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        yield page
        assert not errors, errors


async def shown(page: Page) -> list[str]:
    """Ids of the messages the demo page shows, in order."""
    ids: list[str] = await aio(page.eval_on_selector_all)(
        "#messages li", "items => items.map(item => item.dataset.id)"
    )
    return ids


async def wait_shown(page: Page, count: int) -> list[str]:
    await aio(page.wait_for_function)(
        "n => document.querySelectorAll('#messages li').length >= n", arg=count, timeout=WAIT_MS
    )
    return await shown(page)


async def wait_state(page: Page, state: str) -> None:
    await aio(page.wait_for_selector)(f'#state[data-state="{state}"]', timeout=WAIT_MS)


async def open_demo(page: Page, public: str, user: str) -> None:
    await aio(page.goto)(f"{public}/?userId={user}")
    await wait_state(page, "open")


async def wait_states(get_state: Callable[[str], Awaitable[int | None]], ids: list[str]) -> None:
    """Until every message of `ids` is DELIVERED (acks travel on a timer)."""
    while True:
        states = [await get_state(i) for i in ids]
        if all(s == State.DELIVERED for s in states):
            return
        await trio.sleep(0.05)


def store_state(sidecar: Sidecar) -> Callable[[str], Awaitable[int | None]]:
    async def get(message_id: str) -> int | None:
        message = await sidecar.running.store.get(message_id)
        return None if message is None else int(message.state)

    return get


def sqlite_state(path: Path) -> Callable[[str], Awaitable[int | None]]:
    """A message's state read straight from the SQLite file another process writes."""

    def read(message_id: str) -> int | None:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            row = db.execute("SELECT state FROM messages WHERE id = ?", (message_id,)).fetchone()
        return None if row is None else int(row[0])

    async def get(message_id: str) -> int | None:
        return await trio.to_thread.run_sync(read, message_id)

    return get


async def send_text(client: httpx.AsyncClient, send_url: str, user: str, text: str) -> str:
    body = {"connectorId": "web", "recipientId": user, "response": {"responses": [{"text": text}]}}
    reply = await client.post(f"{send_url}/v1/send", json=body)
    assert reply.status_code == 202, reply.text
    message_id: str = reply.json()["id"]
    return message_id


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_send_api_messages_appear_and_are_acked(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, SIDECAR_DEMO="true")
    async with running_sidecar(settings) as sidecar, open_page() as page:
        await open_demo(page, sidecar.public, "alice")
        assert await aio(page.text_content)("#user") == "alice"
        sent = [await sidecar.send("alice", responses=[{"text": f"hello {n}"}]) for n in range(3)]
        assert await wait_shown(page, 3) == sent
        texts = await aio(page.eval_on_selector_all)(
            "#messages li", "items => items.map(item => item.firstChild.textContent)"
        )
        assert texts == ["hello 0", "hello 1", "hello 2"]
        # The page acked them: the server has them DELIVERED.
        await wait_states(store_state(sidecar), sent)

        # The demo form goes through POST /demo/send and comes back on the stream.
        await aio(page.fill)("#text", "typed in the page")
        await aio(page.click)("#send button")
        (*_, typed) = await wait_shown(page, 4)
        assert await aio(page.text_content)(f'#messages li[data-id="{typed}"]') == (
            "typed in the page" + typed
        )
        await wait_states(store_state(sidecar), [typed])

        # Without ?userId the page makes one up, puts it in the URL and keeps it.
        await aio(page.goto)(f"{sidecar.public}/")
        await wait_state(page, "open")
        generated = await aio(page.text_content)("#user")
        assert generated is not None
        assert generated.startswith("demo-")
        assert page.url == f"{sidecar.public}/?userId={generated}"
        await aio(page.goto)(f"{sidecar.public}/")
        assert await aio(page.text_content)("#user") == generated


@pytest.mark.time_limit(50)
async def test_page_survives_a_sidecar_restart(tmp_path: Path) -> None:
    """The page keeps its stream across a killed and restarted sidecar (same port, same
    SQLite file) and shows what was sent meanwhile, each message once, in order."""
    database = tmp_path / "sidecar.db"
    env = {
        "SIDECAR_PUBLIC_BIND": f"127.0.0.1:{free_port()}",
        "SIDECAR_STORE": f"sqlite:///{database}",
        "SIDECAR_DEMO": "true",
    }
    async with httpx.AsyncClient(timeout=10) as client, open_page() as page:
        async with spawn_sidecar(env) as first:
            await open_demo(page, first.public, "bob")
            before = await send_text(client, first.send_url, "bob", "before the restart")
            assert await wait_shown(page, 1) == [before]
            first.process.kill()
            await first.process.wait()
        await wait_state(page, "reconnecting")

        # Written while no sidecar runs, as a bot sharing the store would.
        while_down = [Message(new_id(), "web", "bob", {"responses": [{"text": "meanwhile"}]})]
        while_down.append(Message(new_id(), "web", "bob", {"responses": [{"text": "and this"}]}))
        store = await SqliteStore.open(str(database))
        try:
            await store.save(while_down)
        finally:
            await store.aclose()

        async with spawn_sidecar(env) as second:
            assert second.public == first.public
            missed = [m.id for m in while_down]
            assert await wait_shown(page, 3) == [before, *missed]
            await wait_state(page, "open")
            after = await send_text(client, second.send_url, "bob", "after the restart")
            assert await wait_shown(page, 4) == [before, *missed, after]
            # Nothing comes twice: a last message arrives right after the others.
            last = await send_text(client, second.send_url, "bob", "last")
            assert await wait_shown(page, 5) == [before, *missed, after, last]
            await wait_states(sqlite_state(database), [before, *missed, after, last])
            second.process.terminate()
            await second.process.wait()


async def test_reload_resumes_from_the_stored_last_id(tmp_path: Path) -> None:
    """With acks blocked, only the page's stored last id keeps a reload from replaying."""

    async def drop(route: Route) -> None:
        await route.abort()

    settings = settings_for(tmp_path, SIDECAR_DEMO="true")
    async with running_sidecar(settings) as sidecar, open_page() as page:
        await aio(page.route)("**/sse/ack*", drop)
        await open_demo(page, sidecar.public, "carol")
        seen = [await sidecar.send("carol"), await sidecar.send("carol")]
        assert await wait_shown(page, 2) == seen
        assert {await store_state(sidecar)(i) for i in seen} == {State.SENT}

        await aio(page.reload)()
        await wait_state(page, "open")
        # The reconnect said "seen up to here": nothing is replayed, and those are DELIVERED.
        await wait_states(store_state(sidecar), seen)
        fresh = await sidecar.send("carol")
        assert await wait_shown(page, 1) == [fresh]

        # Sent while the page is gone: shown when it comes back, and only that.
        await aio(page.goto)("about:blank")
        while_away = await sidecar.send("carol")
        await open_demo(page, sidecar.public, "carol")
        last = await sidecar.send("carol")
        assert await wait_shown(page, 2) == [while_away, last]


COMPAT_PAGE = """<!doctype html>
<meta charset="utf-8">
<script>
// What tock-react-kit's EventSource client does: `${endpoint}/sse?userid=...`, listeners for
// "message" and "ping", and on error: close, then a new EventSource after a delay.
window.log = { sources: 0, opens: 0, pings: 0, messages: [] };
function connect() {
  var source = new EventSource("/io/app/web/sse?userid=dave");
  window.log.sources++;
  source.addEventListener("open", function () { window.log.opens++; });
  source.addEventListener("ping", function () { window.log.pings++; });
  source.addEventListener("message", function (event) {
    window.log.messages.push({ id: event.lastEventId, data: JSON.parse(event.data) });
  });
  source.addEventListener("error", function () {
    source.close();
    setTimeout(connect, 100);
  });
}
connect();
</script>
"""


async def test_plain_eventsource_like_tock_react_kit(tmp_path: Path) -> None:
    async def compat(route: Route) -> None:
        await route.fulfill(body=COMPAT_PAGE, content_type="text/html")

    async def log(page: Page) -> dict[str, Any]:
        value: dict[str, Any] = await aio(page.evaluate)("() => window.log")
        return value

    async def wait_log(page: Page, condition: str) -> dict[str, Any]:
        await aio(page.wait_for_function)(f"() => {condition}", timeout=WAIT_MS)
        return await log(page)

    async with running_sidecar(settings_for(tmp_path)) as sidecar, open_page() as page:
        # Served from the sidecar's origin, as tock-react-kit is from the bot's.
        await aio(page.route)(f"{sidecar.public}/compat.html", compat)
        await aio(page.goto)(f"{sidecar.public}/compat.html")
        await wait_log(page, "window.log.opens === 1 && window.log.pings >= 1")
        first = await sidecar.send("dave", responses=[{"text": "one"}])
        state = await wait_log(page, "window.log.messages.length === 1")
        assert state["messages"] == [{"id": first, "data": {"responses": [{"text": "one"}]}}]

        # The stream ends (as when an instance drains): the page makes a new EventSource,
        # which sends no Last-Event-ID, and gets what was sent in between, once.
        sidecar.running.hub.close_all(CloseReason.SHUTDOWN)
        second = await sidecar.send("dave", responses=[{"text": "two"}])
        await wait_log(page, "window.log.sources >= 2 && window.log.opens >= 2")
        third = await sidecar.send("dave", responses=[{"text": "three"}])
        state = await wait_log(page, "window.log.messages.length >= 3")
        assert [m["id"] for m in state["messages"]] == [first, second, third]
        assert [m["data"]["responses"][0]["text"] for m in state["messages"]] == [
            "one",
            "two",
            "three",
        ]
        assert state["pings"] >= 2
        # Such a page never acks: what it got stays SENT, as with Tock.
        assert {await store_state(sidecar)(i) for i in (first, second, third)} == {State.SENT}
