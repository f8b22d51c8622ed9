// kvroute status page: polls GET /admin/status and renders it. No dependencies (works air-gapped).
"use strict";
const PHASES = ["admission", "route", "connect", "engine_queue", "engine_prefill", "other"];
const REFRESH_MS = 2000;
const $ = (sel) => document.querySelector(sel);

function fmtS(v) {
  if (v === null || v === undefined) return "–";
  return v < 1 ? (v * 1000).toFixed(v < 0.01 ? 2 : 0) + " ms" : v.toFixed(2) + " s";
}
function pct(v) { return v === null || v === undefined ? "–" : (v * 100).toFixed(0) + "%"; }
function cell(tr, text, bad) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (bad) td.className = "bad";
  tr.appendChild(td);
  return td;
}
function dl(el, pairs) {
  el.replaceChildren();
  for (const [k, v] of pairs) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v === null || v === undefined ? "–" : String(v);
    el.append(dt, dd);
  }
}

function render(s) {
  const f = s.fleet;
  $("#summary").textContent =
    `policy ${s.policy} · ${f.healthy}/${f.workers} healthy · ${(f.request_rate || 0).toFixed(1)} req/s · ` +
    `TTFT p50 ${fmtS(f.ttft_p50_s)} p99 ${fmtS(f.ttft_p99_s)} · hit ratio ${pct(f.hit_ratio)}` +
    (s.ready ? "" : " · NOT READY");
  $("#window").textContent = s.window_s;

  const body = $("#fleet tbody");
  body.replaceChildren();
  for (const w of s.workers) {
    const tr = document.createElement("tr");
    tr.dataset.worker = w.url;
    const win = w.window;
    cell(tr, w.url);
    cell(tr, w.role);
    cell(tr, w.state, w.state !== "healthy");
    cell(tr, w.circuit, w.circuit && w.circuit !== "closed");
    cell(tr, w.load.in_flight);
    cell(tr, w.load.engine_queued);
    cell(tr, w.kv_usage === null ? null : pct(w.kv_usage));
    cell(tr, w.cached_blocks);
    cell(tr, pct(win.hit_ratio));
    cell(tr, fmtS(win.ttft_p50_s));
    cell(tr, fmtS(win.ttft_p99_s), f.ttft_p50_s && win.ttft_p99_s > 3 * (f.ttft_p99_s || 0) / 2);
    cell(tr, w.blind ? "blind" : w.events ? `${w.events.events} (lag ${fmtS(w.events.lag_s)})` : "–", w.blind);
    body.appendChild(tr);
  }

  const legend = $("#legend");
  if (!legend.childElementCount) {
    for (const p of PHASES) {
      const sw = document.createElement("span"); sw.className = "swatch p-" + p;
      legend.append(sw, document.createTextNode(p.replace("_", " ")));
    }
  }
  const phases = $("#phases");
  phases.replaceChildren();
  const maxTotal = Math.max(1e-9, ...s.workers.map((w) => PHASES.reduce((a, p) => a + (w.window.p99_phases_s[p] || 0), 0)));
  for (const w of s.workers) {
    const tail = w.window.p99_phases_s;
    const total = PHASES.reduce((a, p) => a + (tail[p] || 0), 0);
    const row = document.createElement("div"); row.className = "bar-row"; row.dataset.worker = w.url;
    const name = document.createElement("span"); name.textContent = w.url;
    const bar = document.createElement("div"); bar.className = "bar";
    for (const p of PHASES) {
      const v = tail[p] || 0;
      if (!v) continue;
      const seg = document.createElement("span");
      seg.className = "p-" + p; seg.dataset.phase = p;
      seg.style.width = (100 * v / maxTotal).toFixed(2) + "%";
      seg.title = `${p}: ${fmtS(v)} (${pct(v / total)})`;
      bar.appendChild(seg);
    }
    const tot = document.createElement("span"); tot.textContent = total ? fmtS(total) : "no requests";
    row.append(name, bar, tot);
    phases.appendChild(row);
  }

  const dec = $("#decisions tbody");
  dec.replaceChildren();
  for (const d of s.decisions) {
    const tr = document.createElement("tr");
    cell(tr, d.policy); cell(tr, d.reason); cell(tr, d.count);
    dec.appendChild(tr);
  }
  dl($("#index"), [["blocks", s.index.blocks], ["in flight blocks", s.index.inflight_blocks],
    ["dropped batches", s.index.dropped_batches], ["blind workers", s.index.blind_workers.length]]);
  const r = s.replicas;
  dl($("#replicas"), r.enabled
    ? [["replica", r.replica_id], ["peers", (r.peers || []).length], ["degraded", r.degraded ? "YES" : "no"]]
    : [["sharing", "off (single replica)"]]);
  if (s.tenants) {
    const t = $("#tenants"); t.replaceChildren();
    const table = document.createElement("table");
    const head = document.createElement("tr");
    for (const h of ["tenant", "class", "admitted", "queued", "rejected", "SLO met", "mean wait"]) {
      const th = document.createElement("th"); th.textContent = h; head.appendChild(th);
    }
    table.appendChild(head);
    for (const row of s.tenants) {
      const tr = document.createElement("tr"); tr.dataset.tenant = row.tenant;
      cell(tr, row.tenant); cell(tr, row.class); cell(tr, row.admitted); cell(tr, row.queued);
      cell(tr, row.rejected, row.rejected > 0);
      cell(tr, pct(row.slo_attainment), row.slo_attainment !== null && row.slo_attainment < 0.99);
      cell(tr, fmtS(row.mean_queue_wait_s));
      table.appendChild(tr);
    }
    t.appendChild(s.tenants.length ? table : document.createTextNode("no tenant traffic yet"));
  }
}

async function refresh() {
  const headers = {};
  const token = sessionStorage.getItem("kvroute_admin_token");
  if (token) headers["Authorization"] = "Bearer " + token;
  const up = $("#updated");
  try {
    const resp = await fetch("../admin/status?window_s=60", { headers, cache: "no-store" });
    if (resp.status === 401) { $("#auth").hidden = false; throw new Error("admin token needed"); }
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
    up.dataset.state = "ok";
    up.textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    up.dataset.state = "error";
    up.textContent = "cannot refresh: " + err.message;
  }
}

$("#auth").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("kvroute_admin_token", $("#token").value);
  $("#auth").hidden = true;
  refresh();
});
refresh();
setInterval(refresh, REFRESH_MS);
