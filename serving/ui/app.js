// The live page: reads only the API's own endpoints (/status, /recommendations, /events,
// /features, /model/versions, /admin/rollback), the ones the CLI and apps use too.
"use strict";

const $ = (sel, el = document) => el.querySelector(sel);
const SERIES_LENGTH = 120; // samples kept per plot: two minutes at one a second
const series = {};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch { /* an empty or non-JSON body */ }
  return { ok: response.ok, status: response.status, body };
}

function fmt(value, digits = 0) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return typeof value === "number" ? value.toLocaleString(undefined, { maximumFractionDigits: digits }) : String(value);
}

function show(key, value, digits = 0) {
  document.querySelectorAll(`[data-k="${key}"]`).forEach((node) => { node.textContent = fmt(value, digits); });
}

function plot(name, value) {
  const values = (series[name] ??= []);
  values.push(typeof value === "number" ? value : null);
  if (values.length > SERIES_LENGTH) values.shift();
  const svg = $(`svg[data-series="${name}"]`);
  if (!svg) return;
  const known = values.filter((v) => v !== null);
  const top = Math.max(...known, 1e-9);
  const width = 200, height = 34;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const points = values.map((v, i) => v === null ? null :
    `${(i / (SERIES_LENGTH - 1)) * width},${height - 2 - (v / top) * (height - 4)}`).filter(Boolean).join(" ");
  svg.replaceChildren(document.createElementNS("http://www.w3.org/2000/svg", "polyline"));
  svg.firstChild.setAttribute("points", points);
}

// -- the pipeline ------------------------------------------------------------------------------
const SOURCE_COLOURS = { recent: "#3056d3", covisit: "#1a7f37", category: "#b26a00", embedding: "#8e44ad",
  trending: "#c62828" };

function renderStatus(status) {
  const parts = Object.fromEntries((status.components || []).map((c) => [c.component, c]));
  const figures = (name) => (parts[name] || {}).figures || {};
  const rates = status.rates || {};
  const jobs = (status.components || []).filter((c) => c.component.endsWith("_job"));
  const requests = status.requests || {};

  show("events_per_s", rates.events_per_s, 1);
  show("events", figures("broker").events);
  show("dead_letters", figures("dead letters").count);
  const reasons = $("#dlq-reasons");
  reasons.replaceChildren(...(figures("dead letters").newest || []).slice().reverse().map((r) =>
    el("li", {}, `${r.field || "payload"}: ${r.reason} (${r.source})`)));
  const featureAge = jobs.length ? (jobs[0].figures || {}).newest_event_age_s : undefined;
  show("feature_age", featureAge, 2);
  const api = figures("api");
  const lag = api.parameter_lag_ms === null || api.parameter_lag_ms === undefined ? null : api.parameter_lag_ms / 1000;
  show("served_version", api.served_version);
  show("parameter_lag", lag, 2);
  show("auc", figures("trainer").auc, 4);
  show("trainer_behind", figures("trainer").behind);
  show("p50", requests.p50_ms, 1);
  show("p99", requests.p99_ms, 1);
  show("requests", requests.requests);
  show("window", requests.window_s);
  show("degraded", requests.degraded);
  plot("events_per_s", rates.events_per_s);
  plot("feature_age", featureAge);
  plot("parameter_lag", lag);
  plot("p99", requests.p99_ms);

  const sources = requests.sources || {};
  const total = Object.values(sources).reduce((a, b) => a + b, 0);
  $("#sources").replaceChildren(...Object.entries(sources).filter(([, n]) => n > 0).map(([source, n]) =>
    el("span", { title: `${source}: ${n} candidates (${Math.round((100 * n) / total)} %)`,
      style: `width:${(100 * n) / total}%;background:${SOURCE_COLOURS[source] || "#999"}` })));
  $("#sources").title = total ? Object.entries(sources).map(([s, n]) => `${s} ${n}`).join(", ") : "no requests yet";

  $("#components tbody").replaceChildren(...(status.components || []).map((c) => {
    const f = c.figures || {};
    const checkpoint = f.checkpoint ? `${f.checkpoint}, ${fmt(f.checkpoint_age_s, 1)} s ago` : "";
    const details = el("td", {}, (c.details || []).join("; "));
    if (f.web_ui) details.append(" ", el("a", { href: f.web_ui, target: "_blank" }, "Flink web UI"));
    return el("tr", { "data-part": c.component }, el("td", {}, c.component), el("td", { class: c.state }, c.state),
      el("td", {}, fmt(f.behind)), el("td", {}, checkpoint), details);
  }));

  const links = $("#links");
  for (const job of jobs) {
    const url = (job.figures || {}).web_ui;
    if (url && !links.querySelector(`a[href="${url}"]`)) {
      links.append(el("a", { href: url, target: "_blank" }, `Flink: ${job.component}`));
    }
  }

  const problems = status.error ? [status.error] : [];
  for (const c of status.components || []) {
    if (c.state === "DOWN") problems.push(`${c.component} is down`);
  }
  if (figures("redis").error) problems.push(`Redis does not answer: recommendations are degraded (${figures("redis").error})`);
  if ((parts.broker?.details || []).some((d) => d.startsWith("not answering"))) problems.push("the broker does not answer");
  setHealth(problems);
  $("#updated").textContent = status.at ? `as of ${new Date(status.at).toLocaleTimeString()}` : "collecting…";
}

function setHealth(problems) {
  const pill = $("#health");
  pill.textContent = problems.length ? "degraded" : "all parts up";
  pill.className = `pill ${problems.length ? "degraded" : "ok"}`;
  const banner = $("#problem");
  banner.hidden = !problems.length;
  banner.textContent = problems.join(" · ");
}

async function pollStatus() {
  try {
    const { ok, body } = await getJSON("/status");
    if (ok && body) renderStatus(body);
    else setHealth([`GET /status answered ${body && body.detail ? body.detail : "an error"}`]);
  } catch (err) {
    setHealth([`the API does not answer (${err.message})`]);
  }
  setTimeout(pollStatus, 1000);
}

// -- try it: a click goes through POST /events, then the list is read until it changes ----------
let shown = []; // the items on screen: [{item_id, score, sources}]
let waiting = null; // the click being timed

function signature(items) {
  return items.map((i) => `${i.item_id}:${i.sources.join("+")}`).join(",");
}

async function recommendations(user) {
  const { ok, body } = await getJSON(`/recommendations?user_id=${encodeURIComponent(user)}&k=10`);
  if (!ok) throw new Error(body && body.detail ? JSON.stringify(body.detail) : "the API refused the request");
  return body;
}

function renderRecs(answer, clicked) {
  shown = answer.items;
  const note = answer.degraded ? `degraded: ${answer.degraded_reason || "Redis unavailable"} · ` : "";
  $("#try-note").textContent = `${note}scored by ${answer.scorer}, model version ${fmt(answer.model_version)}` +
    (answer.known_user ? "" : " · a user the online store does not know yet: trending items");
  $("#recs").replaceChildren(...answer.items.map((i) => el("li", { class: i.item_id === clicked ? "clicked" : "",
    "data-item": i.item_id },
  el("span", { class: "item" }, i.item_id), el("span", { class: "meta" }, `${i.score.toFixed(3)} · ${i.sources.join(", ")}`),
  el("button", { class: "link", type: "button", onclick: () => act(i.item_id) }, $("#behavior").value))));
}

async function load(event) {
  if (event) event.preventDefault();
  const user = $("#user").value.trim();
  if (!user) return;
  try {
    renderRecs(await recommendations(user));
  } catch (err) {
    $("#try-note").textContent = `could not load: ${err.message}`;
  }
}

async function act(item) {
  const user = $("#user").value.trim();
  const behavior = $("#behavior").value;
  const before = signature(shown);
  const timing = $("#try-timing");
  const started = performance.now();
  const ts = Date.now();
  const click = (waiting = { started });
  timing.className = "timing waiting";
  timing.removeAttribute("data-ms");
  timing.removeAttribute("data-changed");
  timing.textContent = `sent ${behavior} of ${item}; waiting for the recommendations to take it in…`;
  const sent = await getJSON("/events", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify([{ user_id: user, item_id: item, behavior, ts }]) });
  if (!sent.ok) {
    timing.className = "timing";
    timing.textContent = `the event was refused (${sent.status}): ${JSON.stringify(sent.body)}`;
    return;
  }
  while (waiting === click && performance.now() - started < 10000) {
    await new Promise((resolve) => setTimeout(resolve, 100));
    let answer;
    try { answer = await recommendations(user); } catch { continue; }
    // Only an answer built on the user's features as of the click counts: the list also moves
    // as trending and the model move, and that change would say nothing about this click.
    if (((answer.features || {}).user_recent ?? 0) < ts) continue;
    const ms = Math.round(performance.now() - started);
    const changed = signature(answer.items) !== before;
    renderRecs(answer, item);
    timing.className = "timing done";
    timing.dataset.ms = String(ms);
    timing.dataset.changed = changed ? "yes" : "no";
    timing.textContent = changed ? `the list changed ${ms} ms after the ${behavior} of ${item}`
      : `the ${behavior} of ${item} reached the recommendations after ${ms} ms; the same items still come first`;
    return;
  }
  if (waiting === click) {
    timing.className = "timing";
    timing.textContent = `not in the recommendations within 10 s of the ${behavior} (is the feature job behind? see Pipeline)`;
  }
}

function newUser() {
  $("#user").value = `visitor-${Math.random().toString(36).slice(2, 8)}`;
  load();
}

// -- the feature catalogue -------------------------------------------------------------------------
async function loadCatalogue() {
  const { ok, body } = await getJSON("/features");
  if (!ok) return;
  $("#catalogue tbody").replaceChildren(...body.map((v) => {
    const what = v.built_in ? `built in: ${v.features.join(", ")}`
      : [v.tags.window, v.tags.aggregation, v.tags.behaviors && `behaviors ${v.tags.behaviors}`].filter(Boolean).join(" · ");
    return el("tr", { "data-view": v.name }, el("td", {}, v.name), el("td", {}, v.join_keys.join(" + ")),
      el("td", {}, what), el("td", {}, v.owner), el("td", {}, v.description), el("td", { class: "value" }, ""));
  }));
}

async function featureValues(event) {
  event.preventDefault();
  const params = new URLSearchParams([...new FormData(event.target)].filter(([, v]) => String(v).trim()));
  const { ok, status, body } = await getJSON(`/features/values?${params}`);
  for (const cell of document.querySelectorAll("#catalogue td.value")) cell.textContent = "";
  if (!ok) {
    const first = $("#catalogue td.value");
    if (first) first.textContent = `${status}: ${typeof body?.detail === "string" ? body.detail : JSON.stringify(body?.detail)}`;
    return;
  }
  for (const [view, got] of Object.entries(body.views)) {
    const cell = $(`#catalogue tr[data-view="${view}"] td.value`);
    if (!cell) continue;
    if (got.values === null) {
      cell.textContent = "no value";
      continue;
    }
    const lines = Object.entries(got.values).map(([k, v]) =>
      el("div", { title: `${k}: ${JSON.stringify(v)}` }, `${k}: ${Array.isArray(v) ? `[${v.join(", ")}]` : fmt(v, 4)}`));
    cell.replaceChildren(...lines, el("div", { class: "legend" }, `as of event time ${new Date(got.event_ms).toLocaleString()}`));
  }
}

// -- model versions and rollback ---------------------------------------------------------------
async function loadVersions() {
  try {
    const { ok, status, body } = await getJSON("/model/versions");
    const rows = $("#versions tbody");
    if (!ok) {
      rows.replaceChildren(el("tr", {}, el("td", { colspan: "6" }, `${status}: ${body?.detail || "unavailable"}`)));
    } else if (!body.versions.length) {
      rows.replaceChildren(el("tr", {}, el("td", { colspan: "6" }, "nothing published yet (is the trainer running?)")));
    } else {
      rows.replaceChildren(...body.versions.slice().reverse().map((v) => el("tr", { "data-version": String(v.version) },
        el("td", {}, `v${v.version}${v.version === body.served ? " (served here)" : ""}${v.head ? " (newest)" : ""}`),
        el("td", {}, v.kind + (v.rollback_of ? `, rollback of v${v.rollback_of}` : "")),
        el("td", {}, new Date(v.created_ms).toLocaleString()), el("td", {}, fmt(v.examples)), el("td", {}, fmt(v.auc, 4)),
        el("td", {}, v.kind === "snapshot" && !v.head
          ? el("button", { class: "link", type: "button", onclick: () => rollback(v.version) }, "roll back to it") : ""))));
    }
  } catch { /* the API is away: the pipeline banner says so */ }
  setTimeout(loadVersions, 5000);
}

async function rollback(version) {
  const { ok, status, body } = await getJSON("/admin/rollback", { method: "POST",
    headers: { "Content-Type": "application/json", "X-API-Key": $("#admin-key").value },
    body: JSON.stringify({ version }) });
  $("#rollback-result").textContent = ok ? `published v${body.of} again as v${body.version}`
    : `${status}: ${typeof body?.detail === "string" ? body.detail : JSON.stringify(body?.detail)}`;
}

$("#try-form").addEventListener("submit", load);
$("#new-user").addEventListener("click", newUser);
$("#feature-form").addEventListener("submit", featureValues);
$("#user").value = new URLSearchParams(location.search).get("user") || `visitor-${Math.random().toString(36).slice(2, 8)}`;
pollStatus();
load();
loadCatalogue();
loadVersions();
