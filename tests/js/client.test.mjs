// Unit tests for sidecar/static/sidecar-sse.js, run with Node's built-in runner:
//   node --test tests/js/
// The client is evaluated in a vm context whose globals are fakes (EventSource,
// sessionStorage, fetch); timers are node:test's mock timers. No npm dependencies.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import vm from "node:vm";

const CLIENT_SOURCE = readFileSync(
  new URL("../../sidecar/static/sidecar-sse.js", import.meta.url),
  "utf8",
);
const NOTHING_SEEN = "000000000000000000000000";
const URL_BASE = "https://bot.example.com/io/app/web/sse";

class FakeEventSource {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSED = 2;

  constructor(url, init) {
    this.url = url;
    this.init = init;
    this.readyState = FakeEventSource.CONNECTING;
    this.onopen = null;
    this.onerror = null;
    this.closed = false;
    this.listeners = new Map();
    this.constructor.instances.push(this);
  }

  addEventListener(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, []);
    this.listeners.get(type).push(fn);
  }

  close() {
    this.closed = true;
    this.readyState = FakeEventSource.CLOSED;
  }

  // Test helpers.
  open() {
    this.readyState = FakeEventSource.OPEN;
    if (this.onopen) this.onopen({ type: "open" });
  }

  emit(data, lastEventId, type = "message") {
    const event = { type, data, lastEventId };
    for (const fn of this.listeners.get(type) || []) fn(event);
  }

  fail(readyState = FakeEventSource.CLOSED) {
    this.readyState = readyState;
    if (this.onerror) this.onerror({ type: "error" });
  }
}

class MapStorage {
  constructor() {
    this.map = new Map();
  }
  getItem(key) {
    return this.map.has(key) ? this.map.get(key) : null;
  }
  setItem(key, value) {
    this.map.set(key, String(value));
  }
  removeItem(key) {
    this.map.delete(key);
  }
}

// A fresh "page": its own vm context, EventSource class and fetch log; `storage`, its tab's
// sessionStorage, may be shared between pages to simulate a reload.
// `random` stands in for Math.random (the reconnect jitter): 0 by default, so delays are exact.
function loadPage({ storage = new MapStorage(), fetchImpl, random = 0 } = {}) {
  const EventSource = class extends FakeEventSource {
    static instances = [];
  };
  const fetchCalls = [];
  const pending = new Set();
  const fetch = (url, init = {}) => {
    const call = {
      url,
      method: init.method,
      headers: { ...init.headers },
      body: init.body,
      init,
    };
    fetchCalls.push(call);
    return fetchImpl ? fetchImpl(call) : Promise.resolve({ ok: true, status: 204 });
  };
  const context = vm.createContext({
    EventSource,
    sessionStorage: storage,
    // Shared by every tab of the user: the client must not keep its place there.
    localStorage: {
      getItem() {
        throw new Error("localStorage is not this tab's");
      },
      setItem() {
        throw new Error("localStorage is not this tab's");
      },
    },
    fetch,
    // Looked up at call time, so node:test's mock timers (if enabled) apply. `pending`
    // holds the timers set and neither fired nor cleared yet.
    setTimeout: (fn, ms) => {
      const handle = globalThis.setTimeout(() => {
        pending.delete(handle);
        fn();
      }, ms);
      pending.add(handle);
      return handle;
    },
    clearTimeout: (handle) => {
      pending.delete(handle);
      globalThis.clearTimeout(handle);
    },
  });
  vm.runInContext(`Math.random = () => ${random};`, context);
  vm.runInContext(CLIENT_SOURCE, context, { filename: "sidecar-sse.js" });
  return {
    SidecarSSE: context.SidecarSSE,
    EventSource,
    storage,
    fetchCalls,
    pendingTimers: pending,
    sources: EventSource.instances,
  };
}

// Lets pending promise callbacks (fetch resolution/rejection handlers) run.
const settle = () => new Promise((resolve) => setImmediate(resolve));

// Values from the vm context have that realm's prototypes; compare them as plain JSON.
const plain = (value) => JSON.parse(JSON.stringify(value));

const ackUrl = (userId) => `${URL_BASE}/ack?userId=${encodeURIComponent(userId)}`;

function streamParams(source) {
  return new URL(source.url).searchParams;
}

test("first connect asks for everything, a reload resumes from the stored id", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const storage = new MapStorage();
  const page1 = loadPage({ storage });
  const userId = "user 42/é&x";
  const stream = new page1.SidecarSSE({ url: URL_BASE, userId, onmessage() {} });

  assert.equal(page1.sources.length, 1);
  const first = page1.sources[0];
  assert.ok(first.url.startsWith(URL_BASE + "?"), first.url);
  assert.ok(first.url.includes("userId=" + encodeURIComponent(userId)), first.url);
  assert.ok(first.url.includes("lastEventId=" + NOTHING_SEEN), first.url);
  assert.equal(streamParams(first).get("userId"), userId);
  assert.equal(streamParams(first).get("lastEventId"), NOTHING_SEEN);

  const id = "65a1b2c3d4e5f60718293a4b";
  first.open();
  first.emit(JSON.stringify({ text: "hi" }), id);
  assert.equal(stream.lastEventId(), id);
  stream.close();

  // Page reload: a new context with the same sessionStorage (the tab's).
  const page2 = loadPage({ storage });
  new page2.SidecarSSE({ url: URL_BASE, userId });
  assert.equal(page2.sources.length, 1);
  assert.equal(streamParams(page2.sources[0]).get("lastEventId"), id);
  assert.equal(streamParams(page2.sources[0]).get("userId"), userId);
});

test("a url that already has a query string gets &userId=...", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const page = loadPage();
  new page.SidecarSSE({ url: URL_BASE + "?x=1", userId: "u" });
  const url = page.sources[0].url;
  assert.ok(url.startsWith(URL_BASE + "?x=1&userId=u&lastEventId="), url);
});

test("onmessage gets the parsed object and the id; a duplicate id is shown once but acked", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const page = loadPage();
  const received = [];
  const stream = new page.SidecarSSE({
    url: URL_BASE,
    userId: "u1",
    ackDelay: 100,
    onmessage: (response, id) => received.push({ response: plain(response), id }),
  });
  const source = page.sources[0];
  const message = { text: "hello", buttons: [{ title: "ok" }] };

  source.emit(JSON.stringify(message), "id-1");
  source.emit(JSON.stringify(message), "id-1");
  source.emit("not json", "id-2");

  assert.deepEqual(received, [
    { response: message, id: "id-1" },
    { response: "not json", id: "id-2" },
  ]);

  t.mock.timers.tick(100);
  await settle();
  assert.equal(page.fetchCalls.length, 1);
  assert.deepEqual(JSON.parse(page.fetchCalls[0].body), { ids: ["id-1", "id-1", "id-2"] });
  stream.close();
});

test("acks go in one POST after ackDelay", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const page = loadPage();
  const userId = "user 7+8";
  const stream = new page.SidecarSSE({ url: URL_BASE, userId, ackDelay: 250, ackBatch: 50 });
  const source = page.sources[0];

  source.emit('{"n":1}', "a1");
  source.emit('{"n":2}', "a2");
  t.mock.timers.tick(100);
  source.emit('{"n":3}', "a3");
  t.mock.timers.tick(149);
  await settle();
  assert.equal(page.fetchCalls.length, 0, "no ack before ackDelay");

  t.mock.timers.tick(1);
  await settle();
  assert.equal(page.fetchCalls.length, 1);
  const call = page.fetchCalls[0];
  assert.equal(call.url, ackUrl(userId));
  assert.equal(call.method, "POST");
  assert.equal(call.headers["Content-Type"], "text/plain");
  assert.deepEqual(JSON.parse(call.body), { ids: ["a1", "a2", "a3"] });

  // Nothing pending: later ticks send nothing more.
  t.mock.timers.tick(1000);
  await settle();
  assert.equal(page.fetchCalls.length, 1);
  stream.close();
  await settle();
  assert.equal(page.fetchCalls.length, 1, "close() with nothing pending sends nothing");
});

test("reaching ackBatch flushes immediately", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const page = loadPage();
  const stream = new page.SidecarSSE({ url: URL_BASE, userId: "u", ackDelay: 10000, ackBatch: 3 });
  const source = page.sources[0];

  source.emit("{}", "b1");
  source.emit("{}", "b2");
  assert.equal(page.fetchCalls.length, 0);
  source.emit("{}", "b3");
  assert.equal(page.fetchCalls.length, 1, "flushed without waiting for ackDelay");
  assert.deepEqual(JSON.parse(page.fetchCalls[0].body), { ids: ["b1", "b2", "b3"] });

  // The batch flush cleared the pending timer: nothing is sent when it would have fired.
  t.mock.timers.tick(10000);
  await settle();
  assert.equal(page.fetchCalls.length, 1);
  stream.close();
});

test("a failed ack is retried after a backoff, with what came meanwhile", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  let failNext = true;
  const page = loadPage({
    fetchImpl: () => {
      if (failNext) {
        failNext = false;
        return Promise.reject(new TypeError("network down"));
      }
      return Promise.resolve({ ok: true, status: 204 });
    },
  });
  const stream = new page.SidecarSSE({ url: URL_BASE, userId: "u", ackDelay: 100 });
  const source = page.sources[0];

  source.emit("{}", "c1");
  source.emit("{}", "c2");
  t.mock.timers.tick(100);
  await settle();
  assert.equal(page.fetchCalls.length, 1);
  assert.deepEqual(JSON.parse(page.fetchCalls[0].body), { ids: ["c1", "c2"] });

  // Retried after 2 x ackDelay, with no new message needed to trigger it.
  source.emit("{}", "c3");
  t.mock.timers.tick(199);
  await settle();
  assert.equal(page.fetchCalls.length, 1);
  t.mock.timers.tick(1);
  await settle();
  assert.equal(page.fetchCalls.length, 2);
  assert.deepEqual(JSON.parse(page.fetchCalls[1].body), { ids: ["c1", "c2", "c3"] });

  // The retry succeeded: nothing is sent again.
  t.mock.timers.tick(1000);
  await settle();
  assert.equal(page.fetchCalls.length, 2);
  stream.close();
});

test("a 5xx ack is re-queued, a 4xx one is not", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const statuses = [503, 400, 204];
  const page = loadPage({
    fetchImpl: () => {
      const status = statuses.shift();
      return Promise.resolve({ ok: status < 400, status });
    },
  });
  const stream = new page.SidecarSSE({ url: URL_BASE, userId: "u", ackDelay: 100 });
  const source = page.sources[0];

  source.emit("{}", "d1");
  t.mock.timers.tick(100);
  await settle();
  source.emit("{}", "d2");
  t.mock.timers.tick(200); // the retry, backing off
  await settle();
  source.emit("{}", "d3");
  t.mock.timers.tick(100); // answered (400): back to ackDelay
  await settle();
  assert.deepEqual(
    page.fetchCalls.map((call) => JSON.parse(call.body).ids),
    [["d1"], ["d1", "d2"], ["d3"]],
  );
  stream.close();
});

test("a CLOSED source is replaced after retryDelay, resuming from the stored id", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const page = loadPage();
  const errors = [];
  const stream = new page.SidecarSSE({
    url: URL_BASE,
    userId: "u",
    retryDelay: 1000,
    onerror: (event) => errors.push(event.type),
  });
  const first = page.sources[0];
  first.open();
  first.emit("{}", "e1");

  // A transient error (EventSource still CONNECTING, retrying by itself): no new source.
  first.fail(page.EventSource.CONNECTING);
  t.mock.timers.tick(5000);
  assert.equal(page.sources.length, 1);

  first.fail(page.EventSource.CLOSED);
  assert.deepEqual(errors, ["error", "error"]);
  t.mock.timers.tick(999);
  assert.equal(page.sources.length, 1, "not before retryDelay");
  t.mock.timers.tick(1);
  assert.equal(page.sources.length, 2);
  const second = page.sources[1];
  assert.equal(stream.source, second);
  assert.equal(streamParams(second).get("lastEventId"), "e1");
  assert.equal(streamParams(second).get("userId"), "u");

  // The new source works like the first one.
  second.emit('{"x":1}', "e2");
  assert.equal(stream.lastEventId(), "e2");
  stream.close();
  assert.equal(second.closed, true);
});

test("close() cancels a pending reconnect and closes the source", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const page = loadPage();
  const stream = new page.SidecarSSE({ url: URL_BASE, userId: "u", retryDelay: 1000 });
  const first = page.sources[0];

  first.fail(page.EventSource.CLOSED);
  t.mock.timers.tick(500);
  assert.equal(page.pendingTimers.size, 1, "a reconnect is scheduled");
  stream.close();
  assert.equal(first.closed, true);
  assert.equal(page.pendingTimers.size, 0, "close() cleared the reconnect timer");
  t.mock.timers.tick(10000);
  assert.equal(page.sources.length, 1, "no reconnect after close()");

  // An error after close() does not schedule one either.
  first.fail(page.EventSource.CLOSED);
  t.mock.timers.tick(10000);
  assert.equal(page.sources.length, 1);
});

test("close() flushes pending acks", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const page = loadPage();
  const stream = new page.SidecarSSE({ url: URL_BASE, userId: "u", ackDelay: 10000 });
  page.sources[0].emit("{}", "f1");
  stream.close();
  await settle();
  assert.equal(page.fetchCalls.length, 1);
  assert.deepEqual(JSON.parse(page.fetchCalls[0].body), { ids: ["f1"] });
  assert.equal(page.sources[0].closed, true);
});

test("the constructor needs url and userId", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const page = loadPage();
  assert.throws(() => new page.SidecarSSE(), /url and userId/);
  assert.throws(() => new page.SidecarSSE({}), /url and userId/);
  assert.throws(() => new page.SidecarSSE({ userId: "u" }), /url and userId/);
  assert.throws(() => new page.SidecarSSE({ url: URL_BASE }), /url and userId/);
  assert.throws(() => new page.SidecarSSE({ url: URL_BASE, userId: "" }), /url and userId/);
  assert.equal(page.sources.length, 0, "no EventSource opened");
});


test("a query string in url stays on the ack URL and out of the storage key", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  // Signed mode: the token travels in the query string and changes with every page load.
  const storage = new MapStorage();
  const page = loadPage({ storage });
  const stream = new page.SidecarSSE({ url: URL_BASE + "?token=T1", userId: "alice", ackDelay: 10 });
  page.sources[0].emit("{}", "65a1b2c3d4e5f60718293a4b");
  t.mock.timers.tick(10);
  await settle();
  const ack = new URL(page.fetchCalls[0].url);
  assert.equal(ack.origin + ack.pathname, URL_BASE + "/ack");
  assert.equal(ack.searchParams.get("token"), "T1");
  assert.equal(ack.searchParams.get("userId"), "alice");
  stream.close();

  const reload = loadPage({ storage });
  new reload.SidecarSSE({ url: URL_BASE + "?token=T2", userId: "alice" });
  const params = streamParams(reload.sources[0]);
  assert.equal(params.get("token"), "T2");
  assert.equal(params.get("lastEventId"), "65a1b2c3d4e5f60718293a4b");
  assert.deepEqual([...storage.map.keys()], [`sidecar-sse:${URL_BASE}:alice`]);
});

test("reconnects back off from retryDelay to maxRetryDelay, and start over once open", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const page = loadPage();
  const stream = new page.SidecarSSE({
    url: URL_BASE,
    userId: "u",
    retryDelay: 1000,
    maxRetryDelay: 8000,
  });
  const waits = [];
  for (let n = 0; n < 6; n++) {
    page.sources.at(-1).fail();
    let waited = 0;
    const count = page.sources.length;
    while (page.sources.length === count) {
      t.mock.timers.tick(100);
      waited += 100;
    }
    waits.push(waited);
  }
  assert.deepEqual(waits, [1000, 2000, 4000, 8000, 8000, 8000]);
  page.sources.at(-1).open();
  page.sources.at(-1).fail();
  t.mock.timers.tick(1000);
  assert.equal(page.sources.length, 8, "an open stream resets the backoff");
  stream.close();
});

test("the reconnect delay has up to half of it added at random", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const page = loadPage({ random: 0.999 });
  const stream = new page.SidecarSSE({ url: URL_BASE, userId: "u", retryDelay: 1000 });
  page.sources[0].fail();
  t.mock.timers.tick(1498);
  assert.equal(page.sources.length, 1);
  t.mock.timers.tick(1);
  assert.equal(page.sources.length, 2);
  stream.close();
});

test("an onerror that throws does not stop the reconnects", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const page = loadPage();
  const stream = new page.SidecarSSE({
    url: URL_BASE,
    userId: "u",
    retryDelay: 1000,
    onerror() {
      throw new Error("the page's handler broke");
    },
  });
  assert.throws(() => page.sources[0].fail(), /handler broke/);
  t.mock.timers.tick(1000);
  assert.equal(page.sources.length, 2);
  stream.close();
});

test("a reconnect resumes from this page's last id, not another tab's", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  // Even were both tabs to share one storage (they do not: it is per tab).
  const storage = new MapStorage();
  const tabA = loadPage({ storage });
  const tabB = loadPage({ storage });
  const a = new tabA.SidecarSSE({ url: URL_BASE, userId: "u", retryDelay: 1000 });
  const b = new tabB.SidecarSSE({ url: URL_BASE, userId: "u", retryDelay: 1000 });
  tabA.sources[0].emit("{}", "65a1b2c3d4e5f6071829300a");
  tabB.sources[0].emit("{}", "65a1b2c3d4e5f6071829300a");
  // B's stream is down while A gets two more; B must still ask for them.
  tabB.sources[0].fail();
  tabA.sources[0].emit("{}", "65a1b2c3d4e5f6071829300b");
  tabA.sources[0].emit("{}", "65a1b2c3d4e5f6071829300c");
  t.mock.timers.tick(1000);
  assert.equal(streamParams(tabB.sources[1]).get("lastEventId"), "65a1b2c3d4e5f6071829300a");
  assert.equal(b.lastEventId(), "65a1b2c3d4e5f6071829300a");
  assert.equal(a.lastEventId(), "65a1b2c3d4e5f6071829300c");
  a.close();
  b.close();
});

test("without storage a reconnect still resumes from the last id seen", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const broken = {
    getItem() {
      throw new Error("SecurityError");
    },
    setItem() {
      throw new Error("QuotaExceededError");
    },
  };
  const page = loadPage({ storage: broken });
  const stream = new page.SidecarSSE({ url: URL_BASE, userId: "u", retryDelay: 1000 });
  assert.equal(streamParams(page.sources[0]).get("lastEventId"), NOTHING_SEEN);
  page.sources[0].emit("{}", "65a1b2c3d4e5f6071829300a");
  page.sources[0].fail();
  t.mock.timers.tick(1000);
  assert.equal(streamParams(page.sources[1]).get("lastEventId"), "65a1b2c3d4e5f6071829300a");
  stream.close();
});

test("acks during an outage neither flood the server nor outgrow its size limit", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  let down = true;
  const page = loadPage({
    fetchImpl: (call) => {
      if (down) return Promise.reject(new TypeError("network down"));
      // The sidecar's default SIDECAR_MAX_ACK_BYTES.
      const status = call.body.length > 16384 ? 413 : 204;
      return Promise.resolve({ ok: status < 400, status });
    },
  });
  const stream = new page.SidecarSSE({ url: URL_BASE, userId: "u", ackDelay: 100, ackBatch: 5000 });
  const id = (n) => n.toString(16).padStart(24, "0");
  for (let n = 1; n <= 700; n++) {
    page.sources[0].emit("{}", id(n));
    if (n % 10 === 0) {
      t.mock.timers.tick(100);
      await settle();
    }
  }
  assert.ok(page.fetchCalls.length < 20, `${page.fetchCalls.length} ack requests while down`);
  down = false;
  t.mock.timers.tick(30000);
  await settle();
  const answered = page.fetchCalls.filter((call) => call.body.length <= 16384).slice(-2);
  const acked = answered.flatMap((call) => JSON.parse(call.body).ids);
  // The newest 1000 at most are kept for a retry: here all 700.
  assert.equal(new Set(acked).size, 700);
  assert.ok(page.fetchCalls.every((call) => call.body.length <= 16384));
  stream.close();
});

test("each tab reloads from its own place; a new tab starts from seen nothing", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const storageA = new MapStorage();
  const storageB = new MapStorage();
  const a = new (loadPage({ storage: storageA }).SidecarSSE)({ url: URL_BASE, userId: "u" });
  const tabB = loadPage({ storage: storageB });
  const b = new tabB.SidecarSSE({ url: URL_BASE, userId: "u" });
  tabB.sources[0].emit("{}", "65a1b2c3d4e5f6071829300a");
  tabB.sources[0].emit("{}", "65a1b2c3d4e5f6071829300b");
  a.close();
  b.close();
  const reloadedA = loadPage({ storage: storageA });
  new reloadedA.SidecarSSE({ url: URL_BASE, userId: "u" });
  assert.equal(streamParams(reloadedA.sources[0]).get("lastEventId"), NOTHING_SEEN);
  const reloadedB = loadPage({ storage: storageB });
  new reloadedB.SidecarSSE({ url: URL_BASE, userId: "u" });
  assert.equal(streamParams(reloadedB.sources[0]).get("lastEventId"), "65a1b2c3d4e5f6071829300b");
  const newTab = loadPage();
  new newTab.SidecarSSE({ url: URL_BASE, userId: "u" });
  assert.equal(streamParams(newTab.sources[0]).get("lastEventId"), NOTHING_SEEN);
});

test("a place event is kept as the tab's place, never shown nor acked", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const storage = new MapStorage();
  const page = loadPage({ storage });
  const shown = [];
  const stream = new page.SidecarSSE({
    url: URL_BASE,
    userId: "u",
    onmessage: (response, id) => shown.push(id),
  });
  const place = "000000010000000100000002";
  page.sources[0].emit("", place, "place");
  assert.equal(stream.lastEventId(), place);
  t.mock.timers.tick(1000);
  await settle();
  assert.deepEqual(shown, []);
  assert.equal(page.fetchCalls.length, 0);
  // A reload, and a fresh source after a CLOSED one, resume from it.
  const reloaded = loadPage({ storage });
  new reloaded.SidecarSSE({ url: URL_BASE, userId: "u" });
  assert.equal(streamParams(reloaded.sources[0]).get("lastEventId"), place);
  page.sources[0].fail();
  t.mock.timers.tick(2000);
  assert.equal(streamParams(page.sources[1]).get("lastEventId"), place);
  // A message after it is this tab's place from then on.
  page.sources[1].emit("{}", "65a1b2c3d4e5f6071829300a");
  assert.equal(storage.getItem("sidecar-sse:" + URL_BASE + ":u"), "65a1b2c3d4e5f6071829300a");
  stream.close();
});
