// tripgate's ops console: plain DOM, no dependencies, no inline code (the page's CSP
// allows only this file). Every call goes to the admin API of this listener.
"use strict";

const $ = (sel) => document.querySelector(sel);
let csrf = null;
let pending = null; // the change waiting for its confirmation
let statsTimer = null;
let refreshedAt = null; // when every live figure last refreshed

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "testid") e.dataset.testid = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && csrf) headers["X-CSRF-Token"] = csrf;
  const res = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status === 401) { showLogin(); throw new Error("not logged in"); }
  const text = await res.text();
  const data = text ? JSON.parse(text) : null;
  if (!res.ok) {
    // The envelope's message, and what each field was refused for ("150 is not in 0..=100").
    const fields = ((data && data.errors) || []).map((e) => e.message).filter(Boolean);
    const text = (data && (data.message || data.response_code)) || String(res.status);
    throw new Error(fields.length ? `${text} ${fields.join("; ")}` : text);
  }
  return data;
}

function showLogin(message) {
  $("#app-view").hidden = true;
  $("#logout").hidden = true;
  $("#who").textContent = "";
  $("#login-view").hidden = false;
  const err = $("#login-error");
  err.hidden = !message;
  err.textContent = message || "";
  if (statsTimer) { clearInterval(statsTimer); statsTimer = null; }
}

async function start() {
  const res = await fetch("/admin/session", { credentials: "same-origin" });
  if (!res.ok) {
    showLogin(new URLSearchParams(location.search).get("login") === "failed" ? "That is not a valid admin token." : "");
    return;
  }
  const s = await res.json();
  csrf = s.csrf;
  $("#who").textContent = "logged in as " + s.admin;
  $("#login-view").hidden = true;
  $("#app-view").hidden = false;
  $("#logout").hidden = false;
  // The first load goes through poll too: a database down from the start shows as
  // out-of-date figures on the page, not as a failed login.
  refreshedAt = null;
  await poll();
  statsTimer = setInterval(poll, 2000);
}

// Every 2 s: the charts, the guard, the audit, and the flags — unless a flag is being
// edited (a field focused or changed, a change waiting for its confirmation), which a
// redraw would undo. A failure says so, with the time of the last refresh: figures that
// silently stop moving would pass for current ones (and it is when the database is down
// that ops watch).
let polling = false;
async function poll() {
  if (polling) return; // the previous one is still waiting: its answers would land out of order
  polling = true;
  let failed;
  try {
    const work = [drawStats(), refreshGuard(), refreshAudit(), refreshFlags({ unlessEdited: true })];
    failed = (await Promise.allSettled(work)).find((r) => r.status === "rejected");
  } finally {
    polling = false;
  }
  const note = $("#live-error");
  if (failed) {
    const since = refreshedAt ? refreshedAt.toLocaleTimeString() : "the page loaded";
    note.textContent = `Not refreshed since ${since} (${failed.reason.message || failed.reason}): the figures below may be out of date.`;
    note.hidden = false;
  } else {
    refreshedAt = new Date();
    note.hidden = true;
  }
}

function flagsBeingEdited() {
  const box = $("#flags");
  if (box.contains(document.activeElement) || !$("#confirm-box").hidden) return true;
  return [...box.querySelectorAll("input")].some((i) => i.value !== i.dataset.rendered);
}

async function refresh() {
  await Promise.all([refreshFlags(), refreshGuard(), refreshAudit()]);
}

async function refreshFlags(opts) {
  const data = await api("GET", "/admin/flags");
  // Checked when the answer is here, not when it was asked for: what was typed meanwhile stays.
  if (opts && opts.unlessEdited && flagsBeingEdited()) return;
  const box = $("#flags");
  box.replaceChildren();
  for (const [name, f] of Object.entries(data.flags)) {
    const o = f.override;
    const source = f.source === "override"
      ? `override by ${o.actor} (${o.source}) since ${new Date(o.at).toLocaleString()}${o.reason ? ": " + o.reason : ""}; the file says ${f.file_percent}%`
      : (o && !o.in_force ? `file (kill switch: the override by ${o.actor} is not in force)` : "file");
    const input = el("input", { type: "number", min: "0", max: "100", step: "0.01", value: f.percent, testid: `percent-input-${name}`, "aria-label": `new percent for ${name}` });
    input.dataset.rendered = input.value;
    const apply = el("button", { type: "button", testid: `percent-apply-${name}`, text: "Set percent" });
    apply.addEventListener("click", () => {
      // An empty field (or text, which a number input reports as empty) is no percent:
      // Number("") would be 0, the whole fleet on legacy. The range is the API's to check.
      const typed = input.value.trim();
      const err = $("#flags-error");
      if (typed === "" || !Number.isFinite(Number(typed))) {
        err.textContent = `Enter the new percent of ${name} (0 to 100).`;
        err.hidden = false;
        return;
      }
      err.hidden = true;
      ask(`Set ${name} to ${Number(typed)}% on every instance?`, { method: "PUT", path: `/admin/flags/${name}`, body: { percent: Number(typed) } });
    });
    const controls = el("div", { class: "controls" }, input, apply);
    if (f.source === "override") {
      const clear = el("button", { type: "button", testid: `clear-override-${name}`, text: "Clear override" });
      clear.addEventListener("click", () => ask(`Clear the override of ${name} (back to the file's ${f.file_percent}%)?`, { method: "DELETE", path: `/admin/flags/${name}/override`, body: {} }));
      controls.append(clear);
    }
    box.append(el("div", { class: "card flag" },
      el("div", {},
        el("div", {}, el("strong", { text: name })),
        el("div", { class: "percent" }, el("span", { testid: `flag-percent-${name}`, text: String(f.percent) }), "%"),
        el("div", { class: "muted", testid: `flag-source-${name}`, text: "source: " + source }),
        el("div", { class: "muted", text: `salt ${f.salt} · allow ${f.allow.length} · deny ${f.deny.length}` })),
      controls));
  }
}

function ask(text, change) {
  pending = change;
  $("#confirm-text").textContent = text;
  $("#reason").value = "";
  $("#confirm-box").hidden = false;
  $("#reason").focus();
}

async function confirmChange() {
  if (!pending) return;
  const change = pending;
  pending = null;
  $("#confirm-box").hidden = true;
  const body = Object.assign({}, change.body, { reason: $("#reason").value });
  const err = $("#flags-error");
  try {
    await api(change.method, change.path, body);
    err.hidden = true;
  } catch (e) {
    err.textContent = String(e.message || e);
    err.hidden = false;
  }
  await refresh();
}

async function refreshGuard() {
  const data = await api("GET", "/admin/guard");
  const box = $("#guard");
  box.replaceChildren();
  for (const [name, g] of Object.entries(data.flags)) {
    const card = el("div", { class: "card" },
      el("div", {}, el("strong", { text: name }), " ",
        el("span", { testid: `guard-state-${name}`, text: g.state }),
        ` at ${g.percent}%`, g.next_step != null ? ` → next ${g.next_step}%` : ""),
      el("div", { class: "muted", text: g.reason || "" }));
    const actions = el("div", { class: "controls" });
    for (const action of ["pause", "resume", "ack"]) {
      const b = el("button", { type: "button", testid: `guard-${action}-${name}`, text: action });
      b.addEventListener("click", async () => {
        try { await api("POST", `/admin/guard/${name}/${action}`); } catch (e) { $("#flags-error").textContent = String(e.message || e); $("#flags-error").hidden = false; }
        await refresh();
      });
      actions.append(b);
    }
    if (g.state !== "disabled") card.append(actions);
    if (g.verdicts && g.verdicts.length) {
      const rows = g.verdicts.slice(0, 10).map((v) => el("tr", {},
        el("td", { text: new Date(v.at).toLocaleTimeString() }),
        el("td", { class: v.verdict, text: v.verdict }),
        el("td", { text: `${v.requests.legacy} / ${v.requests.atomic_async}` }),
        el("td", { text: `${pct(v.error_rate.legacy)} / ${pct(v.error_rate.atomic_async)}` }),
        el("td", { text: `${ms(v.p99_ms.legacy)} / ${ms(v.p99_ms.atomic_async)}` }),
        el("td", { text: v.reason })));
      card.append(el("div", { class: "scroll" }, el("table", {},
        el("thead", {}, el("tr", {}, ...["when", "verdict", "requests (L / A)", "errors", "p99 ms", "why"].map((h) => el("th", { text: h })))),
        el("tbody", {}, ...rows))));
    }
    box.append(card);
  }
}

async function refreshAudit() {
  const data = await api("GET", "/admin/audit");
  const rows = data.entries.slice().reverse().map((e) => el("tr", {},
    el("td", { text: new Date(e.at).toLocaleString() }),
    el("td", { text: e.actor }),
    el("td", { text: e.source }),
    el("td", { text: e.action }),
    el("td", { text: e.flag }),
    el("td", { text: `${e.from ?? "–"} → ${e.to}` }),
    el("td", { text: e.in_force ? "yes" : "no" }),
    el("td", { text: e.reason || "" })));
  $("#audit-table tbody").replaceChildren(...rows);
}

const pct = (x) => x == null ? "–" : (x * 100).toFixed(2) + "%";
const ms = (x) => x == null ? "–" : Number(x).toFixed(1);

// A line chart of `key` per cohort: one <path> per cohort, axes, the max as a label.
function chart(svg, cohorts, key, scale) {
  const W = 400, H = 160, P = 24;
  const all = Object.values(cohorts).flat().map((p) => (p[key] ?? 0) * scale);
  const max = Math.max(1e-9, ...all);
  const times = Object.values(cohorts).flat().map((p) => p.at);
  const t0 = Math.min(...times), t1 = Math.max(...times, t0 + 1);
  const x = (t) => P + (W - 2 * P) * (t - t0) / (t1 - t0);
  const y = (v) => H - P - (H - 2 * P) * v / max;
  const NS = "http://www.w3.org/2000/svg";
  const nodes = [];
  for (const [a, b, c, d] of [[P, H - P, W - P, H - P], [P, P, P, H - P]]) {
    const l = document.createElementNS(NS, "line");
    l.setAttribute("x1", a); l.setAttribute("y1", b); l.setAttribute("x2", c); l.setAttribute("y2", d);
    l.setAttribute("class", "axis");
    nodes.push(l);
  }
  const label = document.createElementNS(NS, "text");
  label.setAttribute("x", 2); label.setAttribute("y", P - 6);
  label.textContent = max.toFixed(max < 10 ? 2 : 0);
  nodes.push(label);
  for (const [cohort, points] of Object.entries(cohorts)) {
    if (!points.length) continue;
    const path = document.createElementNS(NS, "path");
    path.setAttribute("class", cohort);
    path.setAttribute("d", points.map((p, i) => `${i ? "L" : "M"}${x(p.at).toFixed(1)},${y((p[key] ?? 0) * scale).toFixed(1)}`).join(" "));
    path.dataset.points = String(points.length);
    nodes.push(path);
  }
  svg.replaceChildren(...nodes);
}

async function drawStats() {
  const data = await api("GET", "/admin/stats?seconds=300");
  const c = data.cohorts;
  chart($("#chart-latency"), c, "p99_ms", 1);
  const errors = {};
  for (const [k, points] of Object.entries(c)) errors[k] = points.map((p) => Object.assign({}, p, { failed: p.error_rate + p.timeout_rate }));
  chart($("#chart-errors"), errors, "failed", 100);
  // Live: each cohort's figures of the last 10 s (two points; an instance's samples of
  // the newest second may not be written yet). A cohort with none there has no traffic
  // now (0 req/s), whatever it had before.
  const recent = data.to - 2 * data.step_ms;
  const rows = Object.entries(c).map(([k, points]) => {
    const last = points[points.length - 1];
    const p = last && last.at >= recent ? last : { rps: 0 };
    return el("tr", {}, el("td", { class: k === "legacy" ? "legacy" : "atomic", text: k }),
      el("td", { testid: `stats-rps-${k}`, text: p.rps != null ? p.rps.toFixed(1) : "–" }), el("td", { text: ms(p.p50_ms) }),
      el("td", { text: ms(p.p95_ms) }), el("td", { text: ms(p.p99_ms) }), el("td", { text: pct(p.error_rate) }),
      el("td", { text: pct(p.timeout_rate) }), el("td", { text: ms(p.otp_p95_ms) }));
  });
  $("#stats-table tbody").replaceChildren(...rows);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const res = await fetch("/admin/login", {
      method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token: $("#token").value.trim() }),
    });
    if (!res.ok) { showLogin("That is not a valid admin token."); return; }
    $("#token").value = "";
    await start();
  });
  $("#logout").addEventListener("click", async () => {
    // Only a logout the server made (or a session already gone: 401) shows the login
    // form: one that failed (the database down: 503; a stale CSRF token: 403) leaves the
    // cookie valid, and a reload would log straight back in.
    const err = $("#session-error");
    let why = null;
    try {
      const res = await fetch("/admin/logout", { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf || "" } });
      if (!res.ok && res.status !== 401) {
        const body = await res.json().catch(() => null);
        why = `HTTP ${res.status}${body && body.message ? ": " + body.message : ""}`;
      }
    } catch (e) { why = String(e.message || e); }
    if (why) {
      err.textContent = `Logging out failed (${why}). You are still logged in; try again.`;
      err.hidden = false;
      return;
    }
    err.hidden = true;
    csrf = null;
    showLogin("");
  });
  $("#confirm").addEventListener("click", confirmChange);
  $("#cancel").addEventListener("click", () => { pending = null; $("#confirm-box").hidden = true; });
  $("#explain-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const driver = $("#explain-driver").value.trim();
    try {
      const e = await api("GET", `/admin/explain/trip_accept_v2/${encodeURIComponent(driver)}`);
      $("#explain-result").textContent = `bucket ${e.bucket} ${e.bucket < e.threshold ? "<" : "≥"} threshold ${e.threshold}` +
        `${e.list ? ` (on the ${e.list} list)` : ""} → ${e.cohort} (source: ${e.source})`;
    } catch (err) { $("#explain-result").textContent = String(err.message || err); }
  });
  start().catch((e) => showLogin(String(e.message || e)));
});
