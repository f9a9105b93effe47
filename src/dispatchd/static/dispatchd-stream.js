/**
 * dispatchd-stream.js: a browser client for dispatchd's event stream, GET /v1/stream (Server-Sent
 * Events, WHATWG HTML §9.2) over EventSource. No build step, no dependency:
 * <script src="/static/dispatchd-stream.js"></script> defines dispatchdStream(options).
 *
 * An EventSource cannot send headers, so each connection authenticates with ?token=: getToken() is
 * called before every (re)connection and must resolve to a fresh token from POST /v1/stream-tokens
 * (a token is good for 60 s to connect). On an error the EventSource is closed (no browser
 * auto-reconnect) and a new one opened after a backoff: for the n-th failure in a row
 * d = min(maxMs, initialMs * 2^(n-1)), waited in [d/2, d] (jitter); it resumes with ?after=<id of the
 * last event received>, so that no event is missed or repeated.
 *
 * options: url         server base URL ("" = same origin; a trailing /v1/stream is allowed)
 *          topics      ["booking:bkg_1", ...]; none with a staff token = every topic
 *          getToken    async () => token string; an error with .status 401/403 stops the stream
 *          after       start after this event id (exclusive); default: only new events
 *          types       event types on("*") also gets (an EventSource hears only the types it names)
 *          initialMs   first backoff, default 1000; maxMs: its cap, default 30000
 *          onStatus    (status, attempt, detail): status "connecting" | "open" | "error" (a
 *                      reconnection follows in detail.delayMs) | "closed" (for good); attempt: the
 *                      connection's number, 1 for the first
 * returns  {on(type, handler), close(), lastEventId}; handler(event) gets the parsed
 *          {id, topic, type, data, created_at}; on("*", h) gets every event of a type named by on()
 *          or options.types.
 * The server's final "event: close" frame ({reason, code}: a slow consumer, a revoked key, a
 * shutdown) is followed by a reconnection after backoff, unless the reason is "revoked" or
 * "forbidden" (code KEY_REVOKED / FORBIDDEN): then the status is "closed".
 *
 * Example:
 *   var s = dispatchdStream({
 *     topics: ["booking:bkg_123"],
 *     getToken: async () => (await (await fetch("/my-app/stream-token", {method: "POST"})).json()).token,
 *     onStatus: (status, attempt, detail) => console.log(status, attempt, detail),
 *   });
 *   s.on("BookingAssigned", (e) => showDriver(e.data.driver_id)).on("*", (e) => console.log(e.id, e.type));
 *   // later: s.close();
 */
(function (root) {
  "use strict";

  function dispatchdStream(o) {
    if (typeof o.getToken !== "function") throw new TypeError("dispatchdStream: options.getToken is required");
    var ES = o.EventSource || root.EventSource;
    var initial = o.initialMs || 1000, cap = o.maxMs || 30000;
    var handlers = {}, types = {}, es = null, timer = null, attempt = 0, failures = 0, done = false;
    var self = { lastEventId: o.after == null ? null : o.after, on: on, close: close };

    function status(s, detail) {
      if (o.onStatus) o.onStatus(s, attempt, detail || {});
    }
    function on(type, handler) {
      (handlers[type] = handlers[type] || []).push(handler);
      if (type !== "*") listen(type);
      return self;
    }
    function listen(type) {
      if (types[type]) return;
      types[type] = 1;
      if (es) es.addEventListener(type, receive);
    }
    function receive(m) {
      var e;
      try { e = JSON.parse(m.data); } catch (x) { return; }
      if (self.lastEventId != null && e.id <= self.lastEventId) return;
      self.lastEventId = e.id;
      failures = 0;
      (handlers[e.type || m.type] || []).concat(handlers["*"] || []).forEach(function (h) { h(e); });
    }
    function connect() {
      timer = null;
      attempt++;
      status("connecting");
      Promise.resolve().then(o.getToken).then(function (token) {
        if (done) return;
        var q = (o.topics || []).map(function (t) { return "topic=" + encodeURIComponent(t); });
        q.push("token=" + encodeURIComponent(token));
        if (self.lastEventId != null) q.push("after=" + self.lastEventId);
        var s = es = new ES((o.url || "").replace(/\/v1\/stream\/?$/, "") + "/v1/stream?" + q.join("&"));
        s.onopen = function () { if (s === es) status("open"); };
        s.onerror = function () { if (s === es) retry({}); };
        s.addEventListener("close", function (m) {
          if (s !== es) return;
          var d;
          try { d = JSON.parse(m.data) || {}; } catch (x) { d = {}; }
          if (/^(revoked|forbidden)$/.test(d.reason) || /^(KEY_REVOKED|FORBIDDEN)$/.test(d.code)) stop(d);
          else retry(d);
        });
        for (var t in types) s.addEventListener(t, receive);
      }).catch(function (err) {
        if (done) return;
        if (err && (err.status === 401 || err.status === 403)) stop({ error: err });
        else retry({ error: err });
      });
    }
    function shut() {
      if (es) es.close();
      es = null;
      clearTimeout(timer);
      timer = null;
    }
    function retry(detail) {
      shut();
      if (done) return;
      failures++;
      var d = Math.min(cap, initial * Math.pow(2, failures - 1));
      detail.delayMs = d / 2 + Math.random() * d / 2;
      status("error", detail);
      timer = setTimeout(connect, detail.delayMs);
    }
    function stop(detail) {
      done = true;
      shut();
      status("closed", detail);
    }
    function close() {
      if (!done) stop({});
    }

    listen("message");
    (o.types || []).forEach(listen);
    connect();
    return self;
  }

  root.dispatchdStream = dispatchdStream;
  if (typeof module === "object" && module.exports) module.exports = dispatchdStream;
})(typeof globalThis !== "undefined" ? globalThis : this);
