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
 * - the last message id is kept in localStorage, so a page reload resumes with
 *   ?lastEventId=... and gets exactly what it has not seen (EventSource itself sends the
 *   Last-Event-ID header when it reconnects on its own);
 * - every message is acknowledged, in batches, to <url>/ack, so the sidecar marks it
 *   DELIVERED and never replays it;
 * - ids already handed to onmessage are dropped, so a message that comes twice (replay
 *   racing live delivery, a reconnect to another instance) is shown once.
 */
(function (global) {
  "use strict";

  var SEEN_LIMIT = 1000;
  // A last id before every id: on a first visit, ask for everything not yet delivered,
  // including what an earlier page may have been written but never acknowledged.
  var NOTHING_SEEN = "000000000000000000000000";

  function SidecarSSE(options) {
    if (!options || !options.url || !options.userId) {
      throw new Error("SidecarSSE needs url and userId");
    }
    this.url = options.url;
    this.userId = String(options.userId);
    this.onmessage = options.onmessage || function () {};
    this.onopen = options.onopen || function () {};
    this.onerror = options.onerror || function () {};
    this.ackDelay = options.ackDelay == null ? 250 : options.ackDelay;
    this.ackBatch = options.ackBatch || 50;
    this.retryDelay = options.retryDelay == null ? 2000 : options.retryDelay;
    this.storageKey = options.storageKey || "sidecar-sse:" + this.url + ":" + this.userId;
    this.withCredentials = !!options.withCredentials;
    this._seen = [];
    this._seenSet = {};
    this._pendingAcks = [];
    this._ackTimer = null;
    this._retryTimer = null;
    this._closed = false;
    this._connect();
  }

  SidecarSSE.prototype.lastEventId = function () {
    try {
      return global.localStorage.getItem(this.storageKey);
    } catch (e) {
      return null;
    }
  };

  SidecarSSE.prototype._remember = function (id) {
    try {
      global.localStorage.setItem(this.storageKey, id);
    } catch (e) {
      /* storage may be full or disabled: resuming then falls back to the server's state */
    }
  };

  SidecarSSE.prototype._streamUrl = function () {
    var url = this.url + (this.url.indexOf("?") < 0 ? "?" : "&") +
      "userId=" + encodeURIComponent(this.userId);
    return url + "&lastEventId=" + encodeURIComponent(this.lastEventId() || NOTHING_SEEN);
  };

  SidecarSSE.prototype._connect = function () {
    var self = this;
    var source = new global.EventSource(this._streamUrl(), {
      withCredentials: this.withCredentials,
    });
    this.source = source;
    source.onopen = function (event) {
      self.onopen(event);
    };
    source.addEventListener("message", function (event) {
      self._receive(event);
    });
    source.onerror = function (event) {
      self.onerror(event);
      // EventSource retries by itself while the connection is merely broken; once it gives up
      // (CLOSED: the server answered with an error or closed for good), start a fresh one, as
      // tock-react-kit does, with the stored last id.
      if (source.readyState === global.EventSource.CLOSED && !self._closed) {
        self._retryTimer = global.setTimeout(function () {
          self._retryTimer = null;
          if (!self._closed) self._connect();
        }, self.retryDelay);
      }
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
    var self = this;
    this._pendingAcks.push(id);
    if (this._pendingAcks.length >= this.ackBatch) {
      this.flushAcks();
    } else if (this._ackTimer === null) {
      this._ackTimer = global.setTimeout(function () {
        self.flushAcks();
      }, this.ackDelay);
    }
  };

  SidecarSSE.prototype.flushAcks = function () {
    if (this._ackTimer !== null) {
      global.clearTimeout(this._ackTimer);
      this._ackTimer = null;
    }
    if (this._pendingAcks.length === 0) return Promise.resolve();
    var ids = this._pendingAcks.splice(0, this._pendingAcks.length);
    var self = this;
    var url = this.url + "/ack?userId=" + encodeURIComponent(this.userId);
    // text/plain keeps this a "simple" cross-origin request: no preflight per batch.
    return global.fetch(url, {
      method: "POST",
      headers: { "Content-Type": "text/plain" },
      body: JSON.stringify({ ids: ids }),
      credentials: this.withCredentials ? "include" : "same-origin",
      keepalive: true,
    }).then(function (response) {
      if (!response.ok && response.status >= 500) self._requeue(ids);
    }, function () {
      self._requeue(ids);
    });
  };

  SidecarSSE.prototype._requeue = function (ids) {
    // A lost ack only means a replay the client will drop; retry once the next batch goes.
    if (!this._closed) this._pendingAcks = ids.concat(this._pendingAcks).slice(-SEEN_LIMIT);
  };

  SidecarSSE.prototype.close = function () {
    this._closed = true;
    if (this._retryTimer !== null) global.clearTimeout(this._retryTimer);
    if (this.source) this.source.close();
    this.flushAcks();
  };

  global.SidecarSSE = SidecarSSE;
})(typeof window !== "undefined" ? window : globalThis);
