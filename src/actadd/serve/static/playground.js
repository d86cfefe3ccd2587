// actadd playground: plain JS, no dependencies. Talks to the same server's OpenAI-style API.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const state = { info: null, vectors: [] };
const COLORS = ["#2f6fde", "#c2410c", "#15803d", "#7c3aed", "#b45309", "#0e7490", "#be185d", "#4b5563"];

// -- API ------------------------------------------------------------------------------------
function headers(json = true) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = localStorage.getItem("actadd.key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, body) {
  const opts = body === undefined ? { headers: headers(false) }
    : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const res = await fetch(path, opts);
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw apiError(res.status, data);
  return data;
}

function apiError(status, data) {
  const e = new Error((data.error && data.error.message) || ("HTTP " + status));
  e.status = status;
  return e;
}

// POST with stream: true; calls onDelta(index, text) per server-sent event, resolves at [DONE].
async function stream(path, body, onDelta) {
  const res = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!res.ok) throw apiError(res.status, await res.json().catch(() => ({})));
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const payload = line.slice(6);
        if (payload === "[DONE]") return;
        const chunk = JSON.parse(payload);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const c of chunk.choices || []) {
          const text = c.delta ? c.delta.content : c.text;
          if (text) onDelta(c.index, text);
        }
      }
    }
  }
}

// -- set-up ---------------------------------------------------------------------------------
async function loadInfo() {
  try {
    state.info = await api("/v1/actadd/info");
  } catch (e) {
    $("#model-info").textContent = e.status === 401 ? "enter the server's API key →" : "error: " + e.message;
    $("#key-box").hidden = false;
    return;
  }
  const info = state.info;
  $("#key-box").hidden = !info.auth;
  $("#model-info").textContent = `${info.model} · ${info.n_layers} layers · d_model ${info.d_model}`;
  state.vectors = info.vectors;
  $("#chat").disabled = !info.chat_template;
  if (!$("#rows").children.length) addRow("xvec", { add: "Love", sub: "Hate", layer: Math.min(6, info.n_layers - 1), coeff: 5 });
  for (const row of document.querySelectorAll(".steer-row")) configureRow(row);
}

function configureRow(row) {
  const max = state.info ? state.info.n_layers - 1 : 0;
  $(".layer-range", row).max = max;
  $(".layer", row).min = -max - 1;
  $(".layer", row).max = max;
  const sel = $(".vector", row);
  const current = sel.value;
  sel.innerHTML = "";
  for (const name of state.vectors) sel.add(new Option(name, name));
  if (current) sel.value = current;
}

function addRow(kind, v = {}) {
  const row = $("#row-template").content.firstElementChild.cloneNode(true);
  row.dataset.kind = kind;
  $(".kind", row).textContent = { xvec: "add − sub", prompt: "add", vector: "vector" }[kind];
  $(".sub", row).hidden = kind !== "xvec";
  $(".add", row).hidden = kind === "vector";
  $(".vector", row).hidden = kind !== "vector";
  for (const el of row.querySelectorAll(".layer-range, .layer, .site")) el.closest("label, select").hidden = kind === "vector";
  $(".add", row).value = v.add || "";
  $(".sub", row).value = v.sub || "";
  link($(".layer-range", row), $(".layer", row), v.layer ?? 6);
  link($(".coeff-range", row), $(".coeff", row), v.coeff ?? 5);
  $(".remove", row).onclick = () => row.remove();
  $("#rows").appendChild(row);
  configureRow(row);
  return row;
}

function link(range, number, value) {
  range.value = number.value = value;
  range.oninput = () => { number.value = range.value; };
  number.oninput = () => { range.value = number.value; };
}

function steering() {
  const out = [];
  for (const row of document.querySelectorAll(".steer-row")) {
    const coeff = parseFloat($(".coeff", row).value);
    const kind = row.dataset.kind;
    if (kind === "vector") {
      if ($(".vector", row).value) out.push({ vector: $(".vector", row).value, coeff });
      continue;
    }
    const add = $(".add", row).value, sub = $(".sub", row).value;
    if (!add) continue;
    const spec = { coeff, layer: parseInt($(".layer", row).value, 10), site: $(".site", row).value };
    if (kind === "xvec" && sub) Object.assign(spec, { add, sub }); else spec.prompt = add;
    out.push(spec);
  }
  return out;
}

function describe(spec) {
  if (spec.vector) return `${spec.coeff} × ${spec.vector}`;
  const what = spec.sub ? `'${spec.add}' − '${spec.sub}'` : `'${spec.prompt}'`;
  return `${spec.coeff} × (${what}) @ layer ${spec.layer}`;
}

// -- Compare --------------------------------------------------------------------------------
function requestBody(withSteering) {
  const chat = $("#chat").checked;
  const prompt = $("#prompt").value;
  const body = {
    model: state.info ? state.info.model : undefined,
    max_tokens: parseInt($("#max-tokens").value, 10),
    temperature: parseFloat($("#temperature").value),
    top_p: parseFloat($("#top-p").value),
    frequency_penalty: parseFloat($("#freq-penalty").value),
    seed: parseInt($("#seed").value, 10),
    n: parseInt($("#n").value, 10),
    stream: true,
  };
  if (chat) body.messages = [{ role: "user", content: prompt }]; else body.prompt = prompt;
  if (withSteering) {
    body.steering = steering();
    // empty: each entry lands at its own default (prompt additions front, vectors every token)
    if ($("#location").value) body.steering_location = $("#location").value;
  }
  return [chat ? "/v1/chat/completions" : "/v1/completions", body];
}

async function runPane(el, path, body) {
  el.innerHTML = "";
  el.dataset.state = "streaming";
  const samples = [];
  const sample = (i) => {
    if (!samples[i]) {
      samples[i] = document.createElement("div");
      samples[i].className = "sample";
      if (body.prompt) {
        const p = document.createElement("span");
        p.className = "prompt";
        p.textContent = body.prompt;
        samples[i].appendChild(p);
      }
      samples[i].appendChild(document.createElement("span")).className = "completion";
      el.appendChild(samples[i]);
    }
    return samples[i].lastChild;
  };
  try {
    await stream(path, body, (i, text) => { sample(i).textContent += text; });
    el.dataset.state = "done";
  } catch (e) {
    el.dataset.state = "error";
    const err = document.createElement("div");
    err.className = "error";
    err.textContent = "error: " + e.message;
    el.appendChild(err);
  }
}

async function compare() {
  const button = $("#compare");
  const [path, steeredBody] = requestBody(true);
  const [, plainBody] = requestBody(false);
  if (!steeredBody.steering.length) { $("#status").textContent = "add a steering row first"; return; }
  $("#steer-desc").textContent = steeredBody.steering.map(describe).join(" + ") + ` · ${steeredBody.steering_location || "default location"}`;
  $("#curl").textContent = curl(path, { ...steeredBody, stream: false });
  button.disabled = true;
  $("#status").textContent = "generating…";
  const t0 = performance.now();
  // both requests at once: the server batches them into one forward pass, same seed
  await Promise.all([runPane($("#out-unsteered"), path, plainBody), runPane($("#out-steered"), path, steeredBody)]);
  $("#status").textContent = `done in ${((performance.now() - t0) / 1000).toFixed(1)} s`;
  button.disabled = false;
}

function curl(path, body) {
  const auth = localStorage.getItem("actadd.key") ? ` \\\n  -H "Authorization: Bearer $ACTADD_API_KEY"` : "";
  return `curl ${location.origin}${path} \\\n  -H "Content-Type: application/json"${auth} \\\n  -d '${JSON.stringify(body)}'`;
}

// -- Sweep ----------------------------------------------------------------------------------
const numbers = (s) => s.split(",").map((x) => x.trim()).filter(Boolean).map(Number);

async function sweep() {
  const body = {
    prompt: $("#sw-prompt").value,
    add: $("#sw-add").value,
    layers: numbers($("#sw-layers").value),
    coeffs: numbers($("#sw-coeffs").value),
    metric: $("#sw-metric").value,
    n: parseInt($("#sw-n").value, 10),
    max_tokens: parseInt($("#sw-max-tokens").value, 10),
    location: $("#sw-location").value || undefined,
    seed: parseInt($("#seed").value, 10) || 0,
  };
  if ($("#sw-sub").value) body.sub = $("#sw-sub").value;
  if (body.metric === "words") body.words = $("#sw-words").value.split(",").map((w) => w.trim()).filter(Boolean);
  const button = $("#sweep");
  button.disabled = true;
  $("#sw-status").textContent = "generating…";
  try {
    const res = await api("/v1/actadd/sweep", body);
    $("#sw-status").textContent = `${res.completions} completions in ${res.seconds} s`;
    plot(res);
    sampleTable(res);
  } catch (e) {
    $("#sw-status").textContent = "error: " + e.message;
  } finally {
    button.disabled = false;
  }
}

function svg(tag, attrs, parent) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}

function plot(res) {
  const W = 760, H = 320, m = { l: 56, r: 130, t: 16, b: 40 };
  const xs = res.coeffs, all = res.series.flatMap((s) => s.values);
  let [y0, y1] = res.metric === "sentiment" ? [-1, 1] : [0, Math.max(1, ...all)];
  const x0 = Math.min(...xs), x1 = Math.max(...xs) === x0 ? x0 + 1 : Math.max(...xs);
  const X = (x) => m.l + ((x - x0) / (x1 - x0)) * (W - m.l - m.r);
  const Y = (y) => H - m.b - ((y - y0) / (y1 - y0)) * (H - m.t - m.b);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "sweep plot" });
  const axis = { stroke: "#9aa3ad", "stroke-width": 1 };
  svg("line", { x1: m.l, y1: H - m.b, x2: W - m.r, y2: H - m.b, ...axis }, root);
  svg("line", { x1: m.l, y1: m.t, x2: m.l, y2: H - m.b, ...axis }, root);
  for (const x of xs) {
    svg("text", { x: X(x), y: H - m.b + 16, "text-anchor": "middle", "font-size": 11 }, root).textContent = x;
  }
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    svg("line", { x1: m.l, x2: W - m.r, y1: Y(y), y2: Y(y), stroke: "#eef0f3" }, root);
    svg("text", { x: m.l - 6, y: Y(y) + 4, "text-anchor": "end", "font-size": 11 }, root).textContent = +y.toFixed(2);
  }
  svg("text", { x: (m.l + W - m.r) / 2, y: H - 6, "text-anchor": "middle", "font-size": 12 }, root).textContent = "coefficient";
  const ylab = svg("text", { x: 14, y: (m.t + H - m.b) / 2, "text-anchor": "middle", "font-size": 12,
    transform: `rotate(-90 14 ${(m.t + H - m.b) / 2})` }, root);
  ylab.textContent = res.metric === "sentiment" ? "mean sentiment (VADER compound)" : "mean word count";
  res.series.forEach((s, k) => {
    const color = COLORS[k % COLORS.length];
    const pts = s.values.map((v, i) => `${X(xs[i])},${Y(v)}`).join(" ");
    svg("polyline", { points: pts, fill: "none", stroke: color, "stroke-width": 2 }, root);
    s.values.forEach((v, i) => {
      const c = svg("circle", { cx: X(xs[i]), cy: Y(v), r: 4, fill: color }, root);
      svg("title", {}, c).textContent = `${s.label}, coeff ${xs[i]}: ${v.toFixed(3)}\n` + s.samples[i].join("\n---\n");
    });
    svg("rect", { x: W - m.r + 14, y: m.t + 18 * k, width: 12, height: 12, fill: color }, root);
    svg("text", { x: W - m.r + 32, y: m.t + 18 * k + 10, "font-size": 12 }, root).textContent = s.label;
  });
  $("#plot").replaceChildren(root);
}

function sampleTable(res) {
  const table = document.createElement("table");
  const head = table.insertRow();
  head.appendChild(document.createElement("th")).textContent = "coefficient";
  for (const s of res.series) head.appendChild(document.createElement("th")).textContent = s.label;
  res.coeffs.forEach((c, i) => {
    const tr = table.insertRow();
    tr.insertCell().textContent = c;
    for (const s of res.series) tr.insertCell().textContent = s.samples[i][0];
  });
  $("#sw-samples").replaceChildren(table);
}

// -- wiring ---------------------------------------------------------------------------------
for (const tab of document.querySelectorAll(".tab")) {
  tab.onclick = () => {
    for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === tab);
    $("#panel-compare").hidden = tab.dataset.tab !== "compare";
    $("#panel-sweep").hidden = tab.dataset.tab !== "sweep";
  };
}
$("#add-row").onclick = () => addRow("xvec", { layer: 6, coeff: 5 });
$("#add-prompt-row").onclick = () => addRow("prompt", { layer: 6, coeff: 5 });
$("#add-vector-row").onclick = () => addRow("vector", { coeff: 4 });
$("#compare").onclick = compare;
$("#sweep").onclick = sweep;
$("#api-key").value = localStorage.getItem("actadd.key") || "";
$("#api-key").onchange = (e) => { localStorage.setItem("actadd.key", e.target.value); loadInfo(); };
loadInfo();
