// slidesam annotate: the page behind `slidesam serve` (plain ES module, no build step).
// The server holds all state (volume, label map, prompts, undo/redo history); this module shows
// slices, turns mouse gestures into API calls and polls background jobs for progress.
// Slice pixel coordinates: x = column, y = row, as in slidesam.core.prompts.

const COLOURS = [null, [255, 70, 70], [60, 200, 90], [70, 140, 255], [255, 210, 0], [220, 90, 255], [0, 215, 215]];
const PRESETS = { abdomen: [400, 40], bone: [1800, 400], lung: [1500, -600] };
const $ = (id) => document.getElementById(id);
const STROKES = ["brush", "erase", "restore"]; // tools that send an /edit stroke

const ui = {
  session: null, // the server's session dict
  slice: 0,
  wl: [400, 40],
  zoom: 1,
  pan: [0, 0],
  tool: "box",
  drag: null, // current gesture
  images: new Map(), // slice -> Float32Array
  masks: new Map(), // slice -> Uint8Array (for ui.maskVersion)
  maskVersion: -1,
  polling: null,
  pending: null, // the prompt being segmented, drawn until the job ends
  // slice pixel (x, y) -> canvas (ox + x * scale, oy + y * scale); null without a volume
  view: () => (ui.session ? layout() : null),
};
window.slidesam = ui; // for debugging and the end-to-end tests

// ---- server calls ------------------------------------------------------------------------
async function api(method, url, body) {
  const opts = { method, headers: {} };
  if (body instanceof FormData) opts.body = body;
  else if (body !== undefined) {
    opts.body = JSON.stringify(body);
    opts.headers["Content-Type"] = "application/json";
  }
  const res = await fetch(url, opts);
  const type = res.headers.get("Content-Type") || "";
  const data = type.includes("json") ? await res.json() : null;
  if (!res.ok) throw new Error((data && data.error) || `${res.status} ${res.statusText}`);
  return data;
}

function showError(err) {
  $("error-text").textContent = String(err.message || err);
  $("error").hidden = false;
  setStatus("error: " + (err.message || err));
}
function clearError() { $("error").hidden = true; }
function setStatus(text) { $("status").textContent = text; }
const sid = () => ui.session && ui.session.id;
const base = () => `/api/sessions/${sid()}`;

async function guarded(fn) {
  try { clearError(); await fn(); } catch (err) { showError(err); }
}

// ---- sessions ----------------------------------------------------------------------------
function setSession(s, { fresh = false } = {}) {
  const old = ui.session;
  ui.session = s;
  sessionStorage.setItem("slidesam-session", s.id);
  if (fresh || !old || old.id !== s.id) {
    ui.images.clear();
    ui.masks.clear();
    ui.maskVersion = s.version;
    const it = s.intensity;
    ui.wl = it.ct ? PRESETS.abdomen.slice() : [Math.max(1, it.p99 - it.p1), (it.p99 + it.p1) / 2];
    ui.zoom = 1; ui.pan = [0, 0];
    const labelled = Object.values(s.label_slices).flat();
    ui.slice = labelled.length ? labelled[Math.floor(labelled.length / 2)] : Math.floor(s.n_slices / 2);
    $("slice").max = s.n_slices - 1;
    $("case-name").textContent = `${s.name} · ${s.shape.join(" × ")} voxels · ${s.spacing.map((v) => v.toFixed(2)).join(" × ")} mm`;
  }
  if (s.version !== ui.maskVersion) { ui.masks.clear(); ui.maskVersion = s.version; }
  document.body.dataset.version = String(s.version);
  updatePanels();
  render();
}

async function refresh() { setSession(await api("GET", base())); }

async function upload(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  setStatus(`uploading ${file.name}…`);
  setSession(await api("POST", "/api/sessions", form), { fresh: true });
  setStatus(`opened ${file.name}`);
}

async function loadFileList() {
  const info = await api("GET", "/api/info");
  $("model-name").textContent = `model: ${info.model}`;
  if (!info.data_dir) return;
  const { files } = await api("GET", "/api/files");
  for (const id of ["files", "ssa-plain", "ssa-arterial"]) {
    const sel = $(id);
    sel.replaceChildren(...files.filter((f) => !f.mask).map((f) => new Option(f.path, f.path)));
  }
  const guess = (word) => files.find((f) => f.path.includes(word));
  if (guess("plain")) $("ssa-plain").value = guess("plain").path;
  if (guess("arterial")) $("ssa-arterial").value = guess("arterial").path;
  $("datadir-open").hidden = false;
  $("datadir-ssa").hidden = false;
}

// ---- jobs --------------------------------------------------------------------------------
function showProgress(job) {
  const running = job.state === "running";
  $("progress").classList.toggle("idle", !running);
  document.body.dataset.busy = running ? "1" : "0";
  $("progress-bar").style.width = `${Math.round(100 * job.progress)}%`;
  $("progress-text").textContent = job.message || job.kind;
}

function pollJob() {
  return new Promise((resolve) => {
    const tick = async () => {
      try {
        const job = await api("GET", `${base()}/job`);
        showProgress(job);
        if (job.state === "running") { ui.polling = setTimeout(tick, 150); return; }
        ui.polling = null;
        await refresh();
        if (job.state === "error") showError(new Error(job.error));
        else {
          const windows = job.windows ? `${job.windows} windows, ` : "";
          setStatus(`${job.kind} done in ${job.seconds.toFixed(1)} s (${windows}${job.encoder_passes} encoder passes)`);
        }
        resolve(job);
      } catch (err) { ui.polling = null; showProgress({ state: "done", progress: 1 }); showError(err); resolve(null); }
    };
    tick();
  });
}

async function sendPrompt(body) {
  if (!sid()) return;
  body.label = currentLabel();
  body.propagate = $("propagate").checked;
  showProgress({ state: "running", progress: 0.02, message: "queued", kind: "segment" });
  ui.pending = body;
  draw();
  try {
    await api("POST", `${base()}/prompts`, body);
    await pollJob();
  } finally { ui.pending = null; draw(); }
}

async function runSsa() {
  const pf = $("ssa-plain-file").files[0], af = $("ssa-arterial-file").files[0];
  let s;
  if (pf && af) {
    const form = new FormData();
    form.append("plain", pf, pf.name);
    form.append("arterial", af, af.name);
    s = await api("POST", "/api/sessions/ssa-upload", form);
  } else if (!$("datadir-ssa").hidden && $("ssa-plain").value && $("ssa-arterial").value) {
    s = await api("POST", "/api/sessions/ssa", { plain: $("ssa-plain").value, arterial: $("ssa-arterial").value });
  } else throw new Error("choose a plain and an arterial image first");
  $("propagate").checked = false; // corrections in SSA review are per slice
  setSession(s, { fresh: true });
  await pollJob();
}

// ---- actions ------------------------------------------------------------------------------
async function historyStep(which) {
  if (!sid()) return;
  setSession(await api("POST", `${base()}/${which}`));
  setStatus(`${which} done`);
}

async function exportMask() {
  const res = await fetch(`${base()}/export`);
  if (!res.ok) throw new Error((await res.json()).error);
  const blob = await res.blob();
  const name = (res.headers.get("Content-Disposition") || "").match(/filename="([^"]+)"/);
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name ? name[1] : "mask.nii.gz";
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  setStatus(`exported ${a.download} (${blob.size} bytes)`);
}

async function saveMask() {
  const r = await api("POST", `${base()}/save`);
  setStatus(`saved ${r.path} (${r.voxels} voxels)`);
}

async function review(slice, accepted) {
  setSession(await api("POST", `${base()}/review`, { slice, accepted }));
}

// ---- drawing -------------------------------------------------------------------------------
const canvas = $("view");
const ctx = canvas.getContext("2d");
const off = document.createElement("canvas");
const offCtx = off.getContext("2d");

function currentLabel() { return Number($("label").value || 1); }

function layout() {
  const [h, w] = ui.session.slice_shape;
  const fit = Math.min(canvas.width / w, canvas.height / h);
  const scale = fit * ui.zoom;
  return { w, h, scale, ox: (canvas.width - w * scale) / 2 + ui.pan[0], oy: (canvas.height - h * scale) / 2 + ui.pan[1] };
}

function toSlice(ev) {
  const r = canvas.getBoundingClientRect();
  const cx = (ev.clientX - r.left) * (canvas.width / r.width);
  const cy = (ev.clientY - r.top) * (canvas.height / r.height);
  const L = layout();
  return [(cx - L.ox) / L.scale, (cy - L.oy) / L.scale];
}

async function fetchSlice(kind, s) {
  const res = await fetch(`${base()}/${kind}/${s}`);
  if (!res.ok) throw new Error((await res.json()).error);
  const buf = await res.arrayBuffer();
  return kind === "image" ? new Float32Array(buf) : new Uint8Array(buf);
}

let renderToken = 0;
async function render() {
  if (!ui.session) return;
  const token = ++renderToken;
  const s = ui.slice;
  $("slice").value = s;
  $("slice-label").textContent = `slice ${s} / ${ui.session.n_slices - 1}`;
  $("wl-value").textContent = `W ${Math.round(ui.wl[0])} L ${Math.round(ui.wl[1])}`;
  try {
    if (!ui.images.has(s)) ui.images.set(s, await fetchSlice("image", s));
    const version = ui.maskVersion;
    if (!ui.masks.has(s)) {
      const m = await fetchSlice("mask", s);
      if (version === ui.maskVersion) ui.masks.set(s, m);
    }
  } catch (err) { showError(err); return; }
  if (token !== renderToken) return; // a newer render is on its way
  draw();
}

function draw() {
  const S = ui.session;
  const s = ui.slice;
  const img = ui.images.get(s);
  const mask = ui.masks.get(s);
  if (!img) return;
  const [h, w] = S.slice_shape;
  if (off.width !== w || off.height !== h) { off.width = w; off.height = h; }
  const data = offCtx.createImageData(w, h);
  const [win, lev] = ui.wl;
  const lo = lev - win / 2;
  for (let i = 0; i < w * h; i++) {
    let g = ((img[i] - lo) / win) * 255;
    g = g < 0 ? 0 : g > 255 ? 255 : g;
    let r = g, gg = g, b = g;
    const lab = mask ? mask[i] : 0;
    if (lab) {
      const c = COLOURS[((lab - 1) % (COLOURS.length - 1)) + 1];
      r = 0.55 * g + 0.45 * c[0]; gg = 0.55 * g + 0.45 * c[1]; b = 0.55 * g + 0.45 * c[2];
    }
    data.data[4 * i] = r; data.data[4 * i + 1] = gg; data.data[4 * i + 2] = b; data.data[4 * i + 3] = 255;
  }
  offCtx.putImageData(data, 0, 0);
  const L = layout();
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, L.ox, L.oy, w * L.scale, h * L.scale);
  const px = (x) => L.ox + (x + 0.5) * L.scale; // pixel centre -> canvas
  const py = (y) => L.oy + (y + 0.5) * L.scale;
  ctx.lineWidth = 2;
  for (const rec of S.review) { // SSA prompt boxes: green accepted, red rejected
    if (rec.slice !== s) continue;
    const [x0, y0, x1, y1] = rec.prompt_box;
    ctx.strokeStyle = rec.accepted || rec.reviewed ? "#2ecc71" : "#ff3b3b";
    ctx.setLineDash([4, 3]);
    ctx.strokeRect(px(x0) - L.scale / 2, py(y0) - L.scale / 2, (x1 - x0 + 1) * L.scale, (y1 - y0 + 1) * L.scale);
    ctx.setLineDash([]);
  }
  for (const p of S.prompts) {
    if (p.slice !== s) continue;
    const c = COLOURS[((p.label - 1) % (COLOURS.length - 1)) + 1];
    ctx.strokeStyle = `rgb(${c})`;
    if (p.box) {
      const [x0, y0, x1, y1] = p.box;
      ctx.strokeRect(px(x0) - L.scale / 2, py(y0) - L.scale / 2, (x1 - x0 + 1) * L.scale, (y1 - y0 + 1) * L.scale);
    }
    p.points.forEach(([x, y], k) => {
      ctx.fillStyle = p.point_labels[k] ? "#2ecc71" : "#ff3b3b";
      ctx.beginPath(); ctx.arc(px(x), py(y), 5, 0, 2 * Math.PI); ctx.fill();
      ctx.strokeStyle = "#fff"; ctx.lineWidth = 1; ctx.stroke(); ctx.lineWidth = 2;
    });
  }
  const pend = ui.pending;
  if (pend && pend.slice === s && pend.box) {
    const [x0, y0, x1, y1] = pend.box;
    ctx.strokeStyle = "#ffffff";
    ctx.setLineDash([6, 4]);
    ctx.strokeRect(px(x0) - L.scale / 2, py(y0) - L.scale / 2, (x1 - x0 + 1) * L.scale, (y1 - y0 + 1) * L.scale);
    ctx.setLineDash([]);
  }
  const d = ui.drag;
  if (d && d.kind === "box") {
    ctx.strokeStyle = "#ffffff";
    ctx.setLineDash([6, 4]);
    const [x0, y0] = d.start, [x1, y1] = d.end;
    ctx.strokeRect(L.ox + Math.min(x0, x1) * L.scale, L.oy + Math.min(y0, y1) * L.scale, Math.abs(x1 - x0) * L.scale, Math.abs(y1 - y0) * L.scale);
    ctx.setLineDash([]);
  }
  if (d && STROKES.includes(d.kind)) {
    ctx.strokeStyle = d.kind === "erase" ? "rgba(255,255,255,.8)" : d.kind === "restore" ? "rgba(120,200,255,.6)" : `rgba(${COLOURS[currentLabel()] || [255, 255, 255]},.9)`;
    ctx.lineWidth = 2 * Number($("brush").value) * L.scale;
    ctx.lineCap = "round"; ctx.lineJoin = "round";
    ctx.beginPath();
    d.points.forEach(([x, y], k) => (k ? ctx.lineTo(px(x), py(y)) : ctx.moveTo(px(x), py(y))));
    if (d.points.length === 1) ctx.lineTo(px(d.points[0][0]) + 0.1, py(d.points[0][1]));
    ctx.stroke();
    ctx.lineWidth = 2;
  }
}

function updatePanels() {
  const S = ui.session;
  $("undo").disabled = !S.can_undo;
  $("redo").disabled = !S.can_redo;
  $("history-text").textContent = [S.undo && `undo: ${S.undo}`, S.redo && `redo: ${S.redo}`].filter(Boolean).join(" · ");
  const objs = $("objects");
  const labels = Object.keys(S.label_slices);
  objs.replaceChildren();
  if (!labels.length) objs.textContent = "none yet";
  for (const k of labels) {
    const div = document.createElement("div");
    const c = COLOURS[((k - 1) % (COLOURS.length - 1)) + 1];
    const sw = document.createElement("span");
    sw.className = "swatch"; sw.style.background = `rgb(${c})`;
    const slices = S.label_slices[k];
    div.append(sw, ` label ${k}: ${S.voxels[k] || 0} voxels on ${slices.length} slices `);
    const list = document.createElement("div");
    list.className = "slices";
    list.dataset.label = k;
    for (const z of slices) {
      const a = document.createElement("a");
      a.textContent = `${z} `;
      a.onclick = () => goto(z);
      list.append(a);
    }
    div.append(list);
    objs.append(div);
  }
  const he = S.hand_edits;
  $("hand-edits").textContent = he.painted || he.erased
    ? `hand edits: ${he.painted} px painted, ${he.erased} px erased (kept over new prompts)` : "";
  $("prompts").replaceChildren(...S.prompts.map((p) => {
    const li = document.createElement("li");
    const parts = [];
    if (p.box) parts.push(`box [${p.box.map((v) => Math.round(v)).join(", ")}]`);
    if (p.points.length) parts.push(`${p.points.length} point(s)`);
    li.textContent = `label ${p.label}, slice ${p.slice}: ${parts.join(" + ")}`;
    li.onclick = () => goto(p.slice);
    return li;
  }));
  const rs = $("review-section");
  rs.hidden = !S.review.length;
  if (S.review.length) {
    const rejected = S.review.filter((r) => !r.accepted);
    const open = rejected.filter((r) => !r.reviewed).length;
    $("review-summary").textContent = `${S.review.length} prompted slices, ${rejected.length} rejected (${open} to review)`;
    const body = $("review").tBodies[0];
    body.replaceChildren(...S.review.map((r) => {
      const tr = document.createElement("tr");
      tr.className = r.accepted ? "" : r.reviewed ? "accepted-by-user" : "rejected";
      if (r.slice === ui.slice) tr.classList.add("current");
      const go = document.createElement("a");
      go.textContent = r.slice;
      go.onclick = () => goto(r.slice);
      const cells = [go, r.confidence.toFixed(2), r.accepted ? "kept" : r.reviewed ? "accepted" : `rejected → ${r.action}`];
      for (const c of cells) { const td = document.createElement("td"); td.append(c); tr.append(td); }
      const td = document.createElement("td");
      if (!r.accepted) {
        const b = document.createElement("button");
        b.textContent = r.reviewed ? "undo" : "accept";
        b.onclick = () => guarded(() => review(r.slice, !r.reviewed));
        td.append(b);
      }
      tr.append(td);
      return tr;
    }));
  }
}

function goto(s) {
  if (!ui.session) return;
  ui.slice = Math.max(0, Math.min(ui.session.n_slices - 1, s));
  render();
  if (ui.session.review.length) updatePanels();
}

// ---- gestures ------------------------------------------------------------------------------
canvas.addEventListener("contextmenu", (ev) => ev.preventDefault());
canvas.addEventListener("pointerdown", (ev) => {
  if (!ui.session || document.body.dataset.busy === "1") return;
  canvas.setPointerCapture(ev.pointerId);
  const p = toSlice(ev);
  if (ev.button === 2) ui.drag = { kind: "wl", x: ev.clientX, y: ev.clientY, wl: ui.wl.slice() };
  else if (ev.button === 1 || ui.tool === "pan") ui.drag = { kind: "pan", x: ev.clientX, y: ev.clientY, pan: ui.pan.slice() };
  else if (ui.tool === "box") ui.drag = { kind: "box", start: p, end: p };
  else if (STROKES.includes(ui.tool)) ui.drag = { kind: ui.tool, points: [p.map((v) => v - 0.5)] };
  else if (ui.tool === "point+" || ui.tool === "point-") {
    const [x, y] = p.map(Math.floor);
    const [h, w] = ui.session.slice_shape;
    if (x >= 0 && y >= 0 && x < w && y < h) guarded(() => sendPrompt({ slice: ui.slice, points: [[x, y]], point_labels: [ui.tool === "point+" ? 1 : 0] }));
  }
});
canvas.addEventListener("pointermove", (ev) => {
  const d = ui.drag;
  if (!d) return;
  if (d.kind === "wl") {
    ui.wl = [Math.max(1, d.wl[0] + (ev.clientX - d.x) * 4), d.wl[1] + (ev.clientY - d.y) * 2];
    draw();
    $("wl-value").textContent = `W ${Math.round(ui.wl[0])} L ${Math.round(ui.wl[1])}`;
  } else if (d.kind === "pan") {
    ui.pan = [d.pan[0] + ev.clientX - d.x, d.pan[1] + ev.clientY - d.y];
    draw();
  } else if (d.kind === "box") { d.end = toSlice(ev); draw(); }
  else { d.points.push(toSlice(ev).map((v) => v - 0.5)); draw(); }
});
canvas.addEventListener("pointerup", (ev) => {
  const d = ui.drag;
  ui.drag = null;
  if (!d) return;
  if (d.kind === "box") {
    const [h, w] = ui.session.slice_shape;
    const clampX = (v) => Math.max(0, Math.min(w - 1, Math.floor(v)));
    const clampY = (v) => Math.max(0, Math.min(h - 1, Math.floor(v)));
    const box = [clampX(Math.min(d.start[0], d.end[0])), clampY(Math.min(d.start[1], d.end[1])),
      clampX(Math.max(d.start[0], d.end[0])), clampY(Math.max(d.start[1], d.end[1]))];
    draw();
    if (box[2] - box[0] < 2 || box[3] - box[1] < 2) { setStatus("box too small: drag a larger box"); return; }
    guarded(() => sendPrompt({ slice: ui.slice, box }));
  } else if (STROKES.includes(d.kind)) {
    guarded(async () => {
      setSession(await api("POST", `${base()}/edit`, { slice: ui.slice, label: currentLabel(), mode: d.kind, radius: Number($("brush").value), points: d.points }));
      setStatus(`${{ brush: "painted", erase: "erased", restore: "restored the model's labels" }[d.kind]} on slice ${ui.slice}`);
    });
  } else draw();
});
canvas.addEventListener("wheel", (ev) => {
  if (!ui.session) return;
  ev.preventDefault();
  const delta = ev.deltaY || ev.deltaX; // some browsers turn Shift+wheel into a horizontal scroll
  if (!delta) return;
  if (ev.ctrlKey || ev.shiftKey) {
    ui.zoom = Math.max(0.25, Math.min(16, ui.zoom * (delta < 0 ? 1.2 : 1 / 1.2)));
    draw();
  } else goto(ui.slice + (delta > 0 ? 1 : -1));
}, { passive: false });

document.addEventListener("keydown", (ev) => {
  if (ev.target.tagName === "INPUT" && ev.target.type !== "range") return;
  const key = ev.key.toLowerCase();
  if ((ev.ctrlKey || ev.metaKey) && key === "z") { ev.preventDefault(); guarded(() => historyStep(ev.shiftKey ? "redo" : "undo")); }
  else if ((ev.ctrlKey || ev.metaKey) && key === "y") { ev.preventDefault(); guarded(() => historyStep("redo")); }
  else if (key === "arrowup" || key === "pageup") { ev.preventDefault(); goto(ui.slice - 1); }
  else if (key === "arrowdown" || key === "pagedown") { ev.preventDefault(); goto(ui.slice + 1); }
  else if (!ev.ctrlKey && !ev.metaKey) {
    const tool = { b: "box", p: "point+", n: "point-", r: "brush", e: "erase", m: "restore", h: "pan" }[key];
    if (tool) selectTool(tool);
  }
});

function selectTool(tool) {
  ui.tool = tool;
  for (const b of $("tools").querySelectorAll("button")) b.classList.toggle("active", b.dataset.tool === tool);
}

// ---- controls ------------------------------------------------------------------------------
for (let k = 1; k < COLOURS.length; k++) $("label").append(new Option(`label ${k}`, String(k)));
const paintSwatch = () => { $("label-swatch").style.background = `rgb(${COLOURS[currentLabel()]})`; };
$("label").addEventListener("change", paintSwatch);
paintSwatch();
$("tools").addEventListener("click", (ev) => { if (ev.target.dataset.tool) selectTool(ev.target.dataset.tool); });
$("presets").addEventListener("click", (ev) => {
  const p = ev.target.dataset.preset;
  if (!p || !ui.session) return;
  const it = ui.session.intensity;
  ui.wl = p === "auto" ? [Math.max(1, it.p99 - it.p1), (it.p99 + it.p1) / 2] : PRESETS[p].slice();
  render();
});
$("brush").addEventListener("input", () => { $("brush-value").textContent = $("brush").value; });
$("slice").addEventListener("input", () => goto(Number($("slice").value)));
$("zoom-in").onclick = () => { ui.zoom = Math.min(16, ui.zoom * 1.25); draw(); };
$("zoom-out").onclick = () => { ui.zoom = Math.max(0.25, ui.zoom / 1.25); draw(); };
$("zoom-fit").onclick = () => { ui.zoom = 1; ui.pan = [0, 0]; draw(); };
$("upload").addEventListener("change", () => { const f = $("upload").files[0]; if (f) guarded(() => upload(f)); });
$("open-file").onclick = () => guarded(async () => {
  setSession(await api("POST", "/api/sessions/open", { path: $("files").value }), { fresh: true });
  setStatus(`opened ${$("files").value}`);
});
$("run-ssa").onclick = () => guarded(runSsa);
$("undo").onclick = () => guarded(() => historyStep("undo"));
$("redo").onclick = () => guarded(() => historyStep("redo"));
$("export").onclick = () => guarded(exportMask);
$("save").onclick = () => guarded(saveMask);
$("error-close").onclick = clearError;

guarded(async () => {
  await loadFileList();
  const previous = sessionStorage.getItem("slidesam-session");
  if (previous) {
    try { setSession(await api("GET", `/api/sessions/${previous}`), { fresh: true }); }
    catch { sessionStorage.removeItem("slidesam-session"); }
  }
});
