// edgeml fleet dashboard: reads the fleet server's JSON API with a bearer token and draws it.
// Vanilla JS, no external resources. Every text from the store is set with textContent or an attribute,
// never parsed as HTML. Charts are inline SVG drawn by lineChart() below.
"use strict";

(function () {
  const REFRESH_MS = 5000;
  const TOKEN_KEY = "edgeml.fleet.token";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const METRICS = [
    { name: "latency_p50_ms", title: "p50 latency (ms)" },
    { name: "latency_p99_ms", title: "p99 latency (ms)" },
    { name: "error_rate", title: "error rate" },
    { name: "drift.score", title: "drift score" },
    { name: "output_drift.score", title: "output shift" },
  ];
  // device row states of a rollout wave, in the order drawn; notifying + notified are shown as "updating"
  const WAVE_STATES = ["committed", "rolled_back", "failed", "timed_out", "incompatible", "updating", "pending"];
  const PALETTE = ["#1a73e8", "#e8710a", "#188038", "#d01884", "#9334e6", "#12b5cb", "#b06000", "#5f6368"];

  let timer = null;
  let refreshes = 0;
  let busy = false;
  let again = false; // a refresh was asked for while one was running: run once more after it

  // --- small DOM helpers --------------------------------------------------------------------------------

  function $(id) { return document.getElementById(id); }

  // el("td", {class: "num", "data-testid": "x"}, "text", child...): text children become text nodes
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(name, String(value));
    }
  }

  function fmt(value) {
    if (value === null || value === undefined) return "-";
    if (typeof value !== "number") return String(value);
    return Number.isInteger(value) ? String(value) : String(Number(value.toPrecision(4)));
  }

  function when(iso) {
    if (!iso) return "never";
    const d = new Date(iso);
    return isNaN(d) ? String(iso) : d.toLocaleString();
  }

  // --- token and API ------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  function takeTokenFromHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    const token = params.get("token");
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
  }

  async function api(path) {
    const token = sessionStorage.getItem(TOKEN_KEY) || "";
    const res = await fetch(path, { headers: { Authorization: "Bearer " + token }, cache: "no-store" });
    let body = null;
    try { body = await res.json(); } catch (e) { body = null; }
    if (!res.ok) throw new ApiError(res.status, (body && body.error) || res.statusText || "request failed");
    return body;
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message || "";
    box.hidden = !message;
  }

  function askForToken(message) {
    showError(message);
    $("token-form").hidden = false;
    $("main").hidden = true;
  }

  // --- refresh ------------------------------------------------------------------------------------------

  async function refresh() {
    if (busy) {
      again = true;
      return;
    }
    if (!sessionStorage.getItem(TOKEN_KEY)) {
      askForToken("");
      return;
    }
    busy = true;
    try {
      const by = $("chart-by").value;
      const since = $("chart-since").value;
      const charts = METRICS.map((m) => api("/api/telemetry?metric=" + encodeURIComponent(m.name) +
        "&by=" + encodeURIComponent(by) + "&since=" + encodeURIComponent(since)));
      const [overview, rollouts, devices, audit, ...series] = await Promise.all(
        [api("/api/overview"), api("/api/rollout-waves"), api("/api/devices"), api("/api/audit?limit=50"), ...charts]);
      renderOverview(overview);
      renderRollouts(rollouts);
      renderCharts(series);
      renderDevices(devices);
      renderAudit(audit);
      showError("");
      $("token-form").hidden = true;
      $("main").hidden = false;
      refreshes += 1;
      document.body.setAttribute("data-refreshes", String(refreshes));
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        askForToken("The server refused the token (401): " + err.message + ". Enter a valid token.");
      } else if (err instanceof ApiError && err.status === 403) {
        askForToken("This token may not read the dashboard (403): " + err.message + ". Use a viewer token or higher.");
      } else {
        showError("Could not refresh: " + (err && err.message ? err.message : String(err)) + ". Retrying.");
      }
    } finally {
      busy = false;
      if (again) {
        again = false;
        refresh();
      }
    }
  }

  function schedule() {
    if (timer !== null) clearInterval(timer);
    timer = setInterval(refresh, REFRESH_MS);
  }

  // --- overview -----------------------------------------------------------------------------------------

  function renderOverview(o) {
    const tiles = { online: o.devices.online, offline: o.devices.offline, total: o.devices.total,
      revoked: o.devices.revoked, incompatible: o.incompatible.devices };
    for (const [name, value] of Object.entries(tiles)) {
      const node = document.querySelector('[data-testid="tile-' + name + '"]');
      node.textContent = fmt(value);
      node.setAttribute("data-value", String(value));
    }
    const versions = $("versions-body");
    versions.replaceChildren();
    for (const [model, byVersion] of Object.entries(o.versions)) {
      for (const [version, count] of Object.entries(byVersion)) {
        versions.appendChild(el("tr", { "data-testid": "version-row", "data-model": model, "data-version": version },
          el("td", {}, model), el("td", {}, version), el("td", { class: "num", "data-value": count }, fmt(count))));
      }
    }
    if (!versions.children.length) versions.appendChild(el("tr", {}, el("td", { colspan: 3, class: "empty" }, "none")));
    const states = $("rollout-states-body");
    states.replaceChildren();
    for (const [state, count] of Object.entries(o.rollouts)) {
      states.appendChild(el("tr", { "data-testid": "rollout-state-row", "data-state": state },
        el("td", {}, el("span", { class: "badge " + state }, state)), el("td", { class: "num" }, fmt(count))));
    }
    if (!states.children.length) states.appendChild(el("tr", {}, el("td", { colspan: 2, class: "empty" }, "none")));
  }

  // --- rollouts -----------------------------------------------------------------------------------------

  function waveCounts(rollout) {
    const waves = (rollout.options && rollout.options.waves ? rollout.options.waves.length : 0) + 1;
    const counts = [];
    for (let w = 0; w < waves; w++) counts.push(Object.fromEntries(WAVE_STATES.map((s) => [s, 0])));
    (rollout.waves || []).forEach((byState, w) => {
      if (!counts[w]) return;
      for (const [s, n] of Object.entries(byState)) {
        const state = s === "notifying" || s === "notified" ? "updating" : s;
        counts[w][state] = (counts[w][state] || 0) + n;
      }
    });
    return counts;
  }

  function renderRollout(r) {
    const card = el("article", { class: "rollout " + r.state, "data-testid": "rollout", "data-rollout-id": r.id },
      el("h3", {}, el("span", { "data-testid": "rollout-title" }, r.model + ":" + r.version),
        el("span", { class: "badge " + r.state, "data-testid": "rollout-state" }, r.state),
        el("span", { class: "meta" }, r.kind + " " + r.id + " by " + r.created_by)));
    if (r.abort_reason) {
      card.appendChild(el("p", { class: "abort-reason", "data-testid": "abort-reason" }, "Aborted: " + r.abort_reason));
    }
    waveCounts(r).forEach((counts, w) => {
      const total = Object.values(counts).reduce((a, b) => a + b, 0);
      const bar = el("div", { class: "bar", role: "img", "aria-label": "wave " + w + " progress" });
      const list = el("div", { class: "counts" });
      for (const state of WAVE_STATES) {
        if (total && counts[state]) {
          const seg = el("span", { class: "s-" + state, title: state + ": " + counts[state] });
          seg.style.width = (100 * counts[state] / total) + "%";
          bar.appendChild(seg);
        }
        list.appendChild(el("span", { "data-testid": "wave-count", "data-state": state, "data-value": counts[state] },
          el("span", { class: "swatch s-" + state }), state.replace("_", " ") + " " + counts[state]));
      }
      card.appendChild(el("div", { class: "wave", "data-testid": "wave", "data-wave": w, "data-total": total },
        el("strong", {}, w === 0 ? "canary" : "wave " + w), bar, list));
    });
    return card;
  }

  function renderRollouts(rollouts) {
    const list = $("rollout-list");
    list.replaceChildren(...rollouts.map(renderRollout));
    if (!rollouts.length) list.appendChild(el("p", { class: "empty" }, "No rollouts yet."));
  }

  // --- charts -------------------------------------------------------------------------------------------

  function niceMax(value) {
    if (!(value > 0)) return 1;
    const step = Math.pow(10, Math.floor(Math.log10(value)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= value) return m * step;
    return 10 * step;
  }

  function clock(seconds) {
    const d = new Date(seconds * 1000);
    return String(d.getHours()).padStart(2, "0") + ":" + String(d.getMinutes()).padStart(2, "0");
  }

  // A line chart as an <svg>: x from data.start to data.end (Unix seconds), y from 0 to a round maximum,
  // one <path class="series"> per series with one point per bucket, and axes with tick labels.
  function lineChart(data, width, height) {
    const m = { left: 48, right: 12, top: 10, bottom: 24 };
    const w = width - m.left - m.right, h = height - m.top - m.bottom;
    const values = data.series.flatMap((s) => s.points.map((p) => p[1]));
    const ymax = niceMax(Math.max(0, ...values));
    const x = (t) => m.left + w * (t - data.start) / (data.end - data.start);
    const y = (v) => m.top + h * (1 - v / ymax);
    const root = svg("svg", { class: "chart", viewBox: "0 0 " + width + " " + height, role: "img",
      "aria-label": data.metric + " per " + data.by, "data-metric": data.metric });
    for (let i = 0; i <= 4; i++) {
      const v = ymax * i / 4;
      root.appendChild(svg("line", { class: "gridline", x1: m.left, x2: m.left + w, y1: y(v), y2: y(v) }));
      root.appendChild(svg("text", { x: m.left - 4, y: y(v) + 3, "text-anchor": "end" }, fmt(v)));
    }
    for (let i = 0; i <= 4; i++) {
      const t = data.start + (data.end - data.start) * i / 4;
      root.appendChild(svg("text", { x: x(t), y: m.top + h + 16, "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle" },
        clock(t)));
    }
    root.appendChild(svg("line", { class: "axis", x1: m.left, x2: m.left, y1: m.top, y2: m.top + h }));
    root.appendChild(svg("line", { class: "axis", x1: m.left, x2: m.left + w, y1: m.top + h, y2: m.top + h }));
    data.series.forEach((s, i) => {
      const color = PALETTE[i % PALETTE.length];
      const d = s.points.map((p, j) => (j ? "L" : "M") + x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" ");
      const path = svg("path", { class: "series", d: s.points.length === 1 ? d + " l0.01,0" : d, stroke: color,
        "data-series": s.key, "data-points": s.points.length });
      path.appendChild(svg("title", {}, s.key));
      root.appendChild(path);
      for (const p of s.points) {
        root.appendChild(svg("circle", { class: "point", cx: x(p[0]).toFixed(1), cy: y(p[1]).toFixed(1), r: 2, fill: color }));
      }
    });
    if (!data.series.length) {
      root.appendChild(svg("text", { x: m.left + w / 2, y: m.top + h / 2, "text-anchor": "middle" }, "no data in this window"));
    }
    return root;
  }

  function renderCharts(series) {
    const box = $("charts");
    box.replaceChildren();
    series.forEach((data, i) => {
      const legend = el("ul", { class: "legend" });
      data.series.forEach((s, j) => legend.appendChild(el("li", { "data-testid": "legend-item" },
        el("span", { class: "swatch", "data-color": PALETTE[j % PALETTE.length] }), s.key)));
      for (const swatch of legend.querySelectorAll(".swatch")) swatch.style.background = swatch.getAttribute("data-color");
      // the server draws short windows from the minute rollups and long ones from the hourly ones
      const resolution = data.resolution_s >= 3600 ? "hourly" : "per-minute";
      box.appendChild(el("figure", { "data-testid": "chart-" + METRICS[i].name, "data-metric": METRICS[i].name,
        "data-resolution": data.resolution_s },
        el("figcaption", {}, METRICS[i].title + " per " + data.by + " (" + resolution + " rollups)"),
        lineChart(data, 520, 200), legend));
    });
  }

  // --- devices and audit --------------------------------------------------------------------------------

  function num(value) {
    return el("td", { class: "num", "data-value": value === null || value === undefined ? "" : value }, fmt(value));
  }

  function renderDevices(devices) {
    const body = $("device-body");
    body.replaceChildren();
    for (const d of devices) {
      const t = d.telemetry || {};
      const tags = Object.entries(d.tags || {}).map(([k, v]) => k + "=" + v).join(", ");
      const state = d.revoked ? "revoked" : d.online ? "online" : "offline";
      const drift = el("td", { class: "num", "data-value": t.drift_score === undefined ? "" : t.drift_score },
        fmt(t.drift_score), t.drift_flagged ? el("span", { class: "flagged", title: "drift flagged" }, " !") : null);
      const shift = el("td", { class: "num", "data-testid": "output-shift",
        "data-value": t.output_shift === undefined || t.output_shift === null ? "" : t.output_shift },
        fmt(t.output_shift), t.output_shift_flagged ? el("span", { class: "flagged", title: "output shift flagged" }, " !") : null);
      body.appendChild(el("tr", { "data-testid": "device-row", "data-device-id": d.device_id, "data-online": String(d.online) },
        el("td", {}, d.device_id), el("td", {}, tags), el("td", {}, d.status || "-"),
        el("td", {}, el("span", { class: "badge " + state }, state)),
        el("td", {}, d.model ? d.model + ":" + d.version : "-"), el("td", {}, when(d.last_seen)),
        num(t.latency_p50_ms), num(t.latency_p99_ms), num(t.error_rate), drift, shift));
    }
    if (!devices.length) body.appendChild(el("tr", {}, el("td", { colspan: 11, class: "empty" }, "No devices enrolled.")));
  }

  function renderAudit(entries) {
    const body = $("audit-body");
    body.replaceChildren();
    for (const e of entries) {
      const details = JSON.stringify(e.details);
      body.appendChild(el("tr", { "data-testid": "audit-row", "data-seq": e.seq },
        el("td", { class: "num" }, e.seq), el("td", {}, when(e.at)), el("td", {}, e.actor),
        el("td", { "data-testid": "audit-action" }, e.action), el("td", {}, e.subject),
        el("td", { class: "details", title: details }, details.length > 120 ? details.slice(0, 117) + "..." : details)));
    }
    if (!entries.length) body.appendChild(el("tr", {}, el("td", { colspan: 6, class: "empty" }, "No entries.")));
  }

  // --- start --------------------------------------------------------------------------------------------

  function start() {
    takeTokenFromHash();
    window.addEventListener("hashchange", () => { takeTokenFromHash(); refresh(); });
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token-input").value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      $("token-input").value = "";
      refresh();
    });
    $("refresh").addEventListener("click", refresh);
    $("forget").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); askForToken(""); });
    $("chart-by").addEventListener("change", refresh);
    $("chart-since").addEventListener("change", refresh);
    refresh();
    schedule();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
