/*
 * sidecar-sse.js: a small browser client for tock-sse-sidecar.
 *
 *   const stream = new SidecarSSE({
 *     url: "https://bot.example.com/io/app/web/sse",  // the connector's stream URL
 *     userId: "user-42",
 *     onmessage: (response, id) => render(response),  // response: the parsed JSON object
 *   });
 *   stream.close();
 *
 * It wraps EventSource and adds what the sidecar's delivery-ack protocol needs:
 * - the last message id handed to onmessage is this tab's place in the user's log, kept in
 *   sessionStorage (per tab, and it survives a reload), so a page reload resumes with
 *   ?lastEventId=... and gets exactly what this tab has not shown, even when another tab
 *   of the user got and acknowledged it (EventSource itself sends the Last-Event-ID header
 *   when it reconnects on its own). A new tab starts with "seen nothing": everything not
 *   yet acknowledged. A tab that has shown nothing yet is told its place by the sidecar
 *   (a "place" event, never shown), and keeps it the same way, so a message another tab
 *   acknowledged after this tab opened is not lost to it. Without storage a reload counts
 *   as a new tab;
 * - every message is acknowledged, in batches, to <url>/ack, so the sidecar marks it
 *   DELIVERED and never replays it; an ack that fails is retried, backing off;
 * - ids already handed to onmessage are dropped, so a message that comes twice (replay
 *   racing live delivery, a reconnect to another instance) is shown once;
 * - a stream the server ended for good is opened again, backing off (with jitter) from
 *   retryDelay up to maxRetryDelay, from the last id this page has seen.
 * A query string in url (a signed-mode token) is kept on the stream and the ack URLs.
 */
(function (global) {
  "use strict";

  var SEEN_LIMIT = 1000;
  // Ids per ack request: 500 stay under the sidecar's default SIDECAR_MAX_ACK_BYTES (16 KB).
  var MAX_ACK_BATCH = 500;
  // A last id before every id: on a first visit, ask for everything not yet delivered,
  // including what an earlier page may have been written but never acknowledged.
  var NOTHING_SEEN = "000000000000000000000000";

  function SidecarSSE(options) {
    if (!options || !options.url || !options.userId) {
      throw new Error("SidecarSSE needs url and userId");
    }
    this.url = options.url;
    var url = this.url.split("#")[0];
    var query = url.indexOf("?");
    this._path = query < 0 ? url : url.slice(0, query);
    this._query = query < 0 ? "" : url.slice(query + 1);
    this.userId = String(options.userId);
    this._ackUrl = this._withQuery(
      this._path + "/ack",
      "userId=" + encodeURIComponent(this.userId)
    );
    this.onmessage = options.onmessage || function () {};
    this.onopen = options.onopen || function () {};
    this.onerror = options.onerror || function () {};
    this.ackDelay = options.ackDelay == null ? 250 : options.ackDelay;
    this.ackBatch = Math.min(options.ackBatch || 50, MAX_ACK_BATCH);
    this.retryDelay = options.retryDelay == null ? 2000 : options.retryDelay;
    this.maxRetryDelay = options.maxRetryDelay == null ? 30000 : options.maxRetryDelay;
    // Not the query: a token in it changes with every page load.
    this.storageKey = options.storageKey || "sidecar-sse:" + this._path + ":" + this.userId;
    this.withCredentials = !!options.withCredentials;
    this._seen = [];
    this._seenSet = {};
    this._pendingAcks = [];
    this._ackTimer = null;
    this._ackFailures = 0;
    this._retryTimer = null;
    this._retries = 0;
    this._closed = false;
    // Read once, from this tab's own storage: localStorage is shared by the user's tabs,
    // and one tab's place would skip what another never showed.
    this._lastId = null;
    try {
      this._lastId = global.sessionStorage.getItem(this.storageKey);
    } catch (e) {
      /* storage disabled: the first connect asks for everything not yet delivered */
    }
    this._connect();
  }

  SidecarSSE.prototype.lastEventId = function () {
    return this._lastId;
  };

  SidecarSSE.prototype._remember = function (id) {
    this._lastId = id;
    try {
      global.sessionStorage.setItem(this.storageKey, id);
    } catch (e) {
      /* storage may be full or disabled: a reload then counts as a new tab */
    }
  };

  SidecarSSE.prototype._withQuery = function (path, params) {
    return path + "?" + (this._query ? this._query + "&" : "") + params;
  };

  SidecarSSE.prototype._streamUrl = function () {
    return this._withQuery(
      this._path,
      "userId=" + encodeURIComponent(this.userId) +
        "&lastEventId=" + encodeURIComponent(this._lastId || NOTHING_SEEN)
    );
  };

  // base * 2^attempt, at most maxRetryDelay, plus up to half of it at random so that the
  // clients of a restarted instance do not all come back at once.
  SidecarSSE.prototype._backoff = function (base, attempt) {
    var delay = Math.min(base * Math.pow(2, attempt), this.maxRetryDelay);
    return delay + Math.floor(Math.random() * delay / 2);
  };

  SidecarSSE.prototype._connect = function () {
    var self = this;
    var source = new global.EventSource(this._streamUrl(), {
      withCredentials: this.withCredentials,
    });
    this.source = source;
    source.onopen = function (event) {
      self._retries = 0;
      self.onopen(event);
    };
    source.addEventListener("message", function (event) {
      self._receive(event);
    });
    source.addEventListener("place", function (event) {
      // EventSource sends this id back itself when it reconnects; a reload sends it too.
      if (event.lastEventId) self._remember(event.lastEventId);
    });
    source.onerror = function (event) {
      // EventSource retries by itself while the connection is merely broken; once it gives up
      // (CLOSED: the server answered with an error or closed for good), start a fresh one, as
      // tock-react-kit does, with the last id. Scheduled before onerror runs: a handler that
      // throws must not stop the reconnects.
      if (source.readyState === global.EventSource.CLOSED && !self._closed) {
        self._retryTimer = global.setTimeout(function () {
          self._retryTimer = null;
          if (!self._closed) self._connect();
        }, self._backoff(self.retryDelay, self._retries++));
      }
      self.onerror(event);
    };
  };

  SidecarSSE.prototype._receive = function (event) {
    var id = event.lastEventId;
    if (id) {
      if (this._seenSet[id]) {
        this._queueAck(id);
        return;
      }
      this._seenSet[id] = true;
      this._seen.push(id);
      if (this._seen.length > SEEN_LIMIT) delete this._seenSet[this._seen.shift()];
    }
    var response;
    try {
      response = JSON.parse(event.data);
    } catch (e) {
      response = event.data;
    }
    try {
      this.onmessage(response, id, event);
    } finally {
      if (id) {
        this._remember(id);
        this._queueAck(id);
      }
    }
  };

  SidecarSSE.prototype._queueAck = function (id) {
    this._pendingAcks.push(id);
    // A full batch goes at once, unless acks are failing: then it waits for the retry.
    if (this._pendingAcks.length >= this.ackBatch && this._ackFailures === 0) {
      this.flushAcks();
    } else {
      this._scheduleAcks();
    }
  };

  SidecarSSE.prototype._scheduleAcks = function () {
    if (this._ackTimer !== null) return;
    var self = this;
    var wait = this._ackFailures === 0
      ? this.ackDelay
      : this._backoff(Math.max(this.ackDelay, 1), this._ackFailures);
    this._ackTimer = global.setTimeout(function () {
      self.flushAcks();
    }, wait);
  };

  SidecarSSE.prototype.flushAcks = function () {
    if (this._ackTimer !== null) {
      global.clearTimeout(this._ackTimer);
      this._ackTimer = null;
    }
    var posts = [];
    while (this._pendingAcks.length > 0) {
      posts.push(this._postAcks(this._pendingAcks.splice(0, this.ackBatch)));
    }
    return Promise.all(posts).then(function () {});
  };

  SidecarSSE.prototype._postAcks = function (ids) {
    var self = this;
    // text/plain keeps this a "simple" cross-origin request: no preflight per batch.
    return global.fetch(this._ackUrl, {
      method: "POST",
      headers: { "Content-Type": "text/plain" },
      body: JSON.stringify({ ids: ids }),
      credentials: this.withCredentials ? "include" : "same-origin",
      keepalive: true,
    }).then(function (response) {
      if (response.status >= 500) {
        self._ackFailed(ids);
      } else {
        // Answered. A 4xx would be refused again: dropped (its messages are replayed and
        // dropped as repeats here).
        self._ackFailures = 0;
      }
    }, function () {
      self._ackFailed(ids);
    });
  };

  SidecarSSE.prototype._ackFailed = function (ids) {
    // A lost ack only means a replay the client will drop; retry later, backing off.
    if (this._closed) return;
    this._ackFailures += 1;
    this._pendingAcks = ids.concat(this._pendingAcks).slice(-SEEN_LIMIT);
    this._scheduleAcks();
  };

  SidecarSSE.prototype.close = function () {
    this._closed = true;
    if (this._retryTimer !== null) global.clearTimeout(this._retryTimer);
    if (this.source) this.source.close();
    this.flushAcks();
  };

  global.SidecarSSE = SidecarSSE;
})(typeof window !== "undefined" ? window : globalThis);
