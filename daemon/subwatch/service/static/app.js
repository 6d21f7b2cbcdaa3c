/* subwatch live page.
 *
 * Reads the journal once through api/frames (paged), then follows api/events (server-sent
 * events: new journal rows, daemon status, stack folders). If the event stream drops, it polls
 * api/frames?since=N until the stream is back; rows carry their journal index, so a row is
 * never drawn twice whichever way it arrives. Everything is built with DOM calls and
 * textContent (file names and reasons come from disk), no innerHTML, no libraries.
 */
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const PRODUCTS = ["preview", "denoised", "deconvolved"];
  const METRICS = [
    { key: "fwhm", label: "FWHM", unit: "px", digits: 2 },
    { key: "stars", label: "Stars", unit: "", digits: 0 },
    { key: "background", label: "Background", unit: "ADU", digits: 0 },
    { key: "snr", label: "SNR", unit: "", digits: 1 },
    // The sky gradient across each sub: light domes, the Moon, dawn, dew.
    { key: "gradient", label: "Gradient", unit: "%", digits: 2 },
    // Where the sky brightens; an angle wraps at 360, so points without a joining line.
    { key: "gradient_angle", label: "Gradient direction", unit: "°", digits: 0, dots: true, range: [0, 360] },
  ];
  const SHOWN = new Set([
    "target", "filter", "frames_stacked", "frames_rejected", "integration_seconds",
    "fwhm_median", "sub_snr_median", "snr", "updated",
  ]);
  const POLL_MS = 5000;
  const RECENT = 12;

  const state = {
    next: 0,             // journal index of the next row to read
    stacks: new Map(),   // "target/filter" -> stack view
    rows: [],            // last RECENT rows, for the table
    counts: {},
    lastRow: null,
    status: {},
    source: null,
    pollTimer: null,
    polling: false,
    renderQueued: false,
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    if (attrs) for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function svgEl(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    if (attrs) for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    return node;
  }

  function num(v) {
    return typeof v === "number" && Number.isFinite(v) ? v : null;
  }

  function fmt(v, digits) {
    const n = num(v);
    if (n === null) return "–";
    return n.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
  }

  function duration(seconds) {
    const s = num(seconds);
    if (s === null) return "–";
    if (s < 60) return `${Math.round(s)} s`;
    const h = Math.floor(s / 3600);
    const m = Math.round((s - h * 3600) / 60);
    return h ? `${h} h ${String(m).padStart(2, "0")} min` : `${m} min`;
  }

  function ago(iso) {
    const t = Date.parse(iso);
    if (!Number.isFinite(t)) return "–";
    const s = Math.max(0, (Date.now() - t) / 1000);
    if (s < 90) return `${Math.round(s)} s ago`;
    if (s < 5400) return `${Math.round(s / 60)} min ago`;
    if (s < 172800) return `${(s / 3600).toFixed(1)} h ago`;
    return `${Math.round(s / 86400)} days ago`;
  }

  function basename(path) {
    const text = String(path || "");
    return text.slice(text.lastIndexOf("/") + 1);
  }

  // -- stack views --------------------------------------------------------------------------

  function stackView(target, filter) {
    const key = `${target}/${filter}`;
    let view = state.stacks.get(key);
    if (view) return view;
    view = {
      key, target, filter,
      frames: [],              // light rows in journal order, one per file (the latest row)
      byFile: new Map(),       // file -> position in frames
      info: null,              // status.json
      products: {},            // product -> {url, mtime}
      product: null,           // product shown
      dirty: true,
    };
    buildCard(view);
    state.stacks.set(key, view);
    const empty = $("empty");
    if (empty) empty.hidden = true;
    const cards = Array.from(state.stacks.values()).sort((a, b) => a.key.localeCompare(b.key));
    const main = $("stacks");
    for (const v of cards) main.appendChild(v.card);
    return view;
  }

  function buildCard(view) {
    const card = el("article", { class: "card", "data-target": view.target, "data-filter": view.filter });
    const title = el("h2");
    title.append(el("span", { class: "target" }, view.target), el("span", { class: "filter" }, view.filter));
    const image = el("div", { class: "image" });
    const img = el("img", { alt: `${view.target} ${view.filter} preview`, hidden: "" });
    const placeholder = el("div", { class: "placeholder" }, "No preview yet: it appears after the first few subs.");
    image.append(img, placeholder);
    const products = el("div", { class: "products", role: "group", "aria-label": "preview product" });
    const facts = el("dl", { class: "facts" });
    const more = el("details", { class: "more" });
    more.append(el("summary", null, "status.json"), el("dl"));
    more.hidden = true;
    const charts = el("div", { class: "charts" });
    const svgs = {};
    const lasts = {};
    for (const m of METRICS) {
      const fig = el("figure", { class: "chart-box" });
      const cap = el("figcaption");
      const last = el("span", { class: "last" });
      cap.append(el("span", null, m.unit ? `${m.label} (${m.unit})` : m.label), last);
      const svg = svgEl("svg", { class: "chart", "data-metric": m.key, role: "img", "aria-label": `${m.label} per sub` });
      svg.addEventListener("click", (ev) => showTip(ev, svg));
      fig.append(cap, svg);
      charts.append(fig);
      svgs[m.key] = svg;
      lasts[m.key] = last;
    }
    card.append(title, image, products, facts, more, charts);
    img.addEventListener("error", () => { img.hidden = true; placeholder.hidden = false; });
    img.addEventListener("load", () => { img.hidden = false; placeholder.hidden = true; });
    Object.assign(view, { card, img, placeholder, productsEl: products, facts, more, svgs, lasts });
  }

  function addRow(row) {
    if (!row || typeof row !== "object") return;
    const status = row.status || "error";
    state.counts[status] = (state.counts[status] || 0) + 1;
    state.lastRow = row;
    state.rows.push(row);
    if (state.rows.length > RECENT) state.rows.shift();
    if (row.kind === "light" && row.target && row.filter) {
      const view = stackView(row.target, row.filter);
      const at = view.byFile.get(row.file);
      if (at !== undefined) {
        view.frames[at] = row;  // retried file: its last row is its outcome
      } else {
        view.byFile.set(row.file, view.frames.length);
        view.frames.push(row);
      }
      view.dirty = true;
    }
    queueRender();
  }

  function applyStacks(doc) {
    for (const s of (doc && doc.stacks) || []) {
      const view = stackView(s.target, s.filter);
      view.info = s.status || null;
      view.products = s.products || {};
      view.dirty = true;
    }
    queueRender();
  }

  function reset() {
    state.next = 0;
    state.rows = [];
    state.counts = {};
    state.lastRow = null;
    for (const view of state.stacks.values()) {
      view.frames = [];
      view.byFile = new Map();
      view.dirty = true;
    }
    queueRender();
  }

  // -- rendering ----------------------------------------------------------------------------

  function queueRender() {
    if (state.renderQueued) return;
    state.renderQueued = true;
    setTimeout(() => { state.renderQueued = false; render(); }, 30);
  }

  function render() {
    renderSummary();
    renderRecent();
    for (const view of state.stacks.values()) {
      if (!view.dirty) continue;
      view.dirty = false;
      renderImage(view);
      renderFacts(view);
      for (const m of METRICS) drawChart(view, m);
    }
  }

  function renderSummary() {
    const box = $("summary");
    box.replaceChildren();
    const item = (label, value) => {
      const span = el("span", null, `${label} `);
      span.append(el("b", null, value));
      box.append(span);
    };
    const c = state.counts;
    item("stacked", String(c.stacked || 0));
    item("rejected", String(c.rejected || 0));
    if (c.error) item("errors", String(c.error));
    if (c.calibration) item("calibration", String(c.calibration));
    const st = state.status || {};
    const queue = num(st.queue_depth) ?? num(st.queue);
    if (queue !== null) item("queue", String(queue));
    if (typeof st.state === "string") item("state", st.state);
    if (state.lastRow && state.lastRow.processed) item("last sub", ago(state.lastRow.processed));
  }

  function renderRecent() {
    const body = $("recent");
    body.replaceChildren();
    const first = state.next - state.rows.length;
    state.rows.slice().reverse().forEach((row, i) => {
      const tr = el("tr");
      const status = row.status || "error";
      const outcome = row.reason ? `${status}: ${row.reason}` : status;
      const where = row.target ? `${row.target}/${row.filter || ""}` : (row.kind || "");
      tr.append(
        el("td", null, String(first + state.rows.length - i)),
        el("td", { title: String(row.file || "") }, basename(row.file)),
        el("td", null, where),
        el("td", { class: status }, outcome),
      );
      body.append(tr);
    });
  }

  function renderImage(view) {
    const have = PRODUCTS.filter((p) => view.products[p]);
    if (!have.includes(view.product)) view.product = have[0] || null;
    view.productsEl.replaceChildren();
    if (have.length > 1) {
      for (const p of have) {
        const b = el("button", { type: "button", "aria-pressed": String(p === view.product), "data-product": p }, p);
        b.addEventListener("click", () => { view.product = p; view.dirty = true; queueRender(); });
        view.productsEl.append(b);
      }
    }
    if (!view.product) {
      view.img.hidden = true;
      view.img.removeAttribute("src");
      view.placeholder.hidden = false;
      return;
    }
    const url = view.products[view.product].url;
    if (view.img.getAttribute("src") !== url) view.img.setAttribute("src", url);
  }

  function fromFrames(view) {
    let stacked = 0, rejected = 0, seconds = 0;
    for (const r of view.frames) {
      if (r.status === "stacked") { stacked += 1; seconds += num(r.exptime) || 0; }
      else if (r.status === "rejected") rejected += 1;
    }
    return { stacked, rejected, seconds };
  }

  function median(values) {
    const v = values.filter((x) => x !== null).sort((a, b) => a - b);
    if (!v.length) return null;
    const mid = v.length >> 1;
    return v.length % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
  }

  function renderFacts(view) {
    const info = view.info || {};
    const counted = fromFrames(view);
    const good = view.frames.filter((r) => r.status === "stacked");
    const fwhm = num(info.fwhm_median) ?? median(good.map((r) => num(r.fwhm)));
    const subSnr = num(info.sub_snr_median) ?? median(good.map((r) => num(r.snr)));
    const frames = num(info.frames_stacked) ?? counted.stacked;
    const stackSnr = num(info.snr) ?? (subSnr !== null && frames > 0 ? subSnr * Math.sqrt(frames) : null);
    const facts = [
      ["stacked", fmt(frames, 0)],
      ["rejected", fmt(num(info.frames_rejected) ?? counted.rejected, 0)],
      ["integration", duration(num(info.integration_seconds) ?? counted.seconds)],
      [num(info.snr) !== null ? "stack SNR" : "stack SNR ≈", fmt(stackSnr, 0)],
      ["sub SNR", fmt(subSnr, 1)],
      ["FWHM", fwhm === null ? "–" : `${fmt(fwhm, 2)} px`],
    ];
    // From the last preview: how far to the target SNR, whether the noise falls as 1/sqrt(N),
    // and how strong the sky gradient is.
    const report = info.snr_report || {};
    if (report.forecast_method === "reached") facts.push([`SNR ${fmt(report.target_snr, 0)}`, "reached"]);
    else if (num(report.forecast_seconds) !== null) {
      facts.push([`to SNR ${fmt(report.target_snr, 0)}`, duration(report.forecast_seconds)]);
    }
    if (num(report.noise_ratio) !== null) facts.push(["noise vs √N", `${fmt(report.noise_ratio, 2)}×`]);
    const gradient = info.gradient || {};
    if (num(gradient.amplitude_percent) !== null) {
      facts.push(["gradient", `${fmt(gradient.amplitude_percent, 1)} %`]);
    }
    view.facts.replaceChildren();
    for (const [k, v] of facts) {
      const d = el("div");
      d.append(el("dt", null, k), el("dd", null, v));
      view.facts.append(d);
    }
    const extra = Object.entries(info).filter(([k]) => !SHOWN.has(k));
    if (info.updated) extra.unshift(["updated", `${info.updated} (${ago(info.updated)})`]);
    const list = view.more.querySelector("dl");
    list.replaceChildren();
    for (const [k, v] of extra) {
      const text = v !== null && typeof v === "object" ? JSON.stringify(v) : String(v);
      list.append(el("dt", null, k), el("dd", null, text.length > 200 ? `${text.slice(0, 200)}…` : text));
    }
    view.more.hidden = extra.length === 0;
  }

  function describe(row, index, metric) {
    const status = row.status || "error";
    const lines = [`#${index + 1} ${basename(row.file)}`];
    lines.push(row.reason ? `${status}: ${row.reason}` : status);
    lines.push(`${metric.label} ${fmt(row[metric.key], metric.digits)}${metric.unit ? ` ${metric.unit}` : ""}`);
    return lines.join("\n");
  }

  function drawChart(view, metric) {
    const svg = view.svgs[metric.key];
    const w = Math.max(120, Math.round(svg.getBoundingClientRect().width) || 300);
    const h = 96;
    const pad = { l: 34, r: 6, t: 6, b: 6 };
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    svg.replaceChildren();
    svg._points = [];
    const frames = view.frames;
    const pts = [];
    frames.forEach((row, i) => {
      const v = num(row[metric.key]);
      if (v !== null) pts.push({ i, v, row });
    });
    const last = pts.length ? pts[pts.length - 1] : null;
    view.lasts[metric.key].textContent = last ? fmt(last.v, metric.digits) : "";
    if (!pts.length) {
      const t = svgEl("text", { class: "nodata", x: pad.l, y: h / 2 });
      t.textContent = "no subs yet";
      svg.append(t);
      return;
    }
    let lo, hi;
    if (metric.range) {
      [lo, hi] = metric.range;
    } else {
      lo = Math.min(...pts.map((p) => p.v));
      hi = Math.max(...pts.map((p) => p.v));
      if (hi - lo < 1e-9) { lo -= Math.abs(lo) * 0.05 + 1; hi += Math.abs(hi) * 0.05 + 1; }
      const span = hi - lo;
      lo -= span * 0.08;
      hi += span * 0.08;
    }
    const pw = w - pad.l - pad.r;
    const ph = h - pad.t - pad.b;
    const n = frames.length;
    const x = (i) => pad.l + (n <= 1 ? pw / 2 : (i * pw) / (n - 1));
    const y = (v) => pad.t + ph - ((v - lo) / (hi - lo)) * ph;
    for (const [v, anchor] of [[hi, "hanging"], [lo, "auto"]]) {
      svg.append(svgEl("line", { class: "grid", x1: pad.l, x2: w - pad.r, y1: y(v), y2: y(v) }));
      const label = svgEl("text", { class: "axis", x: pad.l - 3, y: y(v), "text-anchor": "end", "dominant-baseline": anchor });
      label.textContent = fmt(v, metric.digits === 0 ? 0 : metric.digits - 1);
      svg.append(label);
    }
    const good = pts.filter((p) => p.row.status === "stacked");
    if (good.length > 1 && !metric.dots) {
      const line = svgEl("polyline", {
        class: "line",
        points: good.map((p) => `${x(p.i).toFixed(1)},${y(p.v).toFixed(1)}`).join(" "),
      });
      svg.append(line);
    }
    for (const p of pts) {
      const ok = p.row.status === "stacked";
      const dot = svgEl("circle", {
        class: ok ? "pt ok" : "pt rejected",
        cx: x(p.i).toFixed(1),
        cy: y(p.v).toFixed(1),
        r: ok ? 2.2 : 3.4,
        "data-index": p.i,
      });
      if (!ok && p.row.reason) dot.setAttribute("data-reason", p.row.reason);
      const title = svgEl("title");
      title.textContent = describe(p.row, p.i, metric);
      dot.append(title);
      svg.append(dot);
      svg._points.push({ x: x(p.i), y: y(p.v), text: title.textContent });
    }
  }

  // A tap on a chart shows the nearest sub (phones have no hover for <title>).
  function showTip(ev, svg) {
    const points = svg._points || [];
    if (!points.length) return;
    const box = svg.getBoundingClientRect();
    const vb = svg.viewBox.baseVal;
    const scale = vb && vb.width ? vb.width / box.width : 1;
    const px = (ev.clientX - box.left) * scale;
    let best = points[0];
    for (const p of points) if (Math.abs(p.x - px) < Math.abs(best.x - px)) best = p;
    const tip = $("tip");
    tip.textContent = best.text;
    tip.hidden = false;
    const left = Math.min(window.innerWidth - tip.offsetWidth - 4, Math.max(4, box.left + best.x / scale - tip.offsetWidth / 2));
    const top = box.top + best.y / scale - tip.offsetHeight - 10;
    tip.style.left = `${left}px`;
    tip.style.top = `${top < 4 ? box.bottom + 6 : top}px`;
    ev.stopPropagation();
    clearTimeout(showTip.timer);
    showTip.timer = setTimeout(() => { tip.hidden = true; }, 5000);
  }

  // -- data ---------------------------------------------------------------------------------

  function setConn(stateName, text) {
    const c = $("conn");
    c.dataset.state = stateName;
    c.textContent = text || stateName;
  }

  async function getJSON(url) {
    const res = await fetch(url, { cache: "no-store", credentials: "same-origin" });
    if (res.status === 401) {
      setConn("unauthorised");
      const notice = $("notice");
      notice.textContent = "Not authorised: open the link with ?token=… that subwatch printed.";
      notice.hidden = false;
      throw new Error("unauthorised");
    }
    if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
    return res.json();
  }

  async function loadFrames() {
    for (let pages = 0; pages < 100; pages += 1) {
      const since = state.next;
      const doc = await getJSON(`api/frames?since=${since}&limit=2000`);
      if (state.next !== since) continue;  // the event stream moved on meanwhile: ask again
      if (doc.reset) { reset(); continue; }
      for (const row of doc.frames || []) addRow(row);
      state.next = doc.next;
      if (!doc.more) break;
    }
  }

  async function loadStatus() {
    state.status = await getJSON("api/status");
    queueRender();
  }

  async function loadStacks() {
    applyStacks(await getJSON("api/stacks"));
  }

  async function pollOnce() {
    try {
      await Promise.all([loadFrames(), loadStatus(), loadStacks()]);
      if (state.polling) setConn("polling");
    } catch (err) {
      if (String(err.message) !== "unauthorised") setConn("offline");
    }
  }

  function startPolling() {
    if (state.polling) return;
    state.polling = true;
    state.pollTimer = setInterval(pollOnce, POLL_MS);
  }

  function stopPolling() {
    state.polling = false;
    clearInterval(state.pollTimer);
    state.pollTimer = null;
  }

  function connect() {
    if (!window.EventSource) { startPolling(); setConn("polling"); return; }
    const source = new EventSource(`api/events?since=${state.next}`);
    state.source = source;
    source.addEventListener("open", () => { setConn("live"); stopPolling(); });
    source.addEventListener("frame", (ev) => {
      const doc = JSON.parse(ev.data);
      if (doc.index < state.next) return;  // already read through api/frames
      addRow(doc.row);
      state.next = doc.index + 1;
    });
    source.addEventListener("status", (ev) => { state.status = JSON.parse(ev.data); queueRender(); });
    source.addEventListener("stacks", (ev) => applyStacks(JSON.parse(ev.data)));
    source.addEventListener("reset", () => reset());
    source.addEventListener("error", () => {
      startPolling();
      if (source.readyState === EventSource.CLOSED) {
        setConn("polling");
        setTimeout(() => { if (state.source === source) connect(); }, 15000);
      } else {
        setConn("reconnecting");
      }
    });
  }

  function setupRed() {
    const button = $("red");
    const on = (() => { try { return localStorage.getItem("subwatch-red") === "1"; } catch (e) { return false; } })();
    const apply = (value) => {
      document.documentElement.classList.toggle("red", value);
      button.setAttribute("aria-pressed", String(value));
      try { localStorage.setItem("subwatch-red", value ? "1" : "0"); } catch (e) { /* private mode */ }
    };
    apply(on);
    button.addEventListener("click", () => apply(!document.documentElement.classList.contains("red")));
  }

  async function main() {
    setupRed();
    document.addEventListener("click", () => { $("tip").hidden = true; });
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => { for (const v of state.stacks.values()) v.dirty = true; render(); }, 150);
    });
    setInterval(renderSummary, 15000);  // keeps "last sub … ago" current
    try {
      await Promise.all([loadFrames(), loadStatus(), loadStacks()]);
    } catch (err) {
      if (String(err.message) === "unauthorised") return;
      setConn("offline");
    }
    connect();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", main);
  else main();
})();
