"""The embedded store: one SQLite file, stdlib only.

One connection serves the whole instance, and the trio loop never waits on SQLite: calls
run in batches, one batch at a time, each in one trio worker thread. A call made while no
batch runs starts one; calls made while one runs queue, and the next batch runs every call
queued by then, in the order they were made (under load, one worker-thread hop serves many
calls: the hop, not the statement, is what a call costs here). WAL mode with
synchronous=FULL makes a committed save survive a crash of the process or the machine.

While the feed runs it also checkpoints the WAL every `CHECKPOINT_INTERVAL`, on a second
connection and outside the batches (a PASSIVE checkpoint does not block writers), so no
save waits behind a checkpoint.

Consecutive saves in a batch are committed together (group commit): one transaction and
one fsync for all their rows; each save returns once the transaction holding its rows has
committed, or raises if it failed (each save is still all or none, and a return still
means durably committed). Any other call fails alone.

Retention follows Tock's settings: at most `max_count` messages (the oldest go first, as in
Tock's capped collection; a trigger of this connection deletes them inside the insert) and,
when set, none older than `ttl_days`. A save of one message is one statement (in
autocommit mode a statement is its own durable transaction).

Each user's log (docs/delivery.md) is numbered in the insert itself (`user_seq`, in the
epoch `log_epoch` of the user's newest row, or 1 in a new epoch): SQLite commits one writer
at a time, so the numbers follow the commit order, whichever process commits.

The feed yields every message committed from its start, in commit order: this store's own
at once, kept from their commit (reading them back would cost a JSON parse each), and the
rows other processes sharing the file commit, polled for every `FEED_INTERVAL` and read
at once where they fall between this store's own. Own commits' sequence numbers are
recorded in the commit's own batch and read in the feed's (batches run one at a time), so
the feed never mistakes a row of this store's for another writer's.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from functools import partial
from typing import Any, TypeVar, cast

import trio

from sidecar.protocol.delivery import Position, Replay
from sidecar.protocol.feed import FeedItem
from sidecar.protocol.message import Message, State
from sidecar.store.base import StoreUnavailable

T = TypeVar("T")

log = logging.getLogger("sidecar.store.sqlite")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    connector_id TEXT NOT NULL,
    recipient_id TEXT NOT NULL,
    response TEXT NOT NULL,
    state INTEGER NOT NULL DEFAULT 0,
    enqueued_at REAL NOT NULL,
    log_epoch INTEGER,
    user_seq INTEGER
);
CREATE INDEX IF NOT EXISTS messages_enqueued_at ON messages (enqueued_at);
"""
# The user's log (docs/delivery.md): a file of an earlier version gets the columns, and its
# rows their seqs in the order they were committed, epoch 1.
_LOG_COLUMNS = ("log_epoch", "user_seq")
_LOG_SCHEMA = """
UPDATE messages SET log_epoch = 1, user_seq = numbered.n FROM (
    SELECT seq AS s,
        ROW_NUMBER() OVER (PARTITION BY connector_id, recipient_id ORDER BY seq) AS n
    FROM messages WHERE user_seq IS NULL
) AS numbered WHERE messages.seq = numbered.s;
CREATE UNIQUE INDEX IF NOT EXISTS messages_log ON messages (connector_id, recipient_id, user_seq);
DROP INDEX IF EXISTS messages_recipient;
"""

_COLUMNS = "id, connector_id, recipient_id, response, state, enqueued_at, log_epoch, user_seq"
# One statement: the message takes the next seq of its user's log, in that log's epoch (the
# newest row's), or seq 1 in a new epoch (?7) when the user has none; an id stored already
# inserts nothing and returns no row.
_LATEST = (
    "FROM messages WHERE connector_id = ?2 AND recipient_id = ?3 ORDER BY user_seq DESC LIMIT 1"
)
_INSERT = (
    f"INSERT OR IGNORE INTO messages ({_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6,"
    f" COALESCE((SELECT log_epoch {_LATEST}), ?7), COALESCE((SELECT user_seq {_LATEST}) + 1, 1))"
    " RETURNING seq, log_epoch, user_seq"
)
# How often the feed looks for rows written by other processes, and how many it takes.
FEED_INTERVAL = 0.25
FEED_BATCH = 500
# TTL pruning is a range delete on an index; once a minute is plenty.
TTL_PRUNE_INTERVAL = 60.0
# While the feed runs, the WAL is checkpointed this often on a connection of its own,
# instead of by whichever commit crosses SQLite's threshold (a save then waited for it).
CHECKPOINT_INTERVAL = 1.0
# SQLite's default wal_autocheckpoint, restored when the feed stops.
AUTOCHECKPOINT_PAGES = 1000


async def _checkpoints(connection: sqlite3.Connection) -> None:
    """Checkpoint the WAL every `CHECKPOINT_INTERVAL`, until cancelled."""
    while True:
        await trio.sleep(CHECKPOINT_INTERVAL)
        await _checkpoint(connection)


async def _checkpoint(connection: sqlite3.Connection) -> None:
    def checkpoint() -> None:
        try:
            connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:  # busy or failing: the next one catches up
            log.debug("WAL checkpoint failed: %s", exc)

    await trio.to_thread.run_sync(checkpoint)


def _values(m: Message) -> tuple[Any, ...]:
    """`_INSERT`'s parameters for a new message."""
    return (
        m.id,
        m.connector_id,
        m.recipient_id,
        json.dumps(m.response, separators=(",", ":"), ensure_ascii=False),
        int(m.state),
        m.enqueued_at.timestamp(),
        secrets.randbits(31) + 1,  # the epoch of a new log
    )


def _row(row: tuple[Any, ...]) -> Message:
    message_id, connector_id, recipient_id, response, state, enqueued_at, epoch, seq = row
    return Message(
        id=message_id,
        connector_id=connector_id,
        recipient_id=recipient_id,
        response=json.loads(response),
        state=State(state),
        enqueued_at=datetime.datetime.fromtimestamp(enqueued_at, datetime.UTC),
        epoch=epoch,
        seq=seq,
    )


@dataclasses.dataclass(eq=False, slots=True)
class _Call:
    """One store call queued for the next batch: a function to run in the worker thread,
    or a save's rows (`fn` is None)."""

    fn: Callable[[], Any] | None
    messages: Sequence[Message] = ()
    wake: trio.Event = dataclasses.field(default_factory=trio.Event)
    taken: bool = False  # in a batch (running or done): its caller waits for the outcome
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class SqliteStore:
    def __init__(self, connection: sqlite3.Connection, ttl_days: float | None):
        self._db = connection
        self._ttl_seconds = ttl_days * 86400 if ttl_days else None
        self._next_ttl_prune = 0.0
        self._queued: list[_Call] = []  # for the next batch, in call order
        self._running = False  # a batch is running; the next one waits for it
        # While the feed runs: the seq ranges (first, last) this store committed and the
        # feed has not passed yet, in order, adjacent ones merged. Only touched in batches.
        self._feeding = False
        self._own: list[tuple[int, int]] = []
        # While the feed runs: the messages this store committed, by seq, for the feed to
        # yield in order (with the other writers' rows it reads), and the event that wakes it.
        self._fresh: dict[int, Message] = {}
        self._committing = trio.Event()

    @classmethod
    async def open(
        cls, path: str, *, max_count: int = 50000, ttl_days: float | None = None
    ) -> SqliteStore:
        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.executescript(_SCHEMA)
                have = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
                for column in _LOG_COLUMNS:
                    if column not in have:
                        db.execute(f"ALTER TABLE messages ADD COLUMN {column} INTEGER")
                db.executescript(_LOG_SCHEMA)
                # Keep the newest max_count rows: seq only grows, so this is an index range.
                # TEMP: this connection's own, with this run's setting.
                db.execute(
                    "CREATE TEMP TRIGGER IF NOT EXISTS keep_newest AFTER INSERT ON messages"
                    f" BEGIN DELETE FROM messages WHERE seq <= NEW.seq - {int(max_count)}; END"
                )
            except BaseException:
                db.close()
                raise
            return db

        try:
            connection = await trio.to_thread.run_sync(connect)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite store {path!r}: {exc}") from exc
        return cls(connection, ttl_days)

    async def _run(self, fn: Callable[[], T]) -> T:
        call = await self._call(_Call(fn))
        return cast(T, call.result)

    async def save(self, messages: Sequence[Message]) -> list[str]:
        call = await self._call(_Call(None, messages))
        return cast(list[str], call.result)

    async def _call(self, call: _Call) -> _Call:
        """Queue `call`; run its batch (or wait for the batch that ran it); raise its error."""
        self._queued.append(call)
        if self._running:
            try:
                # Woken when a batch holding this call is done, or to run the next one.
                await call.wake.wait()
            except BaseException as exc:
                if not call.taken:  # still queued: leave, nothing of it has run
                    self._queued.remove(call)
                    if call.wake.is_set():  # it was to run the next batch: hand that on
                        self._hand_on()
                    raise
                if not isinstance(exc, trio.Cancelled):
                    raise
                # Its batch is running and will commit it: the caller gets the outcome, as
                # a save that runs its own (shielded) batch does. A save must not look
                # failed once it is stored. The cancellation comes at the next checkpoint.
                with trio.CancelScope(shield=True):
                    await call.wake.wait()
        if not call.done:
            await self._run_queued()
        if call.error is not None:
            raise call.error
        return call

    async def _run_queued(self) -> None:
        """Run every queued call in one batch, wake their callers, then hand the next batch
        to the first call queued meanwhile. Shielded: a cancelled caller must neither leave
        the others' calls unrun nor leave the queue with nobody to run it."""
        self._running = True
        with trio.CancelScope(shield=True):
            batch, self._queued = self._queued, []
            for call in batch:
                call.taken = True
            try:
                await trio.to_thread.run_sync(self._execute, batch)
                if self._fresh:
                    self._committing.set()
            finally:
                for call in batch:
                    if not call.done:  # the batch broke off before it (no worker thread)
                        call.error = StoreUnavailable("SQLite: the call did not run")
                        call.done = True
                    call.wake.set()
                self._hand_on()

    def _hand_on(self) -> None:
        """The running batch is over: the first call queued runs the next one."""
        if self._queued:
            self._queued[0].wake.set()
        else:
            self._running = False

    def _execute(self, batch: list[_Call]) -> None:
        """A batch, in the worker thread: each call in order, each run of consecutive saves
        as one transaction. A failure is the failing call's (or its transaction's) alone."""
        first = 0
        while first < len(batch):
            call, end = batch[first], first + 1
            fn = call.fn
            if fn is None:
                while end < len(batch) and batch[end].fn is None:
                    end += 1
                fn = partial(self._insert, batch[first:end])
            try:
                result = self._guarded(fn)
            except Exception as exc:
                for c in batch[first:end]:
                    c.error = exc
            else:
                if call.fn is not None:  # saves have their results set by `_insert`
                    call.result = result
            for c in batch[first:end]:
                c.done = True
            first = end

    def _guarded(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except sqlite3.Error as exc:
            with suppress(sqlite3.Error):  # the connection itself may be what failed
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            raise StoreUnavailable(f"SQLite: {exc}") from exc

    def _insert(self, saves: list[_Call]) -> None:
        """Insert the messages of `saves` in one transaction, each at the next seq of its
        user's log; each save's result is the ids of its messages stored already."""
        db = self._db
        now = time.time()
        prune = self._ttl_seconds is not None and now >= self._next_ttl_prune
        logged: list[tuple[int, Message]] = []
        single = len(saves) == 1 and len(saves[0].messages) == 1 and not prune
        if not single:
            db.execute("BEGIN IMMEDIATE")
        for save in saves:
            stored = []
            for m in save.messages:
                # In autocommit mode one statement is a whole (durable) transaction.
                row = db.execute(_INSERT, _values(m)).fetchone()
                if row is None:
                    stored.append(m.id)
                else:
                    seq, epoch, user_seq = row
                    logged.append((seq, dataclasses.replace(m, epoch=epoch, seq=user_seq)))
            save.result = stored
        if not single:
            if self._ttl_seconds is not None and prune:
                db.execute("DELETE FROM messages WHERE enqueued_at < ?", (now - self._ttl_seconds,))
                self._next_ttl_prune = now + TTL_PRUNE_INTERVAL
            db.execute("COMMIT")
        if logged and self._feeding:
            # The transaction held the file's write lock: its rows' seqs are consecutive.
            self._committed(logged[0][0], logged[-1][0])
            self._fresh.update(logged)

    def _committed(self, first: int, last: int) -> None:
        if not self._feeding or first > last:
            return
        own = self._own
        if own and own[-1][1] + 1 >= first:
            own[-1] = (own[-1][0], max(own[-1][1], last))
        else:
            own.append((first, last))

    def _past_own(self, seq: int) -> int:
        """Where the feed goes on from, having read up to `seq`: past the ranges of this
        store's own commits that start right after it (those it has passed are dropped)."""
        own = self._own
        while own and own[0][0] <= seq + 1:
            seq = max(seq, own.pop(0)[1])
        return seq

    async def head(self, connector_id: str, recipient_id: str) -> Position | None:
        sql = (
            "SELECT log_epoch, user_seq FROM messages WHERE connector_id = ? AND recipient_id = ?"
            " ORDER BY user_seq DESC LIMIT 1"
        )
        row = await self._run(
            lambda: self._db.execute(sql, (connector_id, recipient_id)).fetchone()
        )
        return None if row is None else Position(*row)

    async def position_of(
        self, connector_id: str, recipient_id: str, message_id: str
    ) -> Position | None:
        sql = (
            "SELECT log_epoch, user_seq FROM messages"
            " WHERE id = ? AND connector_id = ? AND recipient_id = ?"
        )
        params = (message_id, connector_id, recipient_id)
        row = await self._run(lambda: self._db.execute(sql, params).fetchone())
        return None if row is None else Position(*row)

    async def logged(
        self,
        connector_id: str,
        recipient_id: str,
        after: Position,
        *,
        through: int,
        limit: int,
        replay: Replay | None = None,
    ) -> list[Message]:
        where = ""
        params: list[Any] = [connector_id, recipient_id, after.epoch, after.seq, through]
        if replay is not None:
            states = [int(s) for s in replay.states]
            where = f" AND state IN ({','.join('?' * len(states))})"
            params += states
        sql = (
            f"SELECT {_COLUMNS} FROM messages WHERE connector_id = ? AND recipient_id = ?"
            f" AND log_epoch = ? AND user_seq > ? AND user_seq <= ?{where}"
            " ORDER BY user_seq LIMIT ?"
        )
        params.append(limit)
        rows = await self._run(lambda: self._db.execute(sql, params).fetchall())
        return [_row(row) for row in rows]

    async def acknowledge_through(
        self, connector_id: str, recipient_id: str, position: Position
    ) -> int:
        return await self._update(
            "UPDATE messages SET state = 2 WHERE connector_id = ? AND recipient_id = ?"
            " AND log_epoch = ? AND user_seq <= ? AND state < 2",
            [connector_id, recipient_id, position.epoch, position.seq],
        )

    async def _update(self, sql: str, params: Sequence[Any]) -> int:
        return await self._run(lambda: self._db.execute(sql, params).rowcount)

    async def mark_sent(self, ids: Sequence[str]) -> int:
        """Not synced to disk on its own (synchronous=NORMAL for this one statement): the
        next save's commit syncs it along. A crash may lose the newest SENT marks; those
        messages are then replayed once more, which SENT allows (the client drops repeats
        by id). One fsync less on the path every save waits behind."""
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        sql = f"UPDATE messages SET state = 1 WHERE state = 0 AND id IN ({marks})"
        params = list(ids)

        def mark() -> int:
            db = self._db
            db.execute("PRAGMA synchronous=NORMAL")
            try:
                return int(db.execute(sql, params).rowcount)
            finally:
                db.execute("PRAGMA synchronous=FULL")

        return await self._run(mark)

    async def ack(self, connector_id: str, recipient_id: str, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        return await self._update(
            "UPDATE messages SET state = 2 WHERE connector_id = ? AND recipient_id = ?"
            f" AND state < 2 AND id IN ({marks})",
            [connector_id, recipient_id, *ids],
        )

    async def get(self, message_id: str) -> Message | None:
        sql = f"SELECT {_COLUMNS} FROM messages WHERE id = ?"
        row = await self._run(lambda: self._db.execute(sql, (message_id,)).fetchone())
        return None if row is None else _row(row)

    async def ping(self) -> dict[str, Any]:
        await self._run(lambda: self._db.execute("SELECT 1").fetchone())
        return {"kind": "sqlite"}

    async def run_feed(
        self,
        send: trio.MemorySendChannel[FeedItem],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        def newest() -> int:
            row = self._db.execute("SELECT MAX(seq) FROM messages").fetchone()
            return int(row[0] or 0)

        def since(seq: int, poll: bool) -> tuple[int, list[Message]]:
            """The messages committed after `seq`, in commit order: this store's own, kept
            since their commit, and up to FEED_BATCH rows of other writers, read gap by gap
            between its own ranges (every row numbered below one of its commits is final),
            and past the last one too when `poll`; and where the feed goes on from."""
            rows: list[tuple[Any, ...]] = []
            while len(rows) < FEED_BATCH:
                seq = self._past_own(seq)
                if not self._own and not poll:
                    break
                below = self._own[0][0] if self._own else 2**63 - 1
                found = self._db.execute(
                    f"SELECT seq, {_COLUMNS} FROM messages WHERE seq > ? AND seq < ?"
                    " ORDER BY seq LIMIT ?",
                    (seq, below, FEED_BATCH - len(rows)),
                ).fetchall()
                rows += found
                if found:
                    seq = found[-1][0]
                if len(rows) == FEED_BATCH or not self._own:
                    break
                seq = below - 1  # this gap is read to its end: on past the own range
            fresh = self._fresh
            items = [(row[0], _row(row[1:])) for row in rows]
            items += [(n, fresh.pop(n)) for n in sorted(fresh) if n <= seq]
            items.sort(key=lambda item: item[0])
            return seq, [message for _, message in items]

        def start() -> int:
            self._own.clear()
            self._fresh.clear()
            self._feeding = True
            return newest()

        last = await self._run(start)
        checkpointer = await self._open_checkpointer()
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                if checkpointer is not None:
                    # A task of its own: a checkpoint can take a few hundred ms, which the
                    # feed, that carries this store's own commits too, must not wait for.
                    nursery.start_soon(_checkpoints, checkpointer)
                await self._tail(since, last, send)
        finally:
            self._feeding = False
            if checkpointer is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(checkpointer.close)
                    with suppress(StoreUnavailable):
                        await self._run(
                            lambda: self._db.execute(
                                f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}"
                            )
                        )

    async def _tail(
        self,
        since: Callable[[int, bool], tuple[int, list[Message]]],
        last: int,
        send: trio.MemorySendChannel[FeedItem],
    ) -> None:
        """The feed's loop: what `since` reads after `last`, sent on, until cancelled."""
        next_poll = trio.current_time()
        while True:
            # Before reading: a commit from now on sets the new event.
            self._committing = trio.Event()
            poll = trio.current_time() >= next_poll
            if poll:
                next_poll = trio.current_time() + FEED_INTERVAL
            try:
                last, messages = await self._run(partial(since, last, poll))
            except StoreUnavailable:
                # Rows are read by sequence number, so whatever is written while the
                # file cannot be read is picked up once it can.
                messages = []
            for message in messages:
                await send.send(message)
            if len(messages) < FEED_BATCH:
                with trio.move_on_at(next_poll):
                    await self._committing.wait()

    async def _open_checkpointer(self) -> sqlite3.Connection | None:
        """A second connection to checkpoint with, after turning off the automatic
        checkpoints of the first; None (automatic checkpoints stay) if that fails."""

        def connect() -> sqlite3.Connection | None:
            row = self._db.execute("PRAGMA database_list").fetchone()
            path = row[2] if row is not None else ""
            if not path:  # an in-memory database has no WAL to checkpoint
                return None
            other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            try:
                # Opens its WAL file descriptor now, not at the first checkpoint.
                other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                self._db.execute("PRAGMA wal_autocheckpoint=0")
            except BaseException:
                other.close()
                raise
            return other

        try:
            return await self._run(connect)
        except StoreUnavailable as exc:
            log.warning("WAL checkpoints stay automatic: %s", exc)
            return None

    @property
    def feed_resumes(self) -> int:
        """Always 0: the feed polls the database and has no stream to reopen."""
        return 0

    async def aclose(self) -> None:
        await self._run(self._db.close)
