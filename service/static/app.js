// Web page of the pgolf evaluation service. Plain JS, no dependencies: the page must work offline.
// It only uses the public API: /limits, /whoami, /evaluations, /evaluations/{id}/events (NDJSON), /evaluate.
//
// The API token is asked for once and kept in sessionStorage (this tab only, gone when it closes), and sent as
// "Authorization: Bearer ..." on every request. There are no cookies, so no other site can act with it. A link
// may carry it as "#token=..." (a fragment never reaches the server): the page moves it to sessionStorage and
// removes it from the address. Event streams are read with fetch (EventSource cannot send the header).
"use strict";

const TERMINAL = new Set(["end", "timeout", "error"]);
const EVENT_TYPES = new Set(["queued", "requeued", "start", "chunk", "end", "timeout", "error"]);
const TOKEN_KEY = "pgolf-token";
const MAX_STREAM_RETRIES = 5;
const SVG_NS = "http://www.w3.org/2000/svg";
const CHART = { width: 640, height: 280, left: 56, right: 16, top: 16, bottom: 36 };

const state = {
  limits: null,
  user: null,         // {user, admin, reads} from /whoami
  jobId: null,
  stream: null,       // AbortController of the selected job's event stream
  totalChunks: null,  // from the start event
  points: [],         // one per chunk event: {index, running, chunk}
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

function fmt(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return Number.isInteger(value) ? value.toLocaleString("en") : value.toFixed(digits);
  return String(value);
}

// ---------------------------------------------------------------------------------------------------------------
// token

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  return fetch(path, { ...options, headers, credentials: "omit" });
}

function takeTokenFromFragment() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (!fragment.has("token")) return;
  sessionStorage.setItem(TOKEN_KEY, fragment.get("token"));
  history.replaceState(null, "", location.pathname + location.search);
}

async function checkToken() {
  const who = $("who");
  state.user = null;
  if (!token()) {
    who.textContent = "no token: reading only";
    who.className = "muted";
    return;
  }
  const response = await api("/whoami");
  if (response.ok) {
    state.user = await response.json();
    who.textContent = `signed in as ${state.user.user}${state.user.admin ? " (admin)" : ""} · token kept for this tab only`;
    who.className = "muted";
  } else {
    who.textContent = "this token is not valid here";
    who.className = "error";
  }
}

async function saveToken(event) {
  event.preventDefault();
  const value = $("token").value.trim();
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
  $("token").value = "";
  await checkToken();
  refreshQueue();
}

// ---------------------------------------------------------------------------------------------------------------
// limits and upload

async function loadLimits() {
  const response = await api("/limits");
  state.limits = await response.json();
  const l = state.limits;
  $("limits").textContent =
    `artifact cap ${l.max_artifact_bytes.toLocaleString("en")} bytes · evaluation limit ${l.eval_limit_seconds} s · ` +
    `${l.workers ? `${l.workers} worker(s)` : "workers on other machines"}, queue bound ${l.queue_bound} · tokenizer ${l.tokenizer_sha256.slice(0, 12)}…`;
  $("max-seconds").max = String(l.eval_limit_seconds);
  $("max-seconds").placeholder = String(l.eval_limit_seconds);
  fillModeChoices(l);
}

// Every mode the engine has, with the measured default preselected (GET /limits lists both).
function fillModeChoices(l) {
  const defaults = l.default_options || {};
  const labels = { "hashed-940": "hashed-940 (comparison only, never compliant)" };
  $("ngram").replaceChildren(...(l.ngram_modes || []).map((mode) =>
    el("option", mode === defaults.ngram ? { value: mode, selected: "" } : { value: mode },
      (labels[mode] || mode) + (mode === defaults.ngram ? " (default)" : ""))));
  $("ttt-recipe").replaceChildren(...(l.ttt_recipes || []).map((recipe) =>
    el("option", recipe === defaults.ttt_recipe ? { value: recipe, selected: "" } : { value: recipe },
      recipe + (recipe === defaults.ttt_recipe ? " (default)" : ""))));
  if (typeof defaults.ttt === "boolean") $("ttt").checked = defaults.ttt;
}

async function upload(event) {
  event.preventDefault();
  const message = $("upload-message");
  const file = $("artifact").files[0];
  if (!file) return;
  if (!token()) {
    message.textContent = "enter your API token first (uploads need one)";
    message.className = "error";
    return;
  }
  if (state.limits && file.size > state.limits.max_artifact_bytes) {
    message.textContent = `${file.name} is ${file.size.toLocaleString("en")} bytes, over the cap`;
    message.className = "error";
    return;
  }
  const form = new FormData();
  form.append("ttt", $("ttt").checked ? "true" : "false");
  if ($("ttt-recipe").value) form.append("ttt_recipe", $("ttt-recipe").value);
  if ($("ngram").value) form.append("ngram", $("ngram").value);
  if ($("max-seconds").value) form.append("max_seconds", $("max-seconds").value);
  form.append("artifact", file);
  const query = $("force").checked ? "?wait=false&force=true" : "?wait=false";
  message.textContent = `uploading ${file.name}…`;
  message.className = "";
  $("upload-button").disabled = true;
  try {
    const response = await api(`/evaluate${query}`, { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) {
      const retry = response.headers.get("Retry-After");
      message.textContent = `${response.status} ${body.code || ""}: ${body.message || JSON.stringify(body)}` +
        (retry ? ` (retry in ${retry} s)` : "");
      message.className = "error";
      return;
    }
    message.textContent = body.reused ? `already evaluated: job ${body.id}` : `queued as job ${body.id}`;
    selectJob(body.id);
    refreshQueue();
  } catch (error) {
    message.textContent = `upload failed: ${error}`;
    message.className = "error";
  } finally {
    $("upload-button").disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// queue

function jobBpb(job) {
  if (job.result && job.result.val_bpb !== undefined) return job.result.val_bpb;
  if (job.result && job.result.partial_val_bpb !== undefined) return job.result.partial_val_bpb;
  return job.progress ? job.progress.running_bpb : null;
}

async function refreshQueue() {
  let jobs;
  try {
    const response = await api("/evaluations?limit=25");
    if (!response.ok) {
      $("queue-message").textContent = response.status === 401 ? "jobs are private here: enter your token" : "";
      return;
    }
    $("queue-message").textContent = "";
    jobs = await response.json();
  } catch (error) {
    return; // the service is restarting; the next tick retries
  }
  const body = $("queue").tBodies[0];
  body.replaceChildren();
  for (const job of jobs) {
    const row = el("tr", { "data-job-id": job.id, class: job.id === state.jobId ? "selected" : "" });
    row.append(el("td", {}, job.id));
    const status = el("td");
    status.append(el("span", { class: `status status-${job.status}` },
      job.status + (job.queue_position ? ` #${job.queue_position}` : "")));
    row.append(status);
    row.append(el("td", {}, job.owner || "–"));
    row.append(el("td", {}, job.created_at.replace("T", " ").slice(0, 19)));
    const recipe = job.options.ttt && job.options.ttt_recipe ? ` (${job.options.ttt_recipe})` : "";
    row.append(el("td", {}, `ttt=${job.options.ttt}${recipe} ngram=${job.options.ngram}`));
    row.append(el("td", {}, fmt(jobBpb(job))));
    row.addEventListener("click", () => selectJob(job.id));
    body.append(row);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// selected job: live events, chart, final table

function selectJob(jobId) {
  if (state.stream) state.stream.abort();
  state.jobId = jobId;
  state.points = [];
  state.totalChunks = null;
  history.replaceState(null, "", `?job=${encodeURIComponent(jobId)}`);
  $("job-panel").hidden = false;
  $("job-id").textContent = jobId;
  setStatus("queued", "");
  $("final-table").tBodies[0].replaceChildren();
  $("compliance-badge").hidden = true;
  $("compliance-details").hidden = true;
  $("log-details").hidden = true;
  drawChart();
  const controller = new AbortController();
  state.stream = controller;
  followEvents(jobId, controller.signal);
}

// Reads the job's NDJSON stream from event `after + 1` on; line n is event n, so a dropped connection resumes
// where it stopped. A refusal (4xx) or too many failures ends the attempts: the page never loops forever.
async function followEvents(jobId, signal) {
  let after = -1;
  let failures = 0;
  while (!signal.aborted && failures < MAX_STREAM_RETRIES) {
    let response;
    try {
      response = await api(`/evaluations/${encodeURIComponent(jobId)}/events?after=${after}`, { signal });
    } catch (error) {
      if (signal.aborted) return;
      failures += 1;
      await sleep(2000);
      continue;
    }
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      setStatus("unavailable", `${response.status} ${body.code || ""}: ${body.message || ""}`);
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffered += decoder.decode(value, { stream: true });
        let newline;
        while ((newline = buffered.indexOf("\n")) >= 0) {
          const line = buffered.slice(0, newline);
          buffered = buffered.slice(newline + 1);
          if (!line.trim()) continue;
          after += 1;
          let event;
          try {
            event = JSON.parse(line);
          } catch (error) {
            continue; // the service writes strict JSON; anything else is not an event
          }
          if (!EVENT_TYPES.has(event.type)) continue;
          handleEvent(event);
          if (TERMINAL.has(event.type)) {
            loadJobDetails(jobId);
            return;
          }
        }
      }
      failures = 0; // the stream ended before the terminal event (the service restarted): resume
    } catch (error) {
      if (signal.aborted) return;
      failures += 1;
    }
    await sleep(2000);
  }
  if (!signal.aborted) setStatus("unavailable", "the event stream keeps failing; reload the page to retry");
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function handleEvent(event) {
  if (event.type === "queued") {
    setStatus("queued", event.queue_position ? `position ${event.queue_position} in the queue` : "");
  } else if (event.type === "requeued") { // its worker was lost: the next attempt starts from the first chunk
    state.points = [];
    drawChart();
    setStatus("queued", `requeued: ${event.message || event.reason || "its worker was lost"}`);
  } else if (event.type === "start") {
    state.totalChunks = event.chunks ?? null;
    setStatus("running", `${fmt(event.targets)} targets, ${fmt(event.bytes)} bytes in ${fmt(event.chunks)} chunks`);
  } else if (event.type === "chunk") {
    state.points.push({ index: event.index, running: event.running_bpb, chunk: event.chunk_bpb });
    drawChart();
    setStatus("running", `chunk ${event.index + 1}${state.totalChunks ? ` of ${state.totalChunks}` : ""}, ` +
      `running bpb ${fmt(event.running_bpb)}`);
  } else if (event.type === "end") {
    setStatus("completed", "");
    showFinal(event);
  } else if (event.type === "timeout") {
    setStatus("timeout", event.reason || "");
    showFinal(event);
  } else if (event.type === "error") {
    setStatus(event.code === "cancelled" ? "cancelled" : "failed", event.reason || event.code || "");
    showFinal(event);
  }
}

function setStatus(status, reason) {
  const badge = $("job-status");
  badge.textContent = status;
  badge.className = `status status-${status}`;
  $("job-reason").textContent = reason;
}

function showFinal(event) {
  const rows = [
    ["val_bpb", event.val_bpb ?? event.partial_val_bpb],
    ["val_loss", event.val_loss ?? event.partial_val_loss],
    ["targets scored", event.targets_scored],
    ["bytes", event.bytes],
    ["chunks", event.chunks_done ?? state.points.length],
    ["elapsed (s)", event.elapsed_s],
  ];
  if (event.type !== "end") rows[0][0] = "partial val_bpb";
  if (event.type !== "end") rows[1][0] = "partial val_loss";
  const body = $("final-table").tBodies[0];
  body.replaceChildren();
  for (const [name, value] of rows) {
    const row = el("tr");
    row.append(el("th", {}, name), el("td", {}, fmt(value, 6)));
    body.append(row);
  }
  showCompliance(event.compliance);
}

function showCompliance(compliance) {
  const badge = $("compliance-badge");
  if (!compliance) {
    badge.hidden = true;
    return;
  }
  const verdict = compliance.compliant;
  badge.hidden = false;
  badge.textContent = verdict === true ? "compliant" : verdict === false ? "not compliant" : "compliance unknown";
  badge.className = `badge ${verdict === true ? "badge-ok" : verdict === false ? "badge-bad" : "badge-unknown"}`;
  const body = $("compliance-table").tBodies[0];
  body.replaceChildren();
  for (const [key, value] of Object.entries(compliance)) {
    const row = el("tr");
    row.append(el("th", {}, key), el("td", {}, typeof value === "object" ? JSON.stringify(value) : fmt(value, 6)));
    body.append(row);
  }
  $("compliance-details").hidden = false;
}

async function loadJobDetails(jobId) {
  const response = await api(`/evaluations/${encodeURIComponent(jobId)}`);
  if (!response.ok || jobId !== state.jobId) return;
  const job = await response.json();
  const about = [job.reason, job.worker_id ? `worker ${job.worker_id}` : null].filter(Boolean);
  if (about.length) $("job-reason").textContent = about.join(" · ");
  if (job.log_tail) {
    $("log-tail").textContent = job.log_tail;
    $("log-details").hidden = false;
  }
  refreshQueue();
}

function drawChart() {
  const chart = $("chart");
  chart.replaceChildren();
  const { width, height, left, right, top, bottom } = CHART;
  const plotted = state.points.filter((p) => typeof p.running === "number");
  chart.append(svg("rect", { x: left, y: top, width: width - left - right, height: height - top - bottom,
    class: "plot-area" }));
  if (plotted.length === 0) {
    chart.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "axis-label" },
      "waiting for the first chunk…"));
    return;
  }
  const values = plotted.flatMap((p) => [p.running, p.chunk].filter((v) => typeof v === "number"));
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (hi - lo < 1e-6) { lo -= 0.05; hi += 0.05; }
  const pad = (hi - lo) * 0.08;
  lo -= pad; hi += pad;
  const lastIndex = Math.max(state.totalChunks ? state.totalChunks - 1 : 0, ...plotted.map((p) => p.index), 1);
  const x = (index) => left + (index / lastIndex) * (width - left - right);
  const y = (value) => top + (1 - (value - lo) / (hi - lo)) * (height - top - bottom);

  for (const fraction of [0, 0.5, 1]) {
    const value = lo + fraction * (hi - lo);
    chart.append(svg("line", { x1: left, x2: width - right, y1: y(value), y2: y(value), class: "grid" }));
    chart.append(svg("text", { x: left - 6, y: y(value) + 4, "text-anchor": "end", class: "axis-label" },
      value.toFixed(3)));
  }
  chart.append(svg("text", { x: (left + width - right) / 2, y: height - 8, "text-anchor": "middle",
    class: "axis-label" }, "chunk"));
  chart.append(svg("text", { x: left, y: height - 8, class: "axis-label" }, "0"));
  chart.append(svg("text", { x: width - right, y: height - 8, "text-anchor": "end", class: "axis-label" },
    String(lastIndex)));

  chart.append(svg("polyline", { points: plotted.map((p) => `${x(p.index)},${y(p.running)}`).join(" "),
    class: "running-line" }));
  for (const p of plotted) {
    if (typeof p.chunk === "number") {
      chart.append(svg("rect", { x: x(p.index) - 2, y: y(p.chunk) - 2, width: 4, height: 4, class: "chunk-mark" }));
    }
    const point = svg("circle", { cx: x(p.index), cy: y(p.running), r: 3.5, class: "chart-point",
      "data-chunk-index": p.index, "data-running-bpb": p.running });
    point.append(svg("title", {}, `chunk ${p.index}: running ${fmt(p.running)}, chunk ${fmt(p.chunk)}`));
    chart.append(point);
  }
}

// ---------------------------------------------------------------------------------------------------------------

async function init() {
  takeTokenFromFragment();
  $("upload-form").addEventListener("submit", upload);
  $("token-form").addEventListener("submit", saveToken);
  await checkToken().catch(() => {});
  await loadLimits().catch(() => { $("limits").textContent = "limits unavailable"; });
  await refreshQueue();
  setInterval(refreshQueue, 3000);
  const requested = new URLSearchParams(location.search).get("job");
  if (requested) selectJob(requested);
  // The comparison panel is independent: whatever it meets (private reads, no jobs) must not stop the page.
  if (window.pgolfCompare) await window.pgolfCompare.init().catch(() => {});
}

init();
