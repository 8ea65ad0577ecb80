// hutch's usage page: live sessions, per-tenant totals and a chart, read from the usage API.
// The API key is kept in this tab's sessionStorage and sent in the X-API-Key header only; a key
// given as `#key=...` in the URL fragment (which browsers never send) is moved there at once.
"use strict";

const REFRESH_MS = 5000;
const STORE = "hutch.apiKey";
const $ = (id) => document.getElementById(id);

function takeKeyFromFragment() {
  const match = /(?:^#|&)key=([^&]+)/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(STORE, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

async function api(path) {
  const response = await fetch(path, { headers: { "X-API-Key": sessionStorage.getItem(STORE) || "" } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.message || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function duration(seconds) {
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} m ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} m`;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function money(cost) {
  return `${cost.total.toFixed(6)} ${cost.currency}`;
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function fill(tableId, items, columns, emptyText) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren();
  if (!items.length) {
    const row = body.insertRow();
    const td = cell(row, emptyText, "empty");
    td.colSpan = $(tableId).querySelectorAll("th").length;
    return;
  }
  for (const item of items) {
    const row = body.insertRow();
    for (const [render, className] of columns) {
      const value = render(item);
      if (value instanceof Node) {
        const td = cell(row, "", className);
        td.appendChild(value);
      } else {
        cell(row, value, className);
      }
    }
  }
}

function badge(state) {
  const span = document.createElement("span");
  span.className = `state ${state}`;
  span.textContent = state;
  return span;
}

const SVG = "http://www.w3.org/2000/svg";
function svg(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

// Stacked bars of active and idle seconds per step, and the cost of each step as a line.
function drawChart(series) {
  const chart = $("chart");
  chart.replaceChildren();
  const width = 960, height = 240, left = 48, right = 12, top = 12, bottom = 24;
  const points = series.points;
  const plotW = width - left - right, plotH = height - top - bottom;
  const maxSeconds = Math.max(1, ...points.map((p) => p.activeSeconds + p.idleSeconds));
  const maxCost = Math.max(1e-12, ...points.map((p) => p.cost.total));
  const slot = plotW / Math.max(1, points.length);
  const barW = Math.max(1, slot * 0.8);
  for (let i = 0; i <= 4; i += 1) {
    const y = top + plotH - (plotH * i) / 4;
    chart.appendChild(svg("line", { x1: left, x2: width - right, y1: y, y2: y, class: "grid" }));
    chart.appendChild(svg("text", { x: left - 6, y: y + 4, "text-anchor": "end", class: "axis" },
      `${Math.round((maxSeconds * i) / 4)}s`));
  }
  const line = [];
  points.forEach((p, i) => {
    const x = left + i * slot + (slot - barW) / 2;
    const activeH = (plotH * p.activeSeconds) / maxSeconds;
    const idleH = (plotH * p.idleSeconds) / maxSeconds;
    if (idleH > 0) {
      chart.appendChild(svg("rect", { x, y: top + plotH - activeH - idleH, width: barW, height: idleH, fill: "#cbd5e1" }));
    }
    if (activeH > 0) {
      chart.appendChild(svg("rect", { x, y: top + plotH - activeH, width: barW, height: activeH, fill: "#2563eb" }));
    }
    line.push(`${x + barW / 2},${top + plotH - (plotH * p.cost.total) / maxCost}`);
    if (i % Math.max(1, Math.ceil(points.length / 8)) === 0) {
      const label = new Date(p.timestamp * 1000).toISOString().slice(11, 16);
      chart.appendChild(svg("text", { x: x + barW / 2, y: height - 6, "text-anchor": "middle", class: "axis" }, label));
    }
  });
  if (line.length > 1) {
    chart.appendChild(svg("polyline", { points: line.join(" "), fill: "none", stroke: "#ea580c", "stroke-width": 2 }));
  }
}

async function refresh() {
  try {
    const [me, summary, live, ended, series] = await Promise.all([
      api("/v1/tenants/me"),
      api("/v1/usage"),
      api("/v1/usage/sessions?status=Active&limit=200"),
      api("/v1/usage/sessions?status=Expired&limit=10"),
      api("/v1/usage/series?step=60"),
    ]);
    let tenants;
    try {
      tenants = (await api("/v1/usage/tenants")).tenants;
    } catch (error) {
      if (error.status !== 403) throw error;
      tenants = [{ tenantId: me.tenantId, name: me.name, liveSessions: summary.liveSessions, ...summary.totals }];
    }
    $("error").hidden = true;
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("signout").hidden = false;
    $("who").textContent = `tenant ${me.name} (${me.tenantId})`;
    const totals = summary.totals;
    $("live-count").textContent = summary.liveSessions;
    $("active-total").textContent = duration(totals.activeSeconds);
    $("idle-total").textContent = duration(totals.idleSeconds);
    $("cpu-total").textContent = `${totals.cpuSeconds.toFixed(1)} s`;
    $("cost-total").textContent = money(totals.cost);
    const p = summary.pricing;
    $("pricing").textContent =
      `Rates (${p.currency}, basis ${p.basis}): ${p.vcpuSecond} per vCPU-second, ${p.memoryGiBSecond} per GiB-second ` +
      `of memory, ${p.diskGiBSecond} per GiB-second of disk; while idle CPU ×${p.idleCpuFactor}, memory ×${p.idleMemoryFactor}.`;
    drawChart(series);
    fill("live", live.sessions, [
      [(s) => s.sessionId], [(s) => s.functionName], [(s) => badge(s.state)],
      [(s) => duration(s.activeSeconds), "num"], [(s) => duration(s.idleSeconds), "num"],
      [(s) => `${s.cpuSeconds.toFixed(2)} s`, "num"],
      [(s) => `${bytes(s.memoryAverageBytes)} / ${bytes(s.memoryPeakBytes)}`, "num"],
      [(s) => bytes(s.diskBytes), "num"], [(s) => money(s.cost), "num"],
    ], "no live sessions");
    fill("tenants", tenants, [
      [(t) => t.tenantId], [(t) => t.name], [(t) => String(t.liveSessions), "num"],
      [(t) => duration(t.activeSeconds), "num"], [(t) => duration(t.idleSeconds), "num"],
      [(t) => `${t.cpuSeconds.toFixed(1)} s`, "num"], [(t) => money(t.cost), "num"],
    ], "no tenants");
    fill("ended", ended.sessions, [
      [(s) => s.sessionId], [(s) => s.functionName], [(s) => (s.endTime || "").replace("T", " ").slice(0, 19)],
      [(s) => s.endReason || "-"], [(s) => duration(s.activeSeconds), "num"], [(s) => duration(s.idleSeconds), "num"],
      [(s) => `${s.cpuSeconds.toFixed(2)} s`, "num"], [(s) => money(s.cost), "num"],
    ], "no ended sessions");
  } catch (error) {
    $("error").textContent = `Cannot read usage: ${error.message}`;
    $("error").hidden = false;
    if (error.status === 401) showLogin();
  }
}

let timer = null;
function start() {
  refresh();
  if (timer === null) timer = setInterval(refresh, REFRESH_MS);
}

function showLogin() {
  if (timer !== null) { clearInterval(timer); timer = null; }
  $("dashboard").hidden = true;
  $("signout").hidden = true;
  $("login").hidden = false;
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(STORE, $("key").value.trim());
  $("key").value = "";
  start();
});
$("signout").addEventListener("click", () => {
  sessionStorage.removeItem(STORE);
  showLogin();
});

takeKeyFromFragment();
if (sessionStorage.getItem(STORE)) start(); else showLogin();
