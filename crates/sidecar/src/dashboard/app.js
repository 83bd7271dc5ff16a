// The dashboard: polls /dashboard/data and draws it. Plain DOM, text only (never
// innerHTML with data), so nothing a service or topic is named can run here.
"use strict";

const POLL_MS = 2000;
const TOKEN_KEY = "pillion-api-token";
const CLASSES = ["2xx", "3xx", "4xx", "5xx"];

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

const td = (text, k, cls) => el("td", { "data-k": k, class: cls }, text);
const num = (n, k) => td(n === undefined || n === null ? "–" : String(n), k, "n");

function ms(v) {
  if (v === undefined || v === null) return "–";
  if (v < 1) return v.toFixed(2) + " ms";
  if (v < 100) return v.toFixed(1) + " ms";
  if (v < 10000) return Math.round(v) + " ms";
  return (v / 1000).toFixed(1) + " s";
}

function rate(v) {
  if (!v) return "0";
  return v < 10 ? v.toFixed(1) : String(Math.round(v));
}

function clock(unixMs) {
  return new Date(unixMs).toLocaleTimeString([], { hour12: false });
}

// Each cell is labelled with its column's heading (`data-label`): at phone width a
// table of class "cards" shows each row as a card of labelled cells (style.css).
function fill(tableId, rows) {
  const table = $(tableId);
  const body = table.tBodies[0];
  const labels = [...table.tHead.rows[0].cells].map((th) => th.textContent);
  for (const row of rows) {
    [...row.cells].forEach((c, i) => { if (labels[i]) c.dataset.label = labels[i]; });
  }
  body.replaceChildren(...rows);
  const empty = table.closest("section").querySelector(".empty");
  if (empty) empty.hidden = rows.length > 0;
  table.hidden = rows.length === 0;
}

function dl(id, pairs) {
  const list = $(id);
  list.replaceChildren();
  for (const [k, v, cls] of pairs) {
    if (v === undefined || v === null) continue;
    list.append(el("dt", {}, k), el("dd", { "data-k": k, class: cls }, v));
  }
}

// The window the calls table shows: the last closed one, or one the user pinned by
// clicking its bar (kept in the URL, `?window=<end ms>`, so it can be shared).
let pinned = Number(new URLSearchParams(location.search).get("window")) || null;
let lastData = null;

function pin(endMs) {
  pinned = endMs;
  history.replaceState(null, "", endMs ? `?window=${endMs}` : location.pathname);
  if (lastData) draw(lastData);
}

// One bar per 5-second window of the last minute, stacked by status class; a click
// on a bar shows that window.
function sparkline(windows) {
  const NS = "http://www.w3.org/2000/svg";
  const w = 6, gap = 2, h = 22, n = 12;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${n * (w + gap)} ${h}`);
  svg.setAttribute("class", "spark");
  svg.setAttribute("role", "img");
  const last = windows.slice(-n);
  const max = Math.max(1, ...last.map((x) => x.calls));
  svg.setAttribute("aria-label", "calls per 5 s: " + last.map((x) => x.calls).join(", "));
  for (let i = 0; i < n; i++) {
    const base = document.createElementNS(NS, "rect");
    base.setAttribute("x", i * (w + gap));
    base.setAttribute("y", h - 1);
    base.setAttribute("width", w);
    base.setAttribute("height", 1);
    base.setAttribute("class", "base");
    svg.append(base);
  }
  last.forEach((win, i) => {
    const x = (n - last.length + i) * (w + gap);
    let y = h;
    for (const [cls, count] of [["ok", win["2xx"] + win["1xx"] + win["3xx"]], ["warn", win["4xx"]], ["bad", win["5xx"]]]) {
      if (!count) continue;
      const bh = Math.max(1, (count / max) * h);
      y -= bh;
      const r = document.createElementNS(NS, "rect");
      r.setAttribute("x", x);
      r.setAttribute("y", y);
      r.setAttribute("width", w);
      r.setAttribute("height", bh);
      r.setAttribute("class", cls);
      svg.append(r);
    }
    const hit = document.createElementNS(NS, "rect");
    hit.setAttribute("x", x);
    hit.setAttribute("y", 0);
    hit.setAttribute("width", w + gap);
    hit.setAttribute("height", h);
    hit.setAttribute("class", "hit" + (win.end_ms === pinned ? " pinned" : ""));
    hit.addEventListener("click", () => pin(win.end_ms === pinned ? null : win.end_ms));
    const title = document.createElementNS(NS, "title");
    title.textContent = `${clock(win.end_ms)}: ${win.calls} calls`;
    hit.append(title);
    svg.append(hit);
  });
  return svg;
}

// A node's state as the balancer has it now (invoke's `health`): ejected while its
// ejection lasts, failing shortly after failed attempts, ok once it answers again,
// its ejection ends or its failure is older than an ejection would last.
function health(state) {
  if (!state) return ["not called", "muted"];
  switch (state.health) {
    case "ejected": return [`ejected ${Math.ceil(state.ejected_for_secs || 0)} s`, "bad"];
    case "failing": return ["failing", "warn"];
    case "untried": return ["not called", "muted"];
    default: return ["ok", "ok"];
  }
}

// Seconds as an age: 42 s, 5 min, 3 h, 2 d.
function age(secs) {
  if (secs === undefined || secs === null || secs < 0) return "–";
  if (secs < 60) return Math.floor(secs) + " s";
  if (secs < 3600) return Math.floor(secs / 60) + " min";
  if (secs < 86400) return Math.floor(secs / 3600) + " h";
  return Math.floor(secs / 86400) + " d";
}

function drawCalls(d) {
  const dash = d.dashboard;
  const kept = dash.services.some((s) => s.windows.some((w) => w.end_ms === pinned));
  const end = pinned && kept ? pinned : dash.last_window_end_ms;
  const note = $("window");
  note.dataset.end = end || "";
  note.textContent = !end
    ? `first ${dash.window_secs} s window still open`
    : `${dash.window_secs} s window ending ${clock(end)}` +
      (pinned && kept ? " (pinned: click its bar again for the latest)" : "") +
      (pinned && !kept ? " (the pinned window is older than a minute)" : "");
  const rows = dash.services
    .filter((s) => s.total)
    .map((s) => {
      const w = s.windows.find((x) => x.end_ms === end) || {};
      // A service whose nodes are gone stays, with the calls it failed (404).
      const name = td(s.name, "service", "name");
      if (!s.registered) name.append(" ", el("small", { class: "bad tag", "data-k": "unregistered" }, "not registered"));
      return el("tr", { "data-service": s.name, "data-registered": String(s.registered) },
        name,
        ...CLASSES.map((c) => {
          const n = w[c] || 0;
          return td(String(n), c, "n" + (n && c === "4xx" ? " warn" : "") + (n && c === "5xx" ? " bad" : ""));
        }),
        td(String(w.sidecar || 0), "sidecar", "n" + (w.sidecar ? " bad" : "")),
        td(ms(w.p50_ms), "p50", "n"),
        td(ms(w.p99_ms), "p99", "n"),
        el("td", { "data-k": "spark" }, sparkline(s.windows)),
        num(s.pending, "pending"),
        num(s.total.calls, "total"));
    });
  fill("calls", rows);
}

function drawNodes(d) {
  const rows = [];
  for (const s of d.dashboard.services) {
    if (!s.registered) {
      // Called in the last minute with no node to go to: an outage, not nothing.
      if (!s.windows.some((w) => w.calls)) continue;
      rows.push(el("tr", { "data-service": s.name, "data-node": "" },
        td(s.name, "service", "name"),
        td("–", "node", "mono"),
        td("no node registered", "health", "bad"),
        td("–", "latency", "n"),
        td("–", "address", "mono"),
        num(null, "tier"), num(null, "pending"), num(null, "failures"), td("–", "zone")));
      continue;
    }
    for (const n of s.nodes) {
      const st = n.state && n.state.id ? n.state : null;
      const [h, cls] = health(st);
      const failed = st && st.last_failure_secs_ago !== null && st.last_failure_secs_ago !== undefined
        ? `last failure ${age(st.last_failure_secs_ago)} ago` : null;
      rows.push(el("tr", { "data-service": s.name, "data-node": n.id },
        td(s.name, "service", "name"),
        td(n.id, "node", "mono"),
        el("td", { "data-k": "health", class: cls, title: failed }, h),
        // Measured answers only: never the balancer's assumed or penalty values.
        td(st ? ms(st.latency_ms) : "–", "latency", "n"),
        td(n.address + (n.mesh ? " (mesh)" : ""), "address", "mono"),
        num(st ? st.tier : null, "tier"),
        num(st ? st.pending : null, "pending"),
        el("td", { "data-k": "failures", class: "n", title: failed }, st ? String(st.consecutive_failures) : "–"),
        td([n.zone, n.region].filter(Boolean).join(" / ") || "–", "zone")));
    }
  }
  fill("nodes", rows);
}

function drawBroker(d) {
  const b = d.broker || {};
  const tag = $("broker-backend");
  tag.textContent = `${b.backend || ""} · ${b.healthy ? "healthy" : "unreachable"}`;
  tag.className = b.healthy ? "muted" : "bad";
  // Rates over the window the calls table shows (the pinned one, or the last).
  const end = Number($("window").dataset.end) || null;
  const secs = d.dashboard.window_secs;
  fill("topics", d.dashboard.topics.map((t) => {
    const w = (t.windows || []).find((x) => x.end_ms === end);
    const per = w
      ? { published: w.published / secs, delivered: w.delivered / secs, dropped: w.dropped / secs }
      : { published: t.published_per_sec, delivered: t.delivered_per_sec, dropped: t.dropped_per_sec };
    return el("tr", { "data-topic": t.topic },
      td(t.topic, "topic", "name mono"),
      num(t.subscribers, "subscribers"),
      td(rate(per.published), "published_per_sec", "n"),
      td(rate(per.delivered), "delivered_per_sec", "n"),
      td(rate(per.dropped), "dropped_per_sec", "n" + (per.dropped ? " bad" : "")),
      num(t.published, "published"),
      num(t.delivered, "delivered"));
  }));
}

function drawTcp(d) {
  const rows = [];
  for (const l of d.tcp || []) {
    for (const tier of l.tiers) {
      const backends = tier.backends.length ? tier.backends : [null];
      for (const b of backends) {
        let state = "–", cls = "muted";
        if (b) {
          if (b.down_for_secs) [state, cls] = [`down ${Math.ceil(b.down_for_secs)} s`, "bad"];
          else if (b.draining) [state, cls] = ["draining", "warn"];
          else [state, cls] = ["up", "ok"];
        }
        const name = b ? b.address + (b.target && b.target !== b.address ? ` (${b.target})` : "")
          : [...(tier.targets || []), ...(tier.services || []).map((s) => "service " + s)].join(", ");
        rows.push(el("tr", { "data-listen": l.listen },
          td(l.listen + (l.accepting ? "" : " (closed)"), "listen", "mono"),
          num(tier.tier, "tier"),
          td(name, "backend", "mono"),
          td(state, "state", cls),
          num(b ? b.active : null, "active"),
          num(b ? b.connections_total : null, "connections"),
          num(b ? b.dial_failures_total : null, "dial_failures")));
      }
    }
  }
  fill("tcp", rows);
}

function drawSessions(d) {
  const s = d.sessions;
  $("sessions").hidden = !s;
  $("sessions-section").querySelector(".empty").hidden = !!s;
  if (!s) return;
  const c = s.counts || {};
  dl("sessions", [
    ["store", s.store, "mono"],
    ["store health", s.store_healthy ? "healthy" : "unreachable: " + (s.store_error || ""), s.store_healthy ? "ok" : "bad"],
    ["app", s.app, "mono"],
    ["cookie", `${s.cookie}, max age ${s.max_age_secs} s${s.rolling ? ", rolling" : ""}`],
    ["sessions created", c.created],
    ["destroyed", c.destroyed],
    ["store errors", c.store_errors, c.store_errors ? "bad" : ""],
  ]);
}

function drawCluster(d) {
  const r = d.registry || {};
  const a = d.app;
  dl("registry", [
    ["registry", r.backend, "mono"],
    ["health", r.healthy ? "healthy" : "unreachable" + (r.error ? ": " + r.error : ""), r.healthy ? "ok" : "bad"],
    ["app", a ? `${a.name || ""} ${a.registered ? "registered" : "not registered"}` : null, a && !a.registered ? "warn" : ""],
    ["version", d.version],
  ]);
  const c = d.cluster;
  $("members").hidden = !c;
  if (!c) return;
  const me = "this sidecar" + (c.rendezvous ? ", rendezvous" : "");
  // Every sidecar this one knows of, the failed and the left too (as `pillion
  // members`); only the gossip addresses of the live where a sidecar has no list.
  const members = c.members && c.members.length ? c.members
    : [{ gossip: c.gossip, state: "alive" }, ...c.peers.map((p) => ({ gossip: p, state: "alive" }))];
  const now = (d.dashboard.now_ms || Date.now()) / 1000;
  const stateClass = { alive: "ok", failed: "bad", left: "warn" };
  fill("members", members.map((m) => el("tr", { "data-member": m.gossip, "data-state": m.state, class: m.state === "alive" ? null : "gone" },
    td(m.name || "–", "name", "name"),
    td(m.api || "–", "api", "mono"),
    td(m.gossip, "member", "mono"),
    td(m.state, "state", stateClass[m.state] || "warn"),
    el("td", { "data-k": "age", class: "n", title: m.since_unix ? "started " + new Date(m.since_unix * 1000).toLocaleString() : null },
      m.since_unix ? age(now - m.since_unix) : "–"),
    td(m.gossip === c.gossip ? me : "peer", "role"))));
}

// /healthz's verdict: a red banner naming each problem while it is not 200.
function drawHealth(d) {
  const h = d.health;
  const bad = !!h && h.status !== "ok";
  $("health").hidden = !bad;
  if (!bad) return false;
  $("health-title").textContent = `Unhealthy: /healthz answers ${h.code}`;
  $("problems").replaceChildren(...(h.problems || []).map((p) => el("li", {}, p)));
  return true;
}

function draw(d) {
  lastData = d;
  $("sidecar").textContent = `${d.address} · v${d.version} · up ${d.uptime_secs} s`;
  const unhealthy = drawHealth(d);
  drawCalls(d);
  drawNodes(d);
  drawBroker(d);
  drawTcp(d);
  drawSessions(d);
  drawCluster(d);
  return unhealthy;
}

function setState(state, text) {
  const badge = $("state");
  badge.dataset.state = state;
  badge.textContent = text;
  document.body.dataset.state = state;
}

let timer = null;

async function poll() {
  clearTimeout(timer);
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? { "Pillion-Api-Token": token } : {};
  try {
    const res = await fetch("/dashboard/data", { headers, cache: "no-store" });
    if (res.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      $("login-why").textContent = token
        ? "The API token was refused. Give the sidecar's --api-token."
        : "This sidecar's API needs its token (--api-token). It is kept in this tab only.";
      $("login").hidden = false;
      $("content").hidden = true;
      setState("locked", "token needed");
      return; // polling resumes when a token is given
    }
    if (!res.ok) {
      let detail = res.statusText;
      try { detail = (await res.json()).detail || detail; } catch (_) { /* not JSON */ }
      throw new Error(`HTTP ${res.status}: ${detail}`);
    }
    const data = await res.json();
    $("login").hidden = true;
    $("content").hidden = false;
    if (draw(data)) setState("unhealthy", "unhealthy");
    else setState("live", "live");
    $("updated").textContent = "updated " + clock(Date.now());
  } catch (e) {
    $("health").hidden = true;
    setState("down", "disconnected");
    $("updated").textContent = `${e.message || e} · retrying every ${POLL_MS / 1000} s`;
  }
  timer = setTimeout(poll, POLL_MS);
}

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  poll();
});

poll();
