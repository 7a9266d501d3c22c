// livekv's browser page: a camera or a video file in, frames sent over a stream's WebSocket at a chosen rate,
// questions asked at any time, answers streamed back token by token.
//
// With "Compare with full" on (and a method other than full chosen) the page opens a second session with method
// `full` and sends it the same encoded frames: the memory chart then plots what each session really holds (the
// fast tier's used bytes from the server's stats events), not an estimate. Questions go to both sessions.
//
// Everything the page measures is kept in `window.livekv` (the series behind the charts included).
"use strict";

const $ = (id) => document.getElementById(id);
const state = window.livekv = {
  info: null,        // GET page.json
  running: false,
  streams: [],       // {role: "method" | "full", label, id, ws, record, open}
  sent: 0,           // frames sent (to each session alike)
  skipped: 0,        // frames not sent because a socket was still busy with earlier ones
  t0: 0,
  series: {},        // per session role, a point per stats event: {t, used, reserved, tokens, ingested}; and
                     // "rate", a point a second: {t, sent, ingested, sent_fps, ingested_fps}
  answers: [],       // {id, question, replies: {role: {text, ttft_ms, page_ttft_ms, done, error}}}
};
let media = null, frameReady = false, captureTimer = 0, sampleTimer = 0, questionCount = 0;

// --- the server ----------------------------------------------------------------------------------------------------
function headers() {
  const key = $("key").value.trim();
  return key ? {"Authorization": `Bearer ${key}`} : {};
}

async function api(method, path, body) {
  const init = {method, headers: {...headers()}};
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((data.error && data.error.message) || `${method} ${path}: HTTP ${r.status}`);
  return data;
}

function socketUrl(id) {
  const url = new URL(`v1/streams/${id}/ws`, location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const key = $("key").value.trim();
  if (key) url.searchParams.set("api_key", key);
  return url.href;
}

// --- the video source ----------------------------------------------------------------------------------------------
function sourceKind() {
  return document.querySelector("input[name=source]:checked").value;
}

function closeSource() {
  const video = $("video");
  if (media) media.getTracks().forEach((t) => t.stop());
  media = null;
  video.pause();
  video.srcObject = null;
  if (video.src) { URL.revokeObjectURL(video.src); video.removeAttribute("src"); video.load(); }
  frameReady = false;
  $("placeholder").hidden = false;
}

async function openSource() {
  closeSource();
  const video = $("video"), camera = sourceKind() === "camera";
  if (camera) {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error("this browser gives no camera to this page: open it over https or on localhost");
    }
    const id = $("camera").value;
    media = await navigator.mediaDevices.getUserMedia({audio: false, video: id ? {deviceId: {exact: id}} : true});
    video.srcObject = media;
    listCameras();
  } else {
    const file = $("file").files[0];
    if (!file) throw new Error("choose a video file first");
    video.src = URL.createObjectURL(file);
  }
  video.controls = !camera;
  $("placeholder").hidden = true;
  watchFrames(video);
  if (camera || state.running) await video.play().catch(() => {});  // a file waits for Start
}

// A video element may report data before it has painted a frame (a canvas would then read black): frames are taken
// only once one was presented.
function watchFrames(video) {
  if ("requestVideoFrameCallback" in video) video.requestVideoFrameCallback(() => { frameReady = true; });
  else video.addEventListener("playing", () => { frameReady = true; }, {once: true});
}

async function listCameras() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.enumerateDevices) return;
  const select = $("camera"), chosen = select.value;
  const cameras = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === "videoinput");
  select.replaceChildren(new Option("default camera", ""));
  cameras.forEach((d, i) => select.add(new Option(d.label || `camera ${i + 1}`, d.deviceId)));
  select.value = chosen;
}

// --- frames out ----------------------------------------------------------------------------------------------------
function grabSize(video) {
  const size = state.info && state.info.frame_size;
  if (size) return [size[1], size[0]];  // the model's input (width, height): the server would resize to it anyway
  const scale = Math.min(1, 640 / Math.max(video.videoWidth, video.videoHeight));
  return [Math.round(video.videoWidth * scale), Math.round(video.videoHeight * scale)];
}

function capture() {
  const video = $("video");
  const live = video.srcObject !== null;
  if (!state.running || !frameReady || video.readyState < 2 || (!live && (video.paused || video.ended))) return;
  const sockets = state.streams.filter((s) => s.open);
  if (!sockets.length) return;
  if (sockets.some((s) => s.ws.bufferedAmount > (1 << 20))) { state.skipped++; return; }
  const canvas = $("grab"), [w, h] = grabSize(video);
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(video, 0, 0, w, h);
  canvas.toBlob(async (blob) => {
    if (!blob || !state.running) return;
    const data = await blob.arrayBuffer();
    sockets.forEach((s) => s.open && s.ws.send(data));
    state.sent++;
    render();
  }, $("format").value, 0.92);
}

// --- sessions ------------------------------------------------------------------------------------------------------
async function start() {
  if (state.running) return;
  message("");
  const method = $("method").value, rate = Number($("rate").value) || 2;
  const memory = $("memory").value.trim();
  try {
    setStatus("starting");
    $("start").disabled = true;
    if (!media && !$("video").currentSrc) await openSource();
    const spec = {method, fps: rate, source: {type: "push"}};
    if (memory) spec.memory_tokens = Number(memory);
    const roles = [{role: "method", label: method, spec}];
    if ($("compare").checked && method !== "full" && state.info.methods.includes("full")) {
      roles.push({role: "full", label: "full", spec: {method: "full", fps: rate, source: {type: "push"}}});
    }
    resetSession();
    for (const r of roles) {
      const record = await api("POST", "v1/streams", r.spec);
      state.streams.push({role: r.role, label: r.label, id: record.id, record, ws: null, open: false});
    }
    await Promise.all(state.streams.map(connect));
    state.running = true;
    state.t0 = performance.now();
    captureTimer = setInterval(capture, 1000 / rate);
    sampleTimer = setInterval(sample, 1000);
    const video = $("video");
    if (!video.srcObject) await video.play().catch(() => {});
    setStatus("live");
    $("stop").disabled = false;
    columns();
    message(`${state.streams.map((s) => `${s.label}: ${s.id}`).join(", ")}`);
  } catch (e) {
    await stop();
    setStatus("error");
    message(e.message || String(e), true);
  } finally {
    $("start").disabled = state.running;
  }
}

function connect(stream) {
  return new Promise((resolve, reject) => {
    const ws = stream.ws = new WebSocket(socketUrl(stream.id));
    ws.binaryType = "arraybuffer";
    ws.onopen = () => { stream.open = true; resolve(); };
    ws.onmessage = (e) => onEvent(stream, JSON.parse(e.data));
    ws.onclose = (e) => {
      const was = stream.open;
      stream.open = false;
      if (!was) reject(new Error(`WebSocket refused (${e.code}${e.reason ? `: ${e.reason}` : ""})`));
      else if (state.running) { message(`the ${stream.label} session's connection closed (${e.code})`, true); stop(); }
    };
  });
}

async function stop() {
  const wasRunning = state.running;
  state.running = false;
  clearInterval(captureTimer);
  clearInterval(sampleTimer);
  const streams = state.streams.slice();
  streams.forEach((s) => { s.open = false; if (s.ws) s.ws.close(); });
  await Promise.all(streams.filter((s) => s.id).map((s) => api("DELETE", `v1/streams/${s.id}`).catch(() => {})));
  if (media) closeSource();  // the camera is released (Start opens it again); a file stays where it was, paused
  else $("video").pause();
  $("stop").disabled = true;
  $("start").disabled = false;
  if (wasRunning) setStatus("stopped");
}

function resetSession() {
  state.streams = [];
  state.sent = state.skipped = 0;
  state.series = {rate: []};
  render();
}

function onEvent(stream, event) {
  if (event.type === "stats") {
    stream.record = event;
    (state.series[stream.role] = state.series[stream.role] || []).push({
      t: (performance.now() - state.t0) / 1000, used: event.memory.fast.used, reserved: event.memory.fast.reserved,
      tokens: event.memory.tokens, ingested: event.frames.ingested});
    drawCharts();
  } else if (event.type === "frames") {
    stream.record = {...stream.record, frames: event.frames};
  } else if (event.type === "answer.delta" || event.type === "answer.done" || (event.type === "error" && event.id)) {
    onAnswer(stream, event);
    return;
  } else if (event.type === "error") {
    message(`${stream.label}: ${event.message}`, true);
  }
  render();
}

// The rates, a point a second: frames sent by the page and ingested by the chosen method's session.
function sample() {
  const main = state.streams.find((s) => s.role === "method");
  if (!main) return;
  const rate = state.series.rate, prev = rate[rate.length - 1] || {t: 0, sent: 0, ingested: 0};
  const t = (performance.now() - state.t0) / 1000, dt = t - prev.t;
  const point = {t, sent: state.sent, ingested: main.record.frames.ingested};
  point.sent_fps = dt > 0 ? (point.sent - prev.sent) / dt : 0;
  point.ingested_fps = dt > 0 ? (point.ingested - prev.ingested) / dt : 0;
  rate.push(point);
  drawCharts();
}

// --- questions -----------------------------------------------------------------------------------------------------
function ask(question) {
  question = question.trim();
  if (!question) return;
  if (!state.running) { message("start a session first", true); return; }
  const id = `q${++questionCount}`, entry = {id, question, replies: {}};
  // the embedded model answers in a word or two; another model gets room for a sentence
  const maxTokens = Math.min(state.info.questions ? 16 : 128, state.info.max_tokens);
  state.answers.unshift(entry);
  const li = document.createElement("li");
  li.dataset.id = id;
  li.append(el("div", "q", question));
  for (const s of state.streams.filter((x) => x.open)) {
    const row = el("div", "a");
    row.dataset.role = s.role;
    row.append(el("span", "who", s.label), el("span", "text", ""), el("span", "meta", ""));
    li.append(row);
    entry.replies[s.role] = {text: "", ttft_ms: null, page_ttft_ms: null, done: false, error: null,
                             sent_at: performance.now(), row};
    s.ws.send(JSON.stringify({type: "ask", question, id, max_tokens: maxTokens}));
  }
  $("answers").prepend(li);
}

function onAnswer(stream, event) {
  const entry = state.answers.find((a) => a.id === event.id);
  const reply = entry && entry.replies[stream.role];
  if (!reply) return;
  const text = reply.row.querySelector(".text"), meta = reply.row.querySelector(".meta");
  if (event.type === "answer.delta") {
    if (reply.page_ttft_ms === null) reply.page_ttft_ms = performance.now() - reply.sent_at;
    reply.text += event.delta;
    text.textContent = reply.text.trim();
    meta.textContent = `first token after ${fmtMs(reply.page_ttft_ms)}`;
  } else if (event.type === "answer.done") {
    reply.text = event.answer;
    reply.ttft_ms = event.ttft_ms;
    reply.done = true;
    text.textContent = event.answer.trim() || "(empty)";
    meta.textContent = `TTFT ${fmtMs(event.ttft_ms)} (server), ${fmtMs(reply.page_ttft_ms)} (page) · ` +
                       `${event.frames_ingested} frames ingested`;
  } else {
    reply.error = event.message;
    reply.done = true;
    text.classList.add("error");
    text.textContent = event.message;
  }
}

function showQuestions(questions) {
  if (!questions) { $("forms-box").hidden = true; $("free-text").hidden = false; return; }
  const forms = $("forms"), known = $("known");
  for (const [kind, template] of Object.entries(questions.templates)) {
    const li = el("li");
    li.dataset.kind = kind;
    const parts = template.split(/(\{\w+\})/).filter(Boolean);
    const selects = [];
    for (const part of parts) {
      const slot = part.match(/^\{(\w+)\}$/);
      if (slot) {
        const select = document.createElement("select");
        select.setAttribute("aria-label", slot[1]);
        questions.slots[slot[1]].forEach((v) => select.add(new Option(v)));
        selects.push([slot[1], select]);
        li.append(select);
      } else {
        li.append(document.createTextNode(part.trim()));
      }
    }
    const button = el("button", "small", "Ask");
    button.type = "button";
    button.dataset.kind = kind;
    button.onclick = () => {
      const values = Object.fromEntries(selects.map(([k, s]) => [k, s.value]));
      const q = template.replace(/\{(\w+)\}/g, (_, k) => values[k]);
      $("question").value = q;
      ask(q);
    };
    li.append(button);
    forms.append(li);
    for (const q of expand(template, questions.slots)) known.append(new Option(q));
  }
}

function expand(template, slots) {
  const slot = template.match(/\{(\w+)\}/);
  if (!slot) return [template];
  return slots[slot[1]].flatMap((v) => expand(template.replace(slot[0], v), slots));
}

// --- what the page shows -------------------------------------------------------------------------------------------
// The counters table: one column per session (the chosen method's, and full's when it is compared).
function columns() {
  const compared = state.running ? state.streams.length > 1
    : $("compare").checked && !$("compare").disabled && $("method").value !== "full";
  $("counters").classList.toggle("single", !compared);
  $("col-method").textContent = state.running ? state.streams[0].label : $("method").value;
}

function render() {
  const cells = {method: "k", full: "f"};
  for (const [role, attr] of Object.entries(cells)) {
    const s = state.streams.find((x) => x.role === role), r = s && s.record;
    const set = (k, v) => { const td = document.querySelector(`[data-${attr}="${k}"]`); if (td) td.textContent = v; };
    set("sent", s ? state.sent + (state.skipped ? ` (${state.skipped} skipped)` : "") : "·");
    set("ingested", r ? r.frames.ingested : "·");
    set("dropped", r ? r.frames.dropped : "·");
    set("queued", r ? r.frames.queued : "·");
    set("fast", r && r.memory ? `${fmtBytes(r.memory.fast.used)} of ${fmtBytes(r.memory.fast.reserved)}` : "·");
    set("host", r && r.memory ? fmtBytes(r.memory.host.used) : "·");
    set("tokens", r && r.memory ? r.memory.tokens : "·");
    set("ingest_fps", r && r.ingest_fps ? `${r.ingest_fps.toFixed(0)} frames/s` : "·");
  }
}

function drawCharts() {
  const s = state.series, main = state.streams.find((x) => x.role === "method");
  const name = main ? main.label : $("method").value;
  const memory = [{label: name, color: "--accent", points: (s.method || []).map((p) => [p.t, p.used])}];
  if (s.full) memory.push({label: "full", color: "--full", dashed: true, points: s.full.map((p) => [p.t, p.used])});
  chart($("memory-chart"), $("memory-legend"), memory, fmtBytes, 1024);
  const rate = s.rate || [];
  chart($("fps-chart"), $("fps-legend"), [
    {label: "sent", color: "--full", dashed: true, points: rate.map((p) => [p.t, p.sent_fps])},
    {label: `ingested (${name})`, color: "--accent", points: rate.map((p) => [p.t, p.ingested_fps])},
  ], (v) => `${Number(v.toFixed(1))}`);
}

// A line chart drawn by hand: time (s) across, values up from 0, the newest value in the legend. ``unit``: the
// value grid steps are nice multiples of it (1024 for bytes, 1 otherwise).
function chart(canvas, legend, lines, fmt, unit = 1) {
  const css = getComputedStyle(document.documentElement);
  const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
  if (!w || !h) return;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const c = canvas.getContext("2d");
  c.scale(dpr, dpr);
  c.clearRect(0, 0, w, h);
  const all = lines.flatMap((l) => l.points);
  const tMax = Math.max(10, ...all.map((p) => p[0])), vMax = Math.max(0, ...all.map((p) => p[1]));
  const scale = unit > 1 && vMax > 0 ? Math.pow(unit, Math.max(0, Math.floor(Math.log(vMax) / Math.log(unit)))) : 1;
  const yStep = niceStep((vMax || 1) / scale / 4) * scale, yMax = Math.max(1, Math.ceil(vMax / yStep)) * yStep;
  const left = 62, right = 10, top = 8, bottom = 20;
  const x = (t) => left + (t / tMax) * (w - left - right), y = (v) => h - bottom - (v / yMax) * (h - top - bottom);
  c.font = "11px system-ui, sans-serif";
  c.fillStyle = css.getPropertyValue("--muted");
  c.strokeStyle = css.getPropertyValue("--line");
  c.lineWidth = 1;
  c.textAlign = "right";
  c.textBaseline = "middle";
  for (let v = 0; v <= yMax * (1 + 1e-9); v += yStep) {
    c.beginPath(); c.moveTo(left, y(v)); c.lineTo(w - right, y(v)); c.stroke();
    if (all.length) c.fillText(fmt(v), left - 6, y(v));
  }
  c.textAlign = "center";
  c.textBaseline = "top";
  const tStep = niceStep(tMax / 5);
  for (let t = 0; t <= tMax + 1e-9; t += tStep) c.fillText(`${Math.round(t)} s`, x(t), h - bottom + 4);
  for (const line of lines) {
    c.strokeStyle = css.getPropertyValue(line.color);
    c.lineWidth = 2;
    c.setLineDash(line.dashed ? [6, 4] : []);
    c.beginPath();
    line.points.forEach(([t, v], i) => (i ? c.lineTo(x(t), y(v)) : c.moveTo(x(t), y(v))));
    c.stroke();
  }
  c.setLineDash([]);
  legend.replaceChildren(...lines.map((l) => {
    const last = l.points[l.points.length - 1];
    const span = el("span", l.dashed ? "dashed" : "", `${l.label}: ${last ? fmt(last[1]) : "·"}`);
    span.style.setProperty("--c", `var(${l.color})`);
    return span;
  }));
}

// 1, 2 or 5 times a power of ten, at least v.
function niceStep(v) {
  const e = Math.pow(10, Math.floor(Math.log10(v))), m = v / e;
  return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * e;
}

function fmtBytes(b) {
  if (b === null || b === undefined) return "·";
  const [v, u] = b < 1024 ? [b, "B"] : b < 1024 * 1024 ? [b / 1024, "KiB"] : [b / 1024 / 1024, "MiB"];
  return `${Number(v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0))} ${u}`;
}

function fmtMs(ms) {
  return ms === null || ms === undefined ? "·" : `${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms`;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function message(text, error = false) {
  $("message").textContent = text;
  $("message").classList.toggle("error", error);
}

function setStatus(text) {
  $("status").textContent = text;
  $("status").className = `pill ${text === "live" ? "live" : text === "error" ? "error" : ""}`;
}

// --- start-up ------------------------------------------------------------------------------------------------------
async function init() {
  state.info = await (await fetch("page.json")).json();
  const methods = $("method");
  state.info.methods.forEach((m) => methods.add(new Option(m)));
  if (!state.info.methods.length) message("this server has no video model (--vlm none)", true);
  $("key-row").hidden = !state.info.api_key_required;
  showQuestions(state.info.questions);
  $("start").onclick = start;
  $("stop").onclick = stop;
  $("ask-form").onsubmit = (e) => { e.preventDefault(); ask($("question").value); };
  const reopen = () => openSource().catch((e) => message(e.message || String(e), true));
  for (const radio of document.querySelectorAll("input[name=source]")) {
    radio.onchange = () => { if (!state.running) reopen(); };
  }
  $("camera").onchange = () => { if (!state.running) reopen(); };
  $("file").onchange = () => {
    document.querySelector("input[name=source][value=file]").checked = true;
    if (!state.running) reopen();
  };
  $("compare").disabled = !state.info.methods.includes("full");
  $("compare").onchange = $("method").onchange = () => { if (!state.running) columns(); drawCharts(); };
  columns();
  window.addEventListener("resize", drawCharts);
  window.addEventListener("pagehide", () => state.streams.forEach((s) =>
    fetch(`v1/streams/${s.id}`, {method: "DELETE", headers: headers(), keepalive: true})));
  render();
  drawCharts();
  listCameras();
}

init().catch((e) => { setStatus("error"); message(`could not start the page: ${e.message || e}`, true); });
