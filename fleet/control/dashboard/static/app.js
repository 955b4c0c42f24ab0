// Fleet dashboard: polls the JSON views and redraws the active one (no page reloads).
"use strict";

// ?poll=MS overrides the refresh period (tests poll faster).
const POLL_MS = Number(new URLSearchParams(location.search).get("poll")) || 2000;
let view = "fleet";
let learningSince = 0;
let learningPoints = [];
let player = null; // {data, step, timer}

const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const fmt = (x, d = 1) => (x === null || x === undefined || Number.isNaN(x)) ? "-" : Number(x).toFixed(d);
const pct = (x) => (x === null || x === undefined) ? "-" : (100 * x).toFixed(1) + "%";
const when = (t) => t ? new Date(t * 1000).toLocaleTimeString() : "-";

async function getJSON(url) {
  const r = await fetch(url, {cache: "no-store"});
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

function show(name) {
  view = name;
  document.querySelectorAll(".view").forEach((el) => el.classList.toggle("active", el.id === `view-${name}`));
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === name));
  refresh();
}

function setOptions(select, values, keepFirst) {
  const current = select.value;
  const first = keepFirst ? select.options[0].outerHTML : "";
  const html = first + values.map((v) => `<option value="${esc(v)}">${esc(v)}</option>`).join("");
  if (select.dataset.html !== html) {
    select.innerHTML = html;
    select.dataset.html = html;
    if ([...select.options].some((o) => o.value === current)) select.value = current;
  }
}

// -- fleet ------------------------------------------------------------------------------

async function refreshFleet() {
  const d = await getJSON("/api/fleet");
  $("#ttl").textContent = fmt(d.heartbeat_ttl_s, 1);
  $("#fleet-table tbody").innerHTML = d.cells.map((c) => `
    <tr data-cell="${esc(c.cell_id)}" class="${c.alive ? "alive" : "stale"}">
      <td>${esc(c.cell_id)}</td>
      <td class="status">${c.alive ? "alive" : "STALE"}</td>
      <td>${esc(c.task)}</td>
      <td class="version">${esc(c.version_running || "-")}</td>
      <td class="shadow">${esc(c.shadow_version || "-")}</td>
      <td class="hz">${fmt(c.loop_hz, 1)}</td>
      <td class="episodes">${c.episodes}</td>
      <td>${c.episodes ? Math.round(100 * c.successes / c.episodes) + "%" : "-"}</td>
      <td class="tph">${fmt(c.takeovers_per_hour, 1)}</td>
      <td class="tpe">${fmt(c.takeovers_per_episode, 2)}</td>
      <td class="share">${pct(c.intervention_share)}</td>
      <td class="isteps">${c.intervention_steps}</td>
      <td class="spool">${esc(c.spool_chunks + " chunks, " + (c.spool_depth / 1e6).toFixed(1) + " MB")}</td>
      <td>${c.unacked_steps}</td>
      <td>${c.seconds_since_seen === null ? "-" : fmt(c.seconds_since_seen, 1) + " s ago"}</td>
      <td class="faults">${c.fault_count ?? 0}</td>
      <td class="fault">${esc(c.last_fault)}</td>
    </tr>`).join("");
}

// -- learning ---------------------------------------------------------------------------

const layout = (title, ytitle, legend = false) => ({
  title: {text: title, font: {size: 14}}, margin: {l: 50, r: 10, t: 35, b: legend ? 70 : 40},
  xaxis: {type: "date"}, yaxis: {title: {text: ytitle}}, showlegend: legend,
  legend: {orientation: "h", y: -0.2},
});

function series(key) {
  const pts = learningPoints.filter((p) => p[key] !== null && p[key] !== undefined);
  return {x: pts.map((p) => new Date(p.t * 1000)), y: pts.map((p) => p[key]), mode: "lines", name: key};
}

// The time range picker: seconds of history to show (0 = the whole run, as Redis keeps it).
function learningRange() {
  return Number($("#learning-range").value) || 0;
}

function resetLearning() {
  const range = learningRange();
  learningPoints = [];
  learningSince = range ? Date.now() / 1000 - range : 0;
  if (view === "learning") refresh();
}

// Store disk use: the server walks the store at most once a minute; ask no more often.
let storeUsageAt = 0;
const bytes = (n) => n >= 1e9 ? (n / 1e9).toFixed(2) + " GB" : (n / 1e6).toFixed(1) + " MB";

async function refreshStoreUsage() {
  if (Date.now() - storeUsageAt < 30000) return;
  storeUsageAt = Date.now();
  const d = await getJSON("/api/store");
  if (!d.available) return;
  const card = (label, value) => `<div class="card"><div class="label">${label}</div><div class="value">${esc(value)}</div></div>`;
  $("#store-disk").innerHTML = [
    card("store on disk", bytes(d.bytes)), card("episodes on disk", d.episodes),
    ...d.by_cell.slice(0, 6).map((c) => card(`cell ${c.cell}`, bytes(c.bytes))),
  ].join("");
  const days = d.growth_per_day.map((_, i) => new Date((d.at - (d.growth_per_day.length - 1 - i) * 86400) * 1000));
  const gl = layout("store growth per day (bytes of episodes ended that day)", "MB");
  Plotly.react("chart-disk", [{x: days, y: d.growth_per_day.map((b) => b / 1e6), type: "bar", name: "MB"}], gl);
}

async function refreshLearning() {
  const d = await getJSON(`/api/learning?since=${learningSince}`);
  if (d.points.length) {
    // A point's throughput is measured from the point before it (the first one has none).
    if (learningPoints.length && d.points[0].steps_per_s === null) {
      const prev = learningPoints[learningPoints.length - 1], p = d.points[0];
      p.steps_per_s = p.t > prev.t ? Math.max(0, (p.store_steps - prev.store_steps) / (p.t - prev.t)) : null;
    }
    learningPoints = learningPoints.concat(d.points);
    learningSince = d.points[d.points.length - 1].t;
  }
  refreshStoreUsage().catch((err) => console.warn("store disk use:", err.message));
  const range = learningRange();
  if (range) {
    const cutoff = d.now - range;
    learningPoints = learningPoints.filter((p) => p.t > cutoff);
  }
  if (learningPoints.length > 20000) learningPoints = learningPoints.slice(-20000);
  $("#learning-oldest").textContent = d.oldest ? new Date(d.oldest * 1000).toLocaleString() : "-";
  const s = d.stats;
  const card = (label, value) => `<div class="card"><div class="label">${label}</div><div class="value">${esc(value)}</div></div>`;
  $("#learner-summary").innerHTML = [
    card("state", s.state ?? "-"), card("updates", s.updates ?? "-"), card("loss", fmt(s.loss, 4)),
    card("updates/s", fmt(s.updates_per_s, 2)), card("replay ratio", fmt(s.replay_ratio, 2)),
    card("latest version", s.latest_version || "-"), card("store steps", d.store.steps),
    card("store episodes", d.store.episodes),
    card("quarantined episodes", s.quarantined_episodes ?? 0),
    card("episodes without the model's cameras", s.episodes_without_cameras ?? 0),
    card("steps outside the joint range", s.steps_out_of_range ?? 0),
    card("trainer restarts", s.trainer_restarts ?? 0),
  ].join("");
  Plotly.react("chart-loss", [series("loss")], layout("loss", "loss"));
  Plotly.react("chart-ups", [series("updates_per_s")], layout("updates per second", "updates/s"));
  Plotly.react("chart-throughput", [series("steps_per_s")], layout("data throughput (steps stored per second)", "steps/s"));
  Plotly.react("chart-replay", [series("replay_ratio")], layout("replay ratio (samples per inserted step)", "ratio"));
  const traces = {};
  for (const p of learningPoints) {
    for (const [version, tasks] of Object.entries(p.success || {})) {
      for (const [task, rate] of Object.entries(tasks)) {
        const name = `${task} @ ${version || "(none)"}`;
        traces[name] = traces[name] || {x: [], y: [], mode: "lines+markers", name};
        traces[name].x.push(new Date(p.t * 1000));
        traces[name].y.push(rate);
      }
    }
  }
  for (const e of d.evaluations || []) {  // held-out `fleet eval` results: markers only
    for (const [task, rate] of Object.entries(e.success)) {
      const name = `eval: ${task}`;
      traces[name] = traces[name] || {x: [], y: [], text: [], mode: "markers", marker: {symbol: "diamond", size: 10}, name};
      traces[name].x.push(new Date(e.t * 1000));
      traces[name].y.push(rate);
      traces[name].text.push(`${e.version} (${e.backend}, held-out)`);
    }
  }
  const sl = layout("success rate per task per version", "success rate", true);
  sl.yaxis.range = [0, 1.05];
  Plotly.react("chart-success", Object.values(traces), sl);
}

// -- rollout ----------------------------------------------------------------------------

const EVENT_BASE = new Set(["id", "kind", "actor", "reason", "ts"]);
const details = (e) => Object.entries(e).filter(([k]) => !EVENT_BASE.has(k)).map(([k, v]) => `${esc(k)}=${esc(v)}`).join(" ");
const eventRow = (e) => `<tr data-id="${esc(e.id)}"><td>${when(e.ts)}</td><td class="kind">${esc(e.kind)}</td><td>${esc(e.actor)}</td><td>${esc(e.reason)}</td><td>${details(e)}</td></tr>`;

async function refreshRollout() {
  const d = await getJSON("/api/rollout");
  const r = d.rollout;
  $("#rollout-mode").textContent = r.mode || "-";
  $("#rollout-stable").textContent = r.stable || "-";
  $("#rollout-candidate").textContent = r.candidate || "-";
  const list = (xs) => (xs && xs.length ? xs.join(", ") : "-");
  $("#rollout-stage").textContent = r.stage || "-";
  $("#rollout-canary").textContent = list(r.canary_cells);
  $("#rollout-cells").textContent = list(r.candidate_cells);
  $("#assign-table tbody").innerHTML = Object.entries(d.assignments).map(([cell, v]) => `
    <tr data-cell="${esc(cell)}"><td>${esc(cell)}</td><td>${esc(v || "-")}</td><td>${esc(d.running[cell] || "-")}</td><td class="shadow">${esc((d.shadow_running || {})[cell] || "-")}</td><td>${esc(d.pins[cell] || "")}</td></tr>`).join("");
  const rows = [];
  for (const [version, tasks] of Object.entries(d.success)) {
    for (const [task, c] of Object.entries(tasks)) {
      const f = ((d.interventions || {})[version] || {})[task] || {};
      rows.push(`<tr data-version="${esc(version)}" data-task="${esc(task)}"><td>${esc(version || "(none)")}</td><td>${esc(task)}</td><td>${c.episodes}</td><td>${c.successes}</td><td>${c.episodes ? fmt(c.successes / c.episodes, 2) : "-"}</td>
        <td class="auto">${c.autonomous_successes}</td><td class="takeovers">${c.takeovers}</td><td class="tph">${fmt(f.takeovers_per_hour, 1)}</td><td class="tpe">${fmt(f.takeovers_per_episode, 2)}</td>
        <td class="share">${pct(f.intervention_share)}</td><td class="hpa">${fmt(f.human_steps_per_autonomous_success, 0)}</td><td>${c.intervention_steps}</td></tr>`);
    }
  }
  $("#success-table tbody").innerHTML = rows.join("");
  const evalRows = [];
  for (const v of d.versions) {
    const e = v.evaluation;
    if (!e || !e.scores) continue;
    for (const [task, s] of Object.entries(e.scores[v.version_id] || {})) {
      const base = (e.baselines || []).map((b) => {
        const c = (e.scores[b] || {})[task];
        return c ? `${esc(b)} ${c.successes}/${c.episodes}` : "";
      }).filter(Boolean).join(", ");
      evalRows.push(`<tr data-version="${esc(v.version_id)}"><td>${esc(v.version_id)}</td><td>${esc(task)}</td><td class="eval-success">${s.successes}/${s.episodes}</td>
        <td>${fmt(s.ci95[0], 2)}-${fmt(s.ci95[1], 2)}</td><td>${fmt(s.mean_progress, 3)}</td><td>${base || "-"}</td><td>${esc(e.backend)}</td><td>${when(e.evaluated_at)}</td></tr>`);
    }
  }
  $("#eval-table tbody").innerHTML = evalRows.join("") || `<tr><td colspan="8" class="muted">no version evaluated yet (fleet eval)</td></tr>`;
  $("#shadow-table tbody").innerHTML = Object.entries(d.shadow_scores || {}).sort().map(([version, s]) => `
    <tr data-version="${esc(version)}"><td>${esc(version)}</td><td class="steps">${s.steps}</td><td class="vs-stable">${fmt(s.mean_dist_stable, 4)}</td>
    <td class="operator-steps">${s.operator_steps}</td><td class="vs-operator">${fmt(s.mean_dist_operator, 4)}</td></tr>`).join("")
    || `<tr><td colspan="5" class="muted">no shadow runs scored yet</td></tr>`;
  $("#decisions-table tbody").innerHTML = d.decisions.slice().reverse().map(eventRow).join("") || `<tr><td colspan="5" class="muted">no automatic decisions yet</td></tr>`;
  $("#events-table tbody").innerHTML = d.events.slice().reverse().map(eventRow).join("");
  const versions = d.versions.map((v) => v.version_id).reverse();
  setOptions($("#pin-cell"), Object.keys(d.assignments), false);
  setOptions($("#pin-version"), versions, false);
  setOptions($("#start-version"), versions, false);
}

async function operatorAction(path, body) {
  const out = $("#action-result");
  const token = $("#token").value;
  const headers = {"Content-Type": "application/json"};
  if (token) headers["X-Operator-Token"] = token;
  const r = await fetch(path, {method: "POST", headers, body: JSON.stringify(body)});
  const d = await r.json().catch(() => ({}));
  if (r.ok) {
    out.className = "ok";
    out.textContent = `${d.action}: done${d.result ? " (" + d.result + ")" : ""}`;
  } else {
    out.className = "error";
    out.textContent = `refused (HTTP ${r.status}): ${d.detail || r.statusText}`;
  }
  refresh();
}

// -- episodes ---------------------------------------------------------------------------

async function refreshEpisodes() {
  const q = new URLSearchParams({cell: $("#f-cell").value, task: $("#f-task").value,
    version: $("#f-version").value, outcome: $("#f-outcome").value, limit: 200});
  const [filtered, all] = await Promise.all([getJSON(`/api/episodes?${q}`), getJSON("/api/episodes?limit=1000")]);
  const uniq = (k) => [...new Set(all.episodes.map((e) => e[k]))].sort();
  setOptions($("#f-cell"), uniq("cell"), true);
  setOptions($("#f-task"), uniq("task"), true);
  setOptions($("#f-version"), uniq("version"), true);
  const sel = player ? `${player.data.cell}/${player.data.episode}` : "";
  $("#episodes-table tbody").innerHTML = filtered.episodes.map((e) => `
    <tr data-cell="${esc(e.cell)}" data-episode="${esc(e.episode)}" class="${sel === e.cell + "/" + e.episode ? "selected" : ""}">
      <td>${when(e.created_at)}</td><td>${esc(e.cell)}</td><td>${esc(e.episode)}</td><td>${esc(e.task)}</td>
      <td>${esc(e.version || "-")}</td><td class="outcome-${esc(e.outcome)}">${esc(e.outcome)}</td>
      <td>${e.n_steps}</td><td>${e.intervention_steps}</td></tr>`).join("");
}

async function openEpisode(cell, episode) {
  if (player && player.timer) clearInterval(player.timer);
  const data = await getJSON(`/api/episodes/${encodeURIComponent(cell)}/${encodeURIComponent(episode)}`);
  player = {data, step: 0, timer: null};
  $("#player").classList.remove("hidden");
  $("#player-title").textContent = `${cell} / ${episode} · ${data.task} · version ${data.version || "-"} · ${data.outcome}${data.reason ? " (" + data.reason + ")" : ""}`;
  $("#player-frames").innerHTML = Object.keys(data.cameras).map((cam) =>
    `<figure><img data-camera="${esc(cam)}" alt="${esc(cam)}"><figcaption>${esc(cam)}</figcaption></figure>`).join("");
  $("#player-step").max = Math.max(0, data.n_steps - 1);
  const traces = data.joint_pos.map((y, j) => ({x: data.time, y, mode: "lines", name: `q${j}`, line: {width: 1}}));
  // Intervention flags as a shaded step trace on a second axis.
  traces.push({x: data.time, y: data.intervention, name: "intervention", yaxis: "y2", mode: "lines",
    line: {shape: "hv", color: "rgba(230,120,0,0.8)"}, fill: "tozeroy", fillcolor: "rgba(230,120,0,0.15)"});
  Plotly.react("chart-joints", traces, {
    title: {text: "joint positions and intervention flags", font: {size: 14}},
    margin: {l: 50, r: 50, t: 35, b: 60}, xaxis: {title: {text: "s since episode start"}},
    yaxis: {title: {text: "rad"}}, yaxis2: {overlaying: "y", side: "right", range: [0, 1.2], tickvals: [0, 1],
      ticktext: ["policy", "operator"], title: {text: "intervention"}},
    shapes: [cursor(0)], legend: {orientation: "h", y: -0.22, font: {size: 9}},
  });
  seek(0);
  refreshEpisodes();
}

function cursor(t) {
  return {type: "line", x0: t, x1: t, yref: "paper", y0: 0, y1: 1, line: {color: "#1d2329", width: 1, dash: "dot"}};
}

function seek(step) {
  if (!player) return;
  const d = player.data;
  player.step = Math.max(0, Math.min(step, d.n_steps - 1));
  $("#player-step").value = player.step;
  $("#player-pos").textContent = `${player.step + 1} / ${d.n_steps}`;
  $("#player-flag").textContent = d.intervention[player.step] ? "operator intervening" : "policy";
  document.querySelectorAll("#player-frames img").forEach((img) => {
    img.src = `/api/episodes/${encodeURIComponent(d.cell)}/${encodeURIComponent(d.episode)}/frames/${encodeURIComponent(img.dataset.camera)}/${player.step}`;
  });
  Plotly.relayout("chart-joints", {shapes: [cursor(d.time[player.step] || 0)]});
}

function togglePlay() {
  if (!player) return;
  if (player.timer) {
    clearInterval(player.timer);
    player.timer = null;
    $("#btn-play").textContent = "Play";
    return;
  }
  $("#btn-play").textContent = "Pause";
  player.timer = setInterval(() => {
    if (player.step >= player.data.n_steps - 1) return togglePlay();
    seek(player.step + 1);
  }, 100);
}

// -- wiring -----------------------------------------------------------------------------

async function refresh() {
  try {
    if (view === "fleet") await refreshFleet();
    else if (view === "learning") await refreshLearning();
    else if (view === "rollout") await refreshRollout();
    else if (view === "episodes" && !(player && player.timer)) await refreshEpisodes();
    $("#updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    $("#updated").textContent = `update failed: ${err.message}`;
  }
}

document.querySelectorAll("nav a").forEach((a) => a.addEventListener("click", () => show(a.dataset.view)));
$("#btn-promote").addEventListener("click", () => operatorAction("/api/rollout/promote", {reason: "promoted from the dashboard"}));
$("#btn-rollback").addEventListener("click", () => operatorAction("/api/rollout/rollback", {reason: "rolled back from the dashboard"}));
$("#btn-pin").addEventListener("click", () => operatorAction("/api/rollout/pin", {cell: $("#pin-cell").value, version: $("#pin-version").value}));
$("#btn-unpin").addEventListener("click", () => operatorAction("/api/rollout/pin", {cell: $("#pin-cell").value, version: ""}));
$("#btn-start").addEventListener("click", () => operatorAction("/api/rollout/start", {
  version: $("#start-version").value,
  shadow: $("#start-shadow").checked,
  canary: /^\s*\d+\s*$/.test($("#start-canary").value) ? Number($("#start-canary").value)
    : $("#start-canary").value.split(",").map((s) => s.trim()).filter(Boolean),
}));
$("#learning-range").addEventListener("change", resetLearning);
["#f-cell", "#f-task", "#f-version", "#f-outcome"].forEach((s) => $(s).addEventListener("change", refreshEpisodes));
$("#episodes-table tbody").addEventListener("click", (ev) => {
  const tr = ev.target.closest("tr[data-episode]");
  if (tr) openEpisode(tr.dataset.cell, tr.dataset.episode);
});
$("#player-step").addEventListener("input", (ev) => seek(Number(ev.target.value)));
$("#btn-play").addEventListener("click", togglePlay);

show((location.hash || "#fleet").slice(1) || "fleet");
setInterval(refresh, POLL_MS);
