/* Kiln console: asks for an API key once (sessionStorage), fetches the page's body rendered
   on the server with Authorization: Bearer, shows 401/403 as such, draws the charts. */
"use strict";

const KEY = "kiln.apiKey";
const content = () => document.getElementById("content");
const authOn = () => document.body.dataset.auth === "on";
let charts = [];
let refreshTimer = null;

function apiKey() { return sessionStorage.getItem(KEY); }

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (authOn() && apiKey()) h.Authorization = "Bearer " + apiKey();
  return h;
}

function fragmentUrl() {
  const path = location.pathname.replace(/^\/ui/, "").replace(/\/$/, "");
  return "/ui/fragments" + (path === "" ? "/models" : path) + location.search;
}

function showKeyState() {
  const form = document.getElementById("key-form");
  const state = document.getElementById("key-state");
  if (!authOn()) { form.hidden = true; state.hidden = true; return; }
  form.hidden = Boolean(apiKey());
  state.hidden = !apiKey();
}

function message(kind, title, text) {
  const box = document.createElement("div");
  box.className = "message " + kind;
  box.id = kind === "error" ? "error" : "notice";
  const h = document.createElement("h1");
  h.textContent = title;
  const p = document.createElement("p");
  p.textContent = text;
  box.append(h, p);
  return box;
}

function askForKey(reason) {
  sessionStorage.removeItem(KEY);
  showKeyState();
  content().replaceChildren(message("notice", "An API key is needed",
    reason || "Enter a key from `kiln keys create` above: an admin key sees every model, a predict:<model> key that model."));
  document.getElementById("key-input").focus();
}

async function errorText(resp) {
  try { const body = await resp.json(); return body.error || JSON.stringify(body); }
  catch (_) { return resp.statusText; }
}

async function load(quiet) {
  showKeyState();
  if (authOn() && !apiKey()) { askForKey(); return; }
  let resp;
  try {
    resp = await fetch(fragmentUrl(), { headers: headers() });
  } catch (err) {
    if (!quiet) content().replaceChildren(message("error", "Kiln is not answering", String(err)));
    return;
  }
  if (resp.status === 401) {
    const text = await errorText(resp);
    sessionStorage.removeItem(KEY);
    showKeyState();
    content().replaceChildren(message("error", "401 Unauthorized", text + " — enter another key above."));
    return;
  }
  if (resp.status === 403) {
    content().replaceChildren(message("error", "403 Forbidden", await errorText(resp)));
    return;
  }
  if (!resp.ok) {
    content().replaceChildren(message("error", resp.status + " " + resp.statusText, await errorText(resp)));
    return;
  }
  const html = await resp.text();
  destroyCharts();
  content().innerHTML = html;
  drawCharts(content());
  wirePage();
}

function destroyCharts() { charts.forEach((c) => c.destroy()); charts = []; }

/* ---------------------------------------------------------------- charts */

const fmtTime = (t) => new Date(t * 1000).toISOString().slice(11, 19);

function baseOptions(extra) {
  return Object.assign({ animation: false, responsive: true, maintainAspectRatio: false,
    plugins: { legend: { position: "bottom" } } }, extra);
}

function lineDatasets(list, extra) {
  return list.map((d) => Object.assign({ fill: false, pointRadius: 2, borderWidth: 2, spanGaps: true,
    backgroundColor: d.borderColor }, d, extra || {}));
}

const builders = {
  curves(spec) {
    return { type: "line", data: { labels: spec.labels, datasets: lineDatasets(spec.datasets) },
      options: baseOptions({ scales: { x: { title: { display: true, text: spec.x_title || "epoch" } },
        loss: { type: "linear", position: "left", title: { display: true, text: "loss" } },
        score: { type: "linear", position: "right", grid: { drawOnChartArea: false },
                 title: { display: true, text: spec.score_title || "accuracy / R²" } } } }) };
  },
  series(spec) {
    return { type: "line", data: { labels: spec.t.map(fmtTime), datasets: lineDatasets(spec.datasets) },
      options: baseOptions({ plugins: { legend: { position: "bottom" }, title: { display: true, text: spec.title } } }) };
  },
  variants(spec) {
    const metric = spec.metric === "r2" ? "test R²" : "test accuracy";
    return { type: "scatter", data: { datasets: [
        { label: "versions", data: spec.points, pointRadius: 6,
          backgroundColor: spec.points.map((p) => (p.pareto ? "#d62728" : "#888")) },
        { type: "line", label: "Pareto front", data: spec.front, stepped: "after",
          borderColor: "#d62728", backgroundColor: "#d62728", pointRadius: 0, fill: false } ] },
      options: baseOptions({
        scales: { x: { type: spec.log_x ? "logarithmic" : "linear",
                       title: { display: true, text: "batch-1 latency p50 (ms)" } },
                  y: { title: { display: true, text: metric } } },
        plugins: { legend: { position: "bottom" }, tooltip: { callbacks: {
          label: (ctx) => (ctx.raw.ref || "front") + ": " + ctx.raw.y.toPrecision(4) + " at " + ctx.raw.x.toPrecision(3) + " ms" } } } }) };
  },
  trials(spec) {
    return { type: "line", data: { datasets: lineDatasets(spec.datasets) },
      options: baseOptions({ parsing: true, scales: { x: { type: "linear", title: { display: true, text: "epoch" } },
        y: { title: { display: true, text: spec.metric } } },
        plugins: { legend: { display: spec.datasets.length <= 12, position: "bottom" } } }) };
  },
  path(spec) {
    const points = spec.points.filter((p) => p.x > 0 && p.y !== null);
    return { type: "line", data: { datasets: lineDatasets([{ label: spec.metric + " over λ", data: points, borderColor: "#1f77b4" }]) },
      options: baseOptions({ scales: { x: { type: "logarithmic", title: { display: true, text: "λ" } },
        y: { title: { display: true, text: spec.metric } } } }) };
  },
  bars(spec) {
    return { type: "bar", data: { labels: spec.labels, datasets: [{ label: spec.title, data: spec.values,
        backgroundColor: spec.values.map((v) => (v >= 0 ? "#d62728" : "#1f77b4")) }] },
      options: baseOptions({ indexAxis: "y", scales: { y: { ticks: { autoSkip: false } } },
        plugins: { legend: { display: false },
        title: { display: true, text: spec.title } } }) };
  },
};

function drawChart(canvas, spec) {
  const build = builders[spec.kind];
  if (!build || typeof Chart === "undefined") return;
  charts.push(new Chart(canvas, build(spec)));
}

function drawCharts(root) {
  root.querySelectorAll("canvas[data-chart]").forEach((canvas) => {
    drawChart(canvas, JSON.parse(canvas.dataset.chart));
  });
}

/* ---------------------------------------------------------------- page behaviours */

function wirePage() {
  clearTimeout(refreshTimer);
  const monitor = document.getElementById("monitor");
  if (monitor) {
    refreshTimer = setTimeout(() => load(true), Number(monitor.dataset.refreshS) * 1000);
  }
  const form = document.getElementById("explain-form");
  if (form) {
    form.addEventListener("submit", explain);
    const select = document.getElementById("explain-row");
    const rows = JSON.parse(form.dataset.rows || "[]");
    if (select) select.addEventListener("change", () => {
      document.getElementById("explain-instance").value = JSON.stringify(rows[Number(select.value)]);
    });
  }
}

async function explain(event) {
  event.preventDefault();
  const form = event.target;
  const status = document.getElementById("explain-status");
  const source = form.querySelector("input[name=source]:checked");
  const body = { method: document.getElementById("explain-method").value };
  if (source && source.value === "row") {
    body.row = Number(document.getElementById("explain-row").value);
  } else {
    try { body.instance = JSON.parse(document.getElementById("explain-instance").value); }
    catch (_) { status.textContent = "The pasted row is not JSON: send [number, number, …]."; return; }
  }
  status.textContent = "explaining…";
  const resp = await fetch(form.dataset.url, { method: "POST",
    headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body) });
  if (!resp.ok) { status.textContent = resp.status + ": " + (await errorText(resp)); return; }
  const found = await resp.json();
  status.textContent = "prediction " + JSON.stringify(found.prediction) + " · " + found.method +
    (found.target !== null ? " · target " + JSON.stringify(found.target) : "") + " · baseline: " + found.baseline +
    (found.convergence_delta !== null ? " · convergence delta " + found.convergence_delta.toPrecision(3) : "");
  status.dataset.done = "1";
  destroyCharts();
  const canvas = document.getElementById("explain-chart");
  drawChart(canvas, { kind: "bars", title: "attribution (largest |value| first)",
    labels: found.inputs.map((name, i) => name + " = " + found.values[i].toPrecision(3)), values: found.attributions });
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("key-input");
    sessionStorage.setItem(KEY, input.value.trim());
    input.value = "";
    load();
  });
  document.getElementById("key-forget").addEventListener("click", (event) => {
    event.preventDefault();
    askForKey("Key forgotten. Enter a key to continue.");
  });
  load();
});
