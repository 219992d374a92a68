// The actserve lab page (/lab): curves and gradients, error maps, cost, registration.
// Everything it shows comes from the server's own API; the charts are uPlot (vendored,
// see scripts/vendor_lab_assets.sh). No build step: this file is served as it is.
// Test hook: window.lab.state holds what each view plotted, window.lab.charts the uPlot
// instances (their .data is what is drawn).

const uPlot = window.uPlot;
const COLORS = ["#2f5bd3", "#d8676b", "#2e9e5b", "#c48a12", "#8a4fc7", "#1b9aaa", "#555555"];
const ARTICLE = ["relu", "leaky_relu", "sigmoid", "tanh", "elu", "relu_sigmoid"];
const FIRST = ["gelu", "silu"];
const MAX_PICKS = 4;
const EXPR = "__expr__";
const PHASES = ["decode", "queue", "compute", "encode"];
const ERROR_DTYPES = ["float16", "bfloat16", "float32"];
const BYTES = { float16: 2, bfloat16: 2, float32: 4, float64: 8 };
// (fraction bits, exponent of the smallest normal number, largest finite) per dtype, as
// service/engine/numerics.py measures ULPs
const PRECISION = {
  float16: [10, -14, 65504],
  bfloat16: [7, -126, 3.3895313892515355e38],
  float32: [23, -126, 3.4028234663852886e38],
  float64: [52, -1022, Number.MAX_VALUE],
};

const lab = {
  state: { catalogue: null, curves: [], plots: 0, error: null, heatmap: null, cost: null,
    registered: [] },
  charts: {},
  timings: {},
};
window.lab = lab;
let apiKey = null; // the tab's memory only: never written to storage
let picks = FIRST.map((name) => ({ name, params: {} }));
const $ = (id) => document.getElementById(id);

// -- DOM helpers ------------------------------------------------------------------------
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k in el && typeof v !== "string") el[k] = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c);
  return el;
}

function fmt(v) {
  if (v === null || v === undefined) return "–";
  if (!Number.isFinite(v)) return String(v);
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-3) return v.toExponential(2);
  return String(Number(v.toPrecision(3)));
}

function status(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

// -- the API ----------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function parseJson(text) {
  // the server writes NaN, Infinity and -Infinity as JSON tokens (as Triton does)
  try {
    return JSON.parse(text);
  } catch {
    const quoted = text.replace(/([[,:])\s*(-?Infinity|NaN)(?=\s*[,\]}])/g, '$1"$2"');
    return JSON.parse(quoted, (k, v) => (v === "NaN" ? NaN : v === "Infinity" ? Infinity
      : v === "-Infinity" ? -Infinity : v));
  }
}

async function api(path, { method = "GET", json, body, headers = {} } = {}) {
  const hdrs = { ...headers };
  if (apiKey) hdrs.Authorization = `Bearer ${apiKey}`;
  let payload = body;
  if (json !== undefined) {
    hdrs["Content-Type"] = "application/json";
    payload = JSON.stringify(json);
  }
  const r = await fetch(path, { method, headers: hdrs, body: payload, cache: "no-store" });
  if (r.status === 401) {
    askKey(apiKey ? "the server refused this key" : "");
    throw new ApiError(401, "this server needs an API key");
  }
  if (!r.ok) {
    let message = `${r.status} ${r.statusText}`;
    try {
      const b = parseJson(await r.text());
      message = b?.error?.message ?? b?.detail ?? message;
    } catch { /* not JSON: keep the status line */ }
    throw new ApiError(r.status, message);
  }
  return r;
}

const apiJson = async (path, opts) => parseJson(await (await api(path, opts)).text());

function askKey(problem) {
  $("key-form").hidden = false;
  $("key-error").textContent = problem;
  status("This server needs an API key.", true);
}

// -- numbers ----------------------------------------------------------------------------
const f32buf = new DataView(new ArrayBuffer(4));

function toBf16(v) {
  // round to nearest even on the upper 16 bits of the float32 value (dtypes.from_float)
  f32buf.setFloat32(0, v);
  const bits = f32buf.getUint32(0);
  const rounded = ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) << 16;
  f32buf.setUint32(0, rounded >>> 0);
  return f32buf.getFloat32(0);
}

function f16bits(v) {
  // v is exactly representable (0 or a normal float16 number): its float16 bit pattern
  if (v === 0) return Object.is(v, -0) ? 0x8000 : 0;
  const sign = v < 0 ? 0x8000 : 0;
  const a = Math.abs(v);
  const e = exponent(a);
  const mant = Math.round((a / 2 ** e - 1) * 1024);
  return sign | ((e + 15) << 10) | mant;
}

function exponent(a) {
  // floor(log2(a)) for a finite a > 0, exactly
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e -= 1;
  else if (2 ** (e + 1) <= a) e += 1;
  return e;
}

function ulp(exact, dtype) {
  const [bits, emin, max] = PRECISION[dtype];
  const a = Math.min(Math.abs(exact), max);
  const e = a === 0 ? emin : Math.max(exponent(a), emin);
  return 2 ** (e - bits);
}

function ulpError(answer, exact, dtype) {
  // null where answer and exact disagree in a non-finite way (counted apart)
  if (Number.isFinite(answer) && Number.isFinite(exact)) return Math.abs(answer - exact) / ulp(exact, dtype);
  const agree = (Number.isNaN(answer) && Number.isNaN(exact)) || answer === exact;
  return agree ? 0 : null;
}

const roundTo = (dtype) => (dtype === "float64" ? (v) => v : dtype === "bfloat16" ? toBf16
  : Math.fround);

function linspace(lo, hi, n) {
  n = Math.max(2, Math.min(4001, Math.round(n)));
  return Array.from({ length: n }, (_, i) => lo + ((hi - lo) * i) / (n - 1));
}

function exactGrid(lo, hi, n) {
  // inputs every dtype holds exactly: bfloat16 numbers within float16's normal range
  const out = [];
  for (const v of linspace(Math.max(lo, -60000), Math.min(hi, 60000), n)) {
    let s = toBf16(v);
    if (Math.abs(s) < 2 ** -14) s = 0;
    if (out[out.length - 1] !== s) out.push(s);
  }
  return out;
}

function numberInput(id, fallback) {
  const v = Number($(id).value);
  return Number.isFinite(v) ? v : fallback;
}

// -- the catalogue and the pickers ------------------------------------------------------
const activation = (name) => lab.state.catalogue.activations.find((a) => a.name === name);
const named = () => lab.state.catalogue.activations.filter((a) => a.name !== "expr");

async function loadCatalogue() {
  lab.state.catalogue = await apiJson("/v1/activations");
  const cat = lab.state.catalogue;
  for (const sel of document.querySelectorAll("select.act-select")) {
    const keep = sel.value;
    sel.replaceChildren(...named().map((a) => h("option", { value: a.name, text: a.name,
      title: a.description || a.formula })));
    if (keep && activation(keep)) sel.value = keep;
  }
  for (const sel of document.querySelectorAll("select.dtype-select")) {
    const keep = sel.value || "float32";
    sel.replaceChildren(...cat.dtypes.map((d) => h("option", { value: d, text: d })));
    sel.value = keep;
  }
  const inline = activation("expr");
  $("grammar").textContent = inline?.grammar ?? "";
  renderPicks();
}

function renderPicks() {
  const box = $("picks");
  box.replaceChildren(...picks.map((p, i) => pickRow(p, i)));
  $("add-pick").disabled = picks.length >= MAX_PICKS;
}

function pickRow(pick, index) {
  const sel = h("select", { class: "act-pick", "aria-label": `activation ${index + 1}` },
    ...named().map((a) => h("option", { value: a.name, text: a.name,
      title: a.description || a.formula })),
    h("option", { value: EXPR, text: "expression…" }));
  sel.value = pick.expr !== undefined ? EXPR : activation(pick.name) ? pick.name : named()[0].name;
  const expr = h("input", { class: "expr", type: "text", value: pick.expr ?? "",
    placeholder: "relu(x) * sigmoid(x)", "aria-label": "expression", spellcheck: false });
  const err = h("span", { class: "err", "data-role": "error" });
  const params = h("span", { class: "params" });
  const desc = h("span", { class: "desc" });
  const swatch = h("span", { class: "swatch" });
  swatch.style.background = COLORS[index % COLORS.length];
  const row = h("div", { class: "pick", "data-index": String(index) }, swatch, sel, expr,
    params, desc, err, h("button", { type: "button", text: "✕", title: "remove",
      onclick: () => { picks.splice(index, 1); renderPicks(); } }));

  function refresh() {
    const isExpr = sel.value === EXPR;
    expr.hidden = !isExpr;
    err.textContent = "";
    const entry = isExpr ? null : activation(sel.value);
    desc.textContent = entry ? (entry.description || entry.formula) : "";
    params.replaceChildren(...(entry?.params ?? []).map((p) =>
      h("label", { class: "param", title: p.doc || "" }, `${p.name} `, paramInput(p, pick.params?.[p.name]))));
  }
  sel.addEventListener("change", () => { pick.params = {}; refresh(); });
  expr.addEventListener("change", () => checkExpression(expr.value, err));
  refresh();
  return row;
}

function paramInput(p, value) {
  // a float param: a number box; a string param: its choices; a bool param: a checkbox
  value = value ?? p.default;
  if (p.type === "string") {
    const sel = h("select", { "data-param": p.name, "data-type": p.type },
      ...p.choices.map((c) => h("option", { value: c, text: c })));
    sel.value = value;
    return sel;
  }
  if (p.type === "bool") return h("input", { type: "checkbox", "data-param": p.name, "data-type": p.type, checked: !!value });
  return h("input", { type: "number", step: "any", "data-param": p.name, "data-type": p.type,
    value: String(value) });
}

function paramValue(el) {
  if (el.dataset.type === "bool") return el.checked;
  if (el.dataset.type === "string") return el.value;
  return el.value === "" ? undefined : Number(el.value);
}

async function checkExpression(text, errEl) {
  // the server's grammar checks it; its message is shown in place
  errEl.textContent = "";
  if (!text.trim()) return false;
  try {
    await api("/v1/activations/expr", { method: "POST", json: { data: [0], expr: text } });
    return true;
  } catch (e) {
    errEl.textContent = e.message;
    return false;
  }
}

function readPicks() {
  return [...document.querySelectorAll("#picks .pick")].map((row) => {
    const sel = row.querySelector("select.act-pick");
    const params = {};
    const entry = activation(sel.value);
    for (const el of row.querySelectorAll("[data-param]")) {
      const v = paramValue(el);
      const spec = entry?.params.find((p) => p.name === el.dataset.param);
      if (v !== undefined && !(spec && spec.default === v)) params[el.dataset.param] = v;
    }
    if (sel.value === EXPR) return { expr: row.querySelector("input.expr").value, params: {} };
    return { name: sel.value, params };
  });
}

// -- charts -----------------------------------------------------------------------------
function drawChart(key, el, x, series, { yLabel = "", title } = {}) {
  lab.charts[key]?.destroy();
  el.replaceChildren();
  const width = Math.max(320, el.clientWidth || 640);
  const opts = {
    title, width, height: 300,
    scales: { x: { time: false } },
    axes: [{ label: "x" }, { label: yLabel }],
    series: [{ label: "x", value: (u, v) => fmt(v) }, ...series.map((s, i) => ({
      label: s.label, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: false,
      value: (u, v) => fmt(v),
    }))],
    legend: { live: true },
  };
  const data = [x, ...series.map((s) => s.values.map((v) => (Number.isFinite(v) ? v : null)))];
  lab.charts[key] = new uPlot(opts, data, el);
  el.dataset.series = String(series.length);
  return lab.charts[key];
}

// -- view: curves -----------------------------------------------------------------------
function curveRequest(pick, x, dtype, amp) {
  const json = { data: x, dtype, outputs: ["value", "grad"] };
  if (amp !== "off") Object.assign(json, { amp: true, amp_dtype: amp });
  if (pick.expr !== undefined) return { path: "/v1/activations/expr", json: { ...json, expr: pick.expr } };
  if (Object.keys(pick.params).length) json.params = pick.params;
  return { path: `/v1/activations/${encodeURIComponent(pick.name)}`, json };
}

async function plotCurves() {
  picks = readPicks();
  const dtype = $("curve-dtype").value;
  const amp = $("curve-amp").value;
  const round = roundTo(dtype);
  const x = [...new Set(linspace(numberInput("x-min", -4), numberInput("x-max", 4),
    numberInput("x-points", 201)).map(round))];
  const rows = [...document.querySelectorAll("#picks .pick")];
  $("view-curves").dataset.state = "loading";
  const answers = await Promise.allSettled(picks.map((p) => {
    const req = curveRequest(p, x, dtype, amp);
    return apiJson(req.path, { method: "POST", json: req.json }).then((a) => ({ req, a }));
  }));
  const curves = [];
  answers.forEach((res, i) => {
    const err = rows[i]?.querySelector("[data-role=error]");
    if (res.status === "rejected") {
      if (err) err.textContent = res.reason.message;
      return;
    }
    if (err) err.textContent = "";
    const { req, a } = res.value;
    const p = picks[i];
    const params = Object.entries(req.json.params ?? {}).map(([k, v]) => `${k}=${v}`).join(", ");
    const label = (p.expr !== undefined ? p.expr : p.name) + (params ? ` (${params})` : "");
    curves.push({ label, path: req.path, request: req.json, activation: a.activation, x,
      y: a.data, dy: a.grad, dtype: a.dtype });
  });
  lab.state.curves = curves;
  drawChart("y", $("chart-y"), x, curves.map((c) => ({ label: c.label, values: c.y })), { yLabel: "y" });
  drawChart("dy", $("chart-dy"), x, curves.map((c) => ({ label: c.label, values: c.dy })),
    { yLabel: "dy/dx" });
  lab.state.plots += 1;
  $("view-curves").dataset.state = "ready";
  $("view-curves").dataset.plots = String(lab.state.plots);
  if (lab.timings.firstRender === undefined) lab.timings.firstRender = performance.now();
  const failed = answers.filter((r) => r.status === "rejected").length;
  status(failed ? `${failed} of ${answers.length} curves failed: see the messages above` : "");
}

function article() {
  picks = ARTICLE.map((name) => ({ name, params: {} }));
  renderPicks();
  return plotCurves();
}

// -- view: error ------------------------------------------------------------------------
async function measureError() {
  const name = $("err-act").value;
  const ampDtype = $("err-amp").value;
  const x = exactGrid(numberInput("err-min", -8), numberInput("err-max", 8),
    numberInput("err-points", 401));
  const path = `/v1/activations/${encodeURIComponent(name)}`;
  const section = $("view-error");
  section.dataset.state = "loading";
  try {
    const exact = (await apiJson(path, { method: "POST", json: { data: x, dtype: "float64" } })).data;
    const cases = ERROR_DTYPES.flatMap((dtype) => [false, true].map((amp) => ({ dtype, amp })));
    const answers = await Promise.all(cases.map(({ dtype, amp }) => apiJson(path, {
      method: "POST", json: { data: x, dtype, report: ["numerics"],
        ...(amp ? { amp: true, amp_dtype: ampDtype } : {}) } })));
    const rows = cases.map((c, i) => {
      const a = answers[i];
      const answer = a.data.map(Math.fround); // the JSON holds float32-precision text
      const ulps = answer.map((v, j) => ulpError(v, exact[j], a.dtype));
      const finite = ulps.filter((u) => u !== null);
      const num = a.report.numerics;
      return { dtype: c.dtype, amp: c.amp ? ampDtype : "off", label: c.amp
        ? `${c.dtype} AMP ${ampDtype}` : c.dtype, ulps, max: finite.length ? Math.max(...finite) : 0,
      mismatch: ulps.length - finite.length, server: num };
    });
    lab.state.error = { activation: name, x, exact, rows };
    drawChart("err", $("chart-err"), x, rows.map((r) => ({ label: r.label, values: r.ulps })),
      { yLabel: "ULPs" });
    $("err-table").replaceChildren(
      h("tr", {}, ...["dtype", "AMP", "max ULP (page)", "max ULP (server report)",
        "non-finite mismatches", "differ from float32"].map((t) => h("th", { text: t }))),
      ...rows.map((r) => h("tr", { "data-dtype": r.dtype, "data-amp": r.amp },
        h("td", { class: "name", text: r.dtype }), h("td", { text: r.amp }),
        h("td", { text: fmt(r.max) }), h("td", { text: fmt(r.server.max_ulp_error) }),
        h("td", { text: String(r.server.nonfinite_mismatch) }),
        h("td", { text: `${r.server.differs_from_float32} / ${r.server.elements}` }))));
    section.dataset.state = "ready";
    status("");
  } catch (e) {
    section.dataset.state = "error";
    status(`error view: ${e.message}`, true);
  }
}

// -- view: accuracy heat map ------------------------------------------------------------
function heatColor(u) {
  if (!Number.isFinite(u)) return "#d9d9d9";
  const t = Math.min(1, Math.log10(1 + u) / 7); // 0 ULP .. 1e7 ULPs
  return `hsl(${Math.round(120 * (1 - t))}, 70%, ${Math.round(88 - 30 * t)}%)`;
}

async function loadHeatmap() {
  const box = $("heatmap");
  const section = $("view-heatmap");
  section.dataset.state = "loading";
  box.replaceChildren(h("p", { class: "note", text: "computing the accuracy tables…" }));
  const names = named().map((a) => a.name);
  const tables = {};
  try {
    let next = 0;
    const worker = async () => {
      while (next < names.length) {
        const name = names[next++];
        tables[name] = await apiJson(`/v1/activations/${encodeURIComponent(name)}/accuracy`);
      }
    };
    await Promise.all([worker(), worker(), worker()]);
  } catch (e) {
    section.dataset.state = "error";
    box.replaceChildren(h("p", { class: "err", "data-role": "error", text: e.message }));
    return;
  }
  const first = tables[names[0]].rows;
  const columns = first.map((r) => ({ dtype: r.dtype, amp: r.amp }));
  const dtypes = [...new Set(columns.map((c) => c.dtype))];
  const head1 = h("tr", {}, h("th", { class: "name", rowspan: "2", text: "activation" }),
    ...dtypes.map((d) => h("th", { colspan: String(columns.filter((c) => c.dtype === d).length),
      text: d })));
  const head2 = h("tr", {}, ...columns.map((c) => h("th", { text: c.amp === "off" ? "AMP off"
    : `AMP ${c.amp}` })));
  const cells = [];
  const body = names.map((name) => h("tr", {}, h("td", { class: "name", text: name }),
    ...columns.map((c) => {
      const row = tables[name].rows.find((r) => r.dtype === c.dtype && r.amp === c.amp);
      const td = h("td", { class: "cell" });
      if (!row) {
        td.classList.add("na");
        td.textContent = "–";
        return td;
      }
      const u = row.max_ulp_error;
      const href = `#curves?act=${encodeURIComponent(name)}&dtype=${c.dtype}&amp=${c.amp}`;
      const mark = row.nonfinite_mismatch ? ` (${row.nonfinite_mismatch} non-finite)` : "";
      td.append(h("a", { href, "data-cell": `${name}|${c.dtype}|${c.amp}`, "data-ulp": String(u),
        title: `${name}, ${c.dtype}, AMP ${c.amp}: ${u} ULP${mark}`, text: fmt(u) + (mark ? "*" : "") }));
      td.style.background = heatColor(u);
      cells.push({ activation: name, dtype: c.dtype, amp: c.amp, max_ulp_error: u });
      return td;
    })));
  const legend = h("div", { class: "legend" }, "ULPs:", ...[0, 0.5, 10, 1e3, 1e5, 1e7].map((u) => {
    const s = h("span", { text: fmt(u) });
    s.style.background = heatColor(u);
    return s;
  }), h("span", { class: "note", text: "* some outputs non-finite where the exact value is not" }));
  box.replaceChildren(legend, h("table", { class: "data heat" }, head1, head2, ...body));
  lab.state.heatmap = { activations: names, columns, cells };
  section.dataset.state = "ready";
}

// -- view: cost -------------------------------------------------------------------------
function inputBytes(n, dtype) {
  const values = Array.from({ length: n }, () => {
    const v = toBf16(Math.random() * 8 - 4);
    return Math.abs(v) < 2 ** -14 ? 0 : v;
  });
  if (dtype === "float32") return new Float32Array(values).buffer;
  if (dtype === "float64") return new Float64Array(values).buffer;
  const out = new Uint16Array(n);
  for (let i = 0; i < n; i++) {
    if (dtype === "float16") out[i] = f16bits(values[i]);
    else {
      f32buf.setFloat32(0, values[i]);
      out[i] = f32buf.getUint32(0) >>> 16;
    }
  }
  return out.buffer;
}

function serverTiming(header) {
  const out = {};
  for (const part of (header || "").split(",")) {
    const m = part.trim().match(/^([\w-]+);dur=([\d.]+)/);
    if (m) out[m[1]] = Number(m[2]);
  }
  return out;
}

function profileOf(response, bytes) {
  const names = (response.headers.get("X-Outputs") || "").split(",");
  const sizes = (response.headers.get("X-Output-Bytes") || "").split(",").map(Number);
  let offset = 0;
  for (let i = 0; i < names.length; i++) {
    if (names[i] === "profile") {
      return parseJson(new TextDecoder().decode(new Uint8Array(bytes, offset, sizes[i])));
    }
    offset += sizes[i];
  }
  return null;
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.floor((s.length - 1) / 2)] : null;
};

async function measureCost() {
  const name = $("cost-act").value;
  const n = Number($("cost-size").value);
  const dtype = $("cost-dtype").value;
  const count = Math.max(1, Math.min(50, numberInput("cost-count", 5)));
  const section = $("view-cost");
  section.dataset.state = "loading";
  const body = inputBytes(n, dtype);
  const base = `/v1/activations/${encodeURIComponent(name)}?shape=${n}&dtype=${dtype}`;
  const post = (query) => api(base + query, { method: "POST", body,
    headers: { "Content-Type": "application/octet-stream" } });
  const modes = activation(name)?.inplace ? [["functional", ""], ["in-place", "&inplace=true"]]
    : [["functional", ""]];
  try {
    const runs = [];
    for (const [mode, query] of modes) {
      for (let i = 0; i < count; i++) {
        const r = await post(query);
        await r.arrayBuffer();
        runs.push({ mode, run: i + 1, ...serverTiming(r.headers.get("Server-Timing")) });
      }
    }
    renderTimings(runs);
    const memory = {};
    let profile = null;
    let profileNote = "";
    for (const [mode, query] of modes) {
      try {
        const r = await post(`${query}&report=profile`);
        const prof = profileOf(r, await r.arrayBuffer());
        if (mode === "functional") profile = prof;
        memory[mode] = prof.operators.reduce((s, o) => s + Math.max(0, o.self_cpu_memory_bytes)
          + Math.max(0, o.self_device_memory_bytes), 0);
      } catch (e) {
        if (e.status !== 400) throw e;
        profileNote = e.message;
        break;
      }
    }
    renderMemory(name, n, dtype, modes.map((m) => m[0]), memory, profileNote);
    renderProfile(profile, profileNote);
    lab.state.cost = { activation: name, elements: n, dtype, runs, memory, profileNote,
      operators: profile?.operators ?? null };
    section.dataset.state = "ready";
    status("");
  } catch (e) {
    section.dataset.state = "error";
    status(`cost view: ${e.message}`, true);
  }
}

function renderTimings(runs) {
  const longest = Math.max(...runs.map((r) => PHASES.reduce((s, p) => s + (r[p] || 0), 0)), 1e-9);
  const keys = h("div", { class: "keys" }, ...PHASES.map((p) => h("span", {},
    h("i", { class: `seg-${p}` }), p)));
  const rows = runs.flatMap((r) => {
    const bar = h("div", { class: "bar" }, ...PHASES.map((p) => {
      const seg = h("span", { class: `seg-${p}`, title: `${p} ${r[p]} ms` });
      seg.style.width = `${(100 * (r[p] || 0)) / longest}%`;
      return seg;
    }));
    return [h("span", { text: `${r.mode} #${r.run}` }), bar,
      h("span", { text: `${fmt(r.total)} ms total` })];
  });
  const modes = [...new Set(runs.map((r) => r.mode))];
  const table = h("table", { class: "data" },
    h("tr", {}, h("th", { class: "name", text: "median (ms)" }),
      ...[...PHASES, "total"].map((p) => h("th", { text: p }))),
    ...modes.map((m) => h("tr", { "data-mode": m }, h("td", { class: "name", text: m }),
      ...[...PHASES, "total"].map((p) => h("td", {
        text: fmt(median(runs.filter((r) => r.mode === m).map((r) => r[p] || 0))) })))));
  $("cost-timing").replaceChildren(keys, h("div", { class: "bars" }, ...rows), table);
}

function renderMemory(name, n, dtype, modes, memory, note) {
  const out = n * BYTES[dtype];
  const rows = modes.map((m) => h("tr", { "data-mode": m }, h("td", { class: "name", text: m }),
    h("td", { text: m in memory ? memory[m].toLocaleString("en") : "–" }),
    h("td", { text: (m === "functional" ? out : 0).toLocaleString("en") })));
  const parts = [h("table", { class: "data" }, h("tr", {},
    h("th", { class: "name", text: "mode" }), h("th", { text: "allocated by the operators (profiled), bytes" }),
    h("th", { text: "expected: a new output, bytes" })), ...rows)];
  if (modes.length === 1) parts.push(h("p", { class: "note", text: `${name} has no in-place form.` }));
  if (note) parts.push(h("p", { class: "note", text: `Profiles: ${note}` }));
  $("cost-memory").replaceChildren(...parts);
}

function renderProfile(profile, note) {
  const box = $("cost-profile");
  if (!profile) {
    box.replaceChildren(h("p", { class: "note", text: note || "no profile" }));
    return;
  }
  const cols = ["name", "calls", "self_cpu_us", "cpu_total_us", "self_device_us",
    "self_cpu_memory_bytes"];
  box.replaceChildren(
    h("p", { class: "note" }, `device ${profile.device}`, profile.trace_url
      ? h("span", {}, " · ", h("a", { href: profile.trace_url, download: "", text: "Chrome trace",
        onclick: (e) => downloadTrace(e, profile.trace_url) }))
      : ""),
    h("table", { class: "data", id: "operators" },
      h("tr", {}, ...cols.map((c) => h("th", { class: c === "name" ? "name" : null, text: c }))),
      ...profile.operators.slice(0, 15).map((o) => h("tr", {}, ...cols.map((c) =>
        h("td", { class: c === "name" ? "name" : null,
          text: c === "name" ? o[c] : c.endsWith("_bytes") ? o[c].toLocaleString("en") : fmt(o[c]) }))))));
}

async function downloadTrace(event, url) {
  // with API keys the download needs the bearer token too: fetch it, save the blob
  if (!apiKey) return;
  event.preventDefault();
  try {
    const blob = await (await api(url)).blob();
    const link = h("a", { href: URL.createObjectURL(blob), download: `${url.split("/").pop()}.json` });
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  } catch (e) {
    status(`trace: ${e.message}`, true);
  }
}

// -- view: register ---------------------------------------------------------------------
function paramRow() {
  return h("div", { class: "row reg-param" },
    h("label", {}, "param ", h("input", { "data-field": "name", placeholder: "alpha", size: 10 })),
    h("label", {}, "default ", h("input", { "data-field": "default", type: "number", step: "any",
      value: "1" })),
    h("label", {}, "min ", h("input", { "data-field": "min", type: "number", step: "any" })),
    h("label", {}, "max ", h("input", { "data-field": "max", type: "number", step: "any" })),
    h("button", { type: "button", text: "✕", onclick: (e) => e.target.closest(".row").remove() }));
}

async function register(event) {
  event.preventDefault();
  const result = $("reg-result");
  result.className = "";
  result.textContent = "registering…";
  const json = { name: $("reg-name").value.trim(), expr: $("reg-expr").value };
  const params = {};
  for (const row of document.querySelectorAll("#reg-params .reg-param")) {
    const get = (f) => row.querySelector(`[data-field=${f}]`).value.trim();
    if (!get("name")) continue;
    const spec = { default: Number(get("default")) };
    if (get("min") !== "") spec.min = Number(get("min"));
    if (get("max") !== "") spec.max = Number(get("max"));
    params[get("name")] = spec;
  }
  if (Object.keys(params).length) json.params = params;
  const description = $("reg-desc").value.trim();
  if (description) json.description = description;
  try {
    const entry = await apiJson("/v1/activations", { method: "POST", json });
    lab.state.registered.push(entry.name);
    await loadCatalogue();
    result.textContent = `registered ${entry.name}: ${entry.formula}`;
    result.dataset.registered = entry.name;
  } catch (e) {
    result.className = "err";
    result.textContent = e.message;
  }
}

// -- views and start --------------------------------------------------------------------
function route() {
  const [view, query] = (location.hash.slice(1) || "curves").split("?");
  const name = document.querySelector(`section[data-view="${view}"]`) ? view : "curves";
  for (const s of document.querySelectorAll("main > section")) s.hidden = s.dataset.view !== name;
  for (const a of document.querySelectorAll("#tabs a[data-view]")) {
    a.classList.toggle("active", a.dataset.view === name);
  }
  if (!lab.state.catalogue) return;
  const q = new URLSearchParams(query || "");
  if (name === "curves" && q.get("act")) {
    picks = [{ name: q.get("act"), params: {} }];
    renderPicks();
    if (q.get("dtype")) $("curve-dtype").value = q.get("dtype");
    if (q.get("amp")) $("curve-amp").value = q.get("amp");
    plotCurves();
  } else if (name === "curves") {
    // drawn while hidden: give the charts the section's width
    for (const k of ["y", "dy"]) lab.charts[k]?.setSize({ width: $(`chart-${k}`).clientWidth, height: 300 });
  } else if (name === "heatmap" && !lab.state.heatmap && $("view-heatmap").dataset.state !== "loading") {
    loadHeatmap();
  }
}

async function start() {
  try {
    await loadCatalogue();
  } catch (e) {
    if (e.status !== 401) status(`could not load the catalogue: ${e.message}`, true);
    return;
  }
  $("key-form").hidden = true;
  status("");
  lab.timings.ready = performance.now();
  document.body.dataset.ready = "1";
  route();
  if (!location.hash.includes("act=")) await plotCurves();
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  apiKey = $("key-input").value.trim() || null;
  $("key-input").value = "";
  start();
});
$("add-pick").addEventListener("click", () => {
  picks = readPicks();
  if (picks.length < MAX_PICKS) picks.push({ name: named()[0].name, params: {} });
  renderPicks();
});
$("article").addEventListener("click", article);
$("plot").addEventListener("click", plotCurves);
$("err-run").addEventListener("click", measureError);
$("cost-run").addEventListener("click", measureCost);
$("reg-add-param").addEventListener("click", () => $("reg-params").append(paramRow()));
$("reg-form").addEventListener("submit", register);
window.addEventListener("hashchange", route);
route();
start();
