/* dispatchd console: keeps each live region of the page current through the event stream.
 * A region declares the fragment it shows (data-src, data-query) and the event types that change it
 * (data-refresh-on); on such an event the fragment is fetched again (debounced), so nothing polls.
 * Countdowns (data-deadline) tick in the browser; forms with data-confirm ask first. */
(function () {
  "use strict";
  var body = document.body;
  var status = document.getElementById("live-status");
  var texts = document.getElementById("status-texts");
  var regions = Array.prototype.slice.call(document.querySelectorAll("[data-refresh-on]"));
  var pending = new Map();

  function typesOf(region) { return region.getAttribute("data-refresh-on").split(/\s+/).filter(Boolean); }

  function refresh(region, event) {
    if (pending.has(region)) return;
    pending.set(region, setTimeout(function () {
      pending.delete(region);
      var query = region.getAttribute("data-query");
      var url = region.getAttribute("data-src") + (query ? "?" + query : "");
      // the region is the source too: each region has its own request queue in htmx
      htmx.ajax("GET", url, { source: region, target: region, swap: "innerHTML" }).then(function () {
        region.setAttribute("data-event-id", String(event.id));
        region.setAttribute("data-refreshed-at", String(Date.now()));
        tick();
        drawCharts();
      });
    }, 80));
  }

  function setStatus(state) {
    if (!status) return;
    status.setAttribute("data-state", state);
    status.textContent = texts ? texts.getAttribute("data-" + state) || state : state;
  }

  function pad(n) { return n < 10 ? "0" + n : String(n); }
  function tick() {
    var now = Date.now();
    document.querySelectorAll("[data-deadline]").forEach(function (el) {
      var left = Math.max(0, Math.round((Date.parse(el.getAttribute("data-deadline")) - now) / 1000));
      el.textContent = Math.floor(left / 60) + ":" + pad(left % 60);
      el.classList.toggle("late", left < 60);
    });
  }

  function drawCharts() {
    if (!window.uPlot) return;
    document.querySelectorAll(".chart[data-series]").forEach(function (el) {
      var s = JSON.parse(el.getAttribute("data-series"));
      el.textContent = "";
      var width = Math.max(280, Math.min(900, el.clientWidth || 600));
      new uPlot({
        width: width, height: 240,
        series: [{}, { label: el.getAttribute("data-label-time"), stroke: "#0b5cad", scale: "s" },
                 { label: el.getAttribute("data-label-acceptance"), stroke: "#1e6b34", scale: "%" }],
        axes: [{}, { scale: "s" }, { scale: "%", side: 1, grid: { show: false } }],
      }, [s.hours, s.time_to_match_p50_s, s.acceptance_pct], el);
    });
  }

  document.addEventListener("submit", function (e) {
    var message = e.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) e.preventDefault();
  }, true);

  tick();
  setInterval(tick, 1000);
  drawCharts();

  if (!regions.length || !window.dispatchdStream) return;
  var after = body.getAttribute("data-after");
  var stream = window.dispatchdStream({
    topics: (body.getAttribute("data-topics") || "").split(" ").filter(Boolean),
    after: after ? Number(after) : null,
    getToken: function () {
      return fetch("/console/stream-token", { credentials: "same-origin" }).then(function (r) {
        if (!r.ok) { var err = new Error("stream token refused"); err.status = r.status; throw err; }
        return r.json();
      }).then(function (j) { return j.token; });
    },
    onStatus: function (state) { setStatus(state); },
  });
  var seen = {};
  regions.forEach(function (region) {
    typesOf(region).forEach(function (type) {
      if (seen[type]) return;
      seen[type] = true;
      stream.on(type, function (event) {
        window.dispatchdLastEvent = { id: event.id, type: event.type, at: Date.now() };
        regions.forEach(function (r) { if (typesOf(r).indexOf(event.type) >= 0) refresh(r, event); });
      });
    });
  });
})();
