// VBAR VRAM monitor: a bottom-panel tab with live allocator numbers, and the report text on
// the VBAR VRAM Monitor node. Data: GET /vbar/stats and "vbar.stats" events the pack pushes
// (at most twice a second, only when the allocator changed).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TAB_ID = "vbar-monitor";
// Same colours as vram/report.py's residency map.
const COLOURS = { H: "rgb(167,112,255)", R: "rgb(63,185,80)", S: "rgb(214,120,40)" };
const TRACK = "rgb(58,58,64)";
const LEGEND = [["H", "held / pinned"], ["R", "resident"], ["S", "streamed / not resident"]];

let latest = null;      // the newest snapshot
let baseline = null;    // the snapshot when the current/last run started: "moved this run"
let updatedAt = null;
let source = "";
let view = null;        // the mounted panel, or null

function fmtBytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Number(n);
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return i === 0 ? `${v.toFixed(0)} B` : `${v.toFixed(1)} ${units[i]}`;
}

function pct(part, whole) {
  return whole ? `${Math.round((100 * part) / whole)}%` : "-";
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "style") Object.assign(e.style, v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function accept(snapshot, how) {
  if (!snapshot || !snapshot.pools) return;
  latest = snapshot;
  if (!baseline) baseline = snapshot;
  updatedAt = new Date();
  source = how;
  if (view) draw();
}

async function refresh(how = "fetched") {
  try {
    const res = await api.fetchApi("/vbar/stats");
    if (res.ok) accept(await res.json(), how);
  } catch (e) {
    console.warn("vbar monitor: /vbar/stats failed", e);
  }
}

function movedThisRun(dev, v) {
  const before = baseline?.pools?.[dev]?.vbars?.find((b) => b.name === v.name);
  if (!before || v.bytes_mapped < before.bytes_mapped) {
    return { mapped: v.bytes_mapped, streamed: v.streamed_bytes ?? 0 };
  }
  return {
    mapped: v.bytes_mapped - before.bytes_mapped,
    streamed: (v.streamed_bytes ?? 0) - (before.streamed_bytes ?? 0),
  };
}

function drawBar(canvas, states) {
  const w = Math.max(50, Math.floor(canvas.clientWidth || 300));
  const h = 14;
  const dpr = window.devicePixelRatio || 1;
  canvas.width = w * dpr;
  canvas.height = h * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.fillStyle = TRACK;
  ctx.fillRect(0, 0, w, h);
  const n = states.length;
  if (!n) return;
  // One cell per slot (layer weight) in priority order, like the node's residency map.
  for (let x = 0; x < w; x++) {
    ctx.fillStyle = COLOURS[states[Math.floor((x * n) / w)]] || TRACK;
    ctx.fillRect(x, 0, 1, h);
  }
  if (w / n >= 4) {
    ctx.fillStyle = "rgba(0,0,0,0.55)";
    for (let i = 1; i < n; i++) ctx.fillRect(Math.floor((i * w) / n), 0, 1, h);
  }
}

const CELL = { padding: "2px 8px", textAlign: "right", whiteSpace: "nowrap" };
const HEAD = { ...CELL, color: "var(--descrip-text, #999)", fontWeight: "normal" };

function draw() {
  const root = view.body;
  root.replaceChildren();
  const status = updatedAt
    ? `updated ${updatedAt.toLocaleTimeString()} (${source})`
    : "waiting for data";
  view.status.textContent = status;
  const pools = latest ? Object.entries(latest.pools) : [];
  if (!pools.length) {
    root.append(el("div", { style: { padding: "8px", color: "var(--descrip-text, #999)" } },
      "No VBAR pool yet: run a workflow with a VBAR loader."));
    return;
  }
  const bars = [];
  for (const [dev, st] of pools) {
    const d = latest.devices?.[dev] || {};
    const used = st.resident_bytes;
    const meter = el("div", { style: { flex: "0 0 160px", height: "10px", background: TRACK,
      borderRadius: "2px", overflow: "hidden" } },
    el("div", { style: { width: `${Math.min(100, st.budget_bytes ? (100 * used) / st.budget_bytes : 0)}%`,
      height: "100%", background: COLOURS.R } }));
    root.append(el("div", { class: "vbar-device", style: { display: "flex", gap: "14px",
      alignItems: "center", padding: "6px 8px", flexWrap: "wrap" } },
    el("b", {}, `${dev} (${st.backend})`),
    el("span", {}, `device ${fmtBytes(d.total_bytes)} total, ${fmtBytes(d.free_bytes)} free`),
    el("span", {}, `torch ${fmtBytes(d.torch_allocated_bytes)} allocated / ${fmtBytes(d.torch_reserved_bytes)} reserved`),
    el("span", {}, `pool ${fmtBytes(used)} of ${fmtBytes(st.budget_bytes)} (${pct(used, st.budget_bytes)})`),
    meter,
    el("span", { style: { color: "var(--descrip-text, #999)" } },
      `peak ${fmtBytes(st.peak_resident_bytes)}, headroom ${fmtBytes(st.headroom_bytes)}`)));
    if (!st.vbars.length) continue;
    const head = ["model", "residency", "reserved", "resident", "pinned", "held", "watermark",
      "hits", "misses", "offloaded", "evictions", "moved in (run)", "streamed (run)"];
    const table = el("table", { style: { borderCollapse: "collapse", width: "100%",
      fontVariantNumeric: "tabular-nums" } });
    table.append(el("tr", {}, ...head.map((h, i) => el("th", {
      style: { ...HEAD, textAlign: i < 2 ? "left" : "right" } }, h))));
    for (const v of st.vbars) {
      const m = movedThisRun(dev, v);
      const canvas = el("canvas", { style: { width: "100%", height: "14px", display: "block" } });
      bars.push([canvas, v.slot_states || ""]);
      const wm = v.watermark_bytes >= v.allocated_bytes ? "none" : fmtBytes(v.watermark_bytes);
      const cells = [fmtBytes(v.reserved_bytes), fmtBytes(v.resident_bytes), fmtBytes(v.pinned_bytes),
        fmtBytes(v.held_bytes), wm, v.hits, v.misses, v.offloaded, v.evictions,
        fmtBytes(m.mapped), fmtBytes(m.streamed)];
      table.append(el("tr", { style: { borderTop: "1px solid var(--border-color, #333)" } },
        el("td", { style: { ...CELL, textAlign: "left", maxWidth: "260px", overflow: "hidden",
          textOverflow: "ellipsis" }, title: v.name }, v.name),
        el("td", { style: { padding: "2px 8px", width: "28%", minWidth: "160px" },
          title: `${v.slots} slots` }, canvas),
        ...cells.map((c) => el("td", { style: CELL }, c))));
    }
    root.append(table);
  }
  root.append(el("div", { style: { display: "flex", gap: "16px", padding: "6px 8px",
    color: "var(--descrip-text, #999)" } },
  ...LEGEND.map(([code, name]) => el("span", {},
    el("span", { style: { display: "inline-block", width: "10px", height: "10px",
      background: COLOURS[code], marginRight: "5px", verticalAlign: "middle" } }), name)),
  el("span", {}, "moved in / streamed: bytes since the current or last run started")));
  // Canvases know their width only once they are in the document.
  requestAnimationFrame(() => bars.forEach(([c, s]) => drawBar(c, s)));
}

function mountPanel(container) {
  const status = el("span", { style: { color: "var(--descrip-text, #999)" } });
  const button = el("button", { class: "p-button p-button-sm p-button-text",
    style: { padding: "2px 8px" } }, "Refresh");
  button.addEventListener("click", () => refresh("fetched"));
  const body = el("div", { class: "vbar-monitor-body" });
  const root = el("div", { class: "vbar-monitor", style: { height: "100%", overflow: "auto",
    fontSize: "12px", color: "var(--fg-color, #ddd)", fontFamily: "var(--font-family, sans-serif)" } },
  el("div", { style: { display: "flex", gap: "12px", alignItems: "center", padding: "4px 8px" } },
    el("b", {}, "VBAR VRAM"), status, button),
  body);
  container.append(root);
  view = { root, body, status };
  draw();
  refresh("fetched");
}

app.registerExtension({
  name: "vbar.monitor",
  bottomPanelTabs: [{
    id: TAB_ID,
    title: "VBAR VRAM",
    type: "custom",
    render: (container) => mountPanel(container),
    destroy: () => { view = null; },
  }],
  async setup() {
    api.addEventListener("vbar.stats", (e) => accept(e.detail, "live"));
    api.addEventListener("execution_start", () => {
      // Pushes arrive whenever the allocator changes, so the newest snapshot is the state the
      // run starts from (null before any data: then the first snapshot of the run is used).
      baseline = latest;
      refresh("run started");
    });
    api.addEventListener("execution_success", () => refresh("run finished"));
    refresh("fetched");
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "VBARVRAMMonitor") return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      const text = el("textarea", { readonly: "readonly", spellcheck: "false", style: {
        fontFamily: "monospace", fontSize: "10px", whiteSpace: "pre", overflow: "auto",
        width: "100%", height: "100%", resize: "none", boxSizing: "border-box",
        background: "var(--comfy-input-bg, #222)", color: "var(--input-text, #ddd)",
        border: "none" } });
      text.value = "Run the workflow to see the report.";
      const widget = this.addDOMWidget("report", "vbar_report", text, {
        getValue: () => text.value,
        setValue: (v) => { text.value = v ?? ""; },
        getMinHeight: () => 120,
        serialize: false,
      });
      widget.serialize = false;   // the report is output, not a setting of the workflow
      return r;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const w = this.widgets?.find((x) => x.name === "report");
      if (w && message?.text) w.value = Array.isArray(message.text) ? message.text.join("\n") : message.text;
    };
  },
});
