// The dashboard's captured-data section (fleet/capture/web.py serves it): samples per device and model
// version, and the uploads drift alerts triggered, each linked to the filters that pull exactly its samples.
// Text is set with textContent only; the token is the one the page keeps in sessionStorage.
(function () {
  "use strict";

  const TOKEN_KEY = "edgeml.fleet.token";  // the key app.js keeps the token under
  const REFRESH_MS = 15000;

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  async function api(path) {
    const token = sessionStorage.getItem(TOKEN_KEY) || "";
    if (!token) return null;
    const res = await fetch(path, { headers: { Authorization: "Bearer " + token }, cache: "no-store" });
    return res.ok ? res.json() : null;
  }

  function bytes(n) {
    if (n >= 1048576) return (n / 1048576).toFixed(1) + " MiB";
    if (n >= 1024) return (n / 1024).toFixed(1) + " KiB";
    return String(n);
  }

  function pullCommand(f) {
    const args = ["edgeml fleet capture pull REGISTRY --model " + f.model];
    if (f.version) args.push("--version " + f.version);
    args.push("--device " + f.device, "--since " + f.since, "--until " + f.until, "--out DIR");
    return args.join(" ");
  }

  function renderCounts(data) {
    const body = $("capture-body");
    body.replaceChildren();
    const rows = (data && data.captures) || [];
    for (const r of rows) {
      body.appendChild(el("tr", { "data-testid": "capture-row", "data-device-id": r.device_id },
        el("td", {}, r.device_id), el("td", {}, (r.model || "-") + ":" + (r.version || "-")),
        el("td", {}, r.reason), el("td", { class: "num" }, String(r.samples)), el("td", { class: "num" }, bytes(r.bytes)),
        el("td", {}, r.last ? r.last.slice(0, 19).replace("T", " ") : "-")));
    }
    if (!rows.length) body.appendChild(el("tr", {}, el("td", { colspan: 6, class: "empty" }, "No captured samples yet.")));
  }

  function renderDrift(data) {
    const body = $("capture-drift-body");
    body.replaceChildren();
    const uploads = (data && data.uploads) || [];
    for (const u of uploads) {
      const score = u.drift_score === null || u.drift_score === undefined ? "-" : u.drift_score.toFixed(3);
      body.appendChild(el("tr", { "data-testid": "drift-capture-row", "data-device-id": u.device_id },
        el("td", {}, u.received_at.slice(0, 19).replace("T", " ")), el("td", {}, u.device_id),
        el("td", {}, (u.model || "-") + ":" + (u.version || "-")), el("td", { class: "num" }, score),
        el("td", { class: "num" }, String(u.samples)), el("td", {}, el("code", {}, pullCommand(u.pull)))));
    }
    if (!uploads.length) body.appendChild(el("tr", {}, el("td", { colspan: 6, class: "empty" }, "No drift-triggered uploads.")));
  }

  async function refresh() {
    try {
      const [counts, drift] = await Promise.all([api("/api/captures"), api("/api/captures/drift?limit=20")]);
      if (counts) renderCounts(counts);
      if (drift) renderDrift(drift);
    } catch (e) {
      // the page's own refresh reports errors; this section only waits for the next round
    }
  }

  function start() {
    refresh();
    setInterval(refresh, REFRESH_MS);
    const button = $("refresh");
    if (button) button.addEventListener("click", refresh);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
