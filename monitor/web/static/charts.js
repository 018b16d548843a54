// Charts of the numwatch pages: line charts (uPlot), the per-layer heatmap and the exponent histogram.
"use strict";

const Charts = (() => {
  const { el, num, fmt } = NW;
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#7f7f7f"];
  // Non-finite values get colours no finite value or series uses.
  const NONFINITE = { nan: "#d000d0", inf: "#e11d1d", ninf: "#1d4ed8" };
  const MARKERS = {
    loss_scale_backoff: { color: "#ea580c", shape: "down", label: "backoff" },
    loss_scale_growth: { color: "#16a34a", shape: "up", label: "growth" },
    skipped_step: { color: "#6b7280", shape: "cross", label: "skipped step" },
    grad_explosion: { color: "#b91c1c", shape: "diamond", label: "explosion" },
    loss_scale_collapse: { color: "#7c2d12", shape: "diamond", label: "scale collapse" },
    loss_spike: { color: "#a16207", shape: "diamond", label: "loss spike" },
    grad_norm_spike: { color: "#a16207", shape: "diamond", label: "grad norm spike" },
    attention_logit_growth: { color: "#b91c1c", shape: "up", label: "attention logits above the threshold" },
    log_z_drift: { color: "#7c2d12", shape: "diamond", label: "log Z left the band" },
  };
  // Binades floor(log2|x|) of each format's subnormal and normal ranges (torch.finfo's limits;
  // the browser tests check this table against them).
  const FORMAT_BANDS = {
    fp16: { subnormal: [-24, -15], normal: [-14, 15] },
    bf16: { subnormal: [-133, -127], normal: [-126, 127] },
    fp8_e4m3: { subnormal: [-9, -7], normal: [-6, 8] },
    fp8_e5m2: { subnormal: [-16, -15], normal: [-14, 15] },
  };
  // Steps are integers: x ticks at 1, 2, 5 x 10^k only.
  const STEP_INCREMENTS = Array.from({ length: 13 }, (_, k) => [1, 2, 5].map((m) => m * 10 ** k)).flat();
  const DOUBLE_CLICK_MS = 300;
  const registry = {};  // chart id -> {uplot, source}: the tests read the plotted data from here
  const group = [];
  // Charts of one sync key share their x range: the run's steps, or the zoom a drag chose on any of them.
  const shared = {};

  function nonfiniteKind(v) { return Number.isNaN(v) ? "nan" : v > 0 ? "inf" : "ninf"; }

  function tickFormat(log) {
    return (u, splits) => splits.map((v) => {
      if (v === null || v === undefined) return "";
      if (log === 2) return "2^" + Math.round(Math.log2(v));
      return fmt(v, 3);
    });
  }

  function drawMarks(u, marks) {
    const ctx = u.ctx;
    const { left, top, width, height } = u.bbox;
    const px = devicePixelRatio || 1;
    ctx.save();
    ctx.beginPath(); ctx.rect(left, top, width, height); ctx.clip();
    for (const mark of marks.nonfinite) {
      const x = Math.round(u.valToPos(mark.step, "x", true));
      ctx.strokeStyle = NONFINITE[mark.kind]; ctx.lineWidth = 2 * px; ctx.globalAlpha = 0.75;
      ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
    }
    ctx.globalAlpha = 1;
    const size = 5 * px;
    for (const event of marks.events) {
      const style = MARKERS[event.kind];
      const x = u.valToPos(event.step, "x", true);
      const y = top + height - size - 2 * px - (style.shape === "cross" ? 2 * size + 2 * px : 0);
      ctx.fillStyle = ctx.strokeStyle = style.color; ctx.lineWidth = 1.5 * px;
      ctx.beginPath();
      if (style.shape === "down") { ctx.moveTo(x - size, y - size); ctx.lineTo(x + size, y - size); ctx.lineTo(x, y + size); ctx.fill(); }
      else if (style.shape === "up") { ctx.moveTo(x - size, y + size); ctx.lineTo(x + size, y + size); ctx.lineTo(x, y - size); ctx.fill(); }
      else if (style.shape === "diamond") { ctx.moveTo(x, y - size); ctx.lineTo(x + size, y); ctx.lineTo(x, y + size); ctx.lineTo(x - size, y); ctx.fill(); }
      else { ctx.moveTo(x - size, y - size); ctx.lineTo(x + size, y + size); ctx.moveTo(x + size, y - size); ctx.lineTo(x - size, y + size); ctx.stroke(); }
    }
    ctx.restore();
  }

  // Aligned columns for uPlot from API series: non-finite values become gaps drawn as vertical
  // lines in their own colour; on a log axis values <= 0 become gaps too (counted in the note).
  function align(seriesList, log) {
    const steps = [...new Set(seriesList.flatMap((s) => s.steps))].sort((a, b) => a - b);
    const index = new Map(steps.map((s, i) => [s, i]));
    const nonfinite = new Map();
    const bySeries = [];
    let hiddenNonPositive = 0;
    const columns = seriesList.map((s, k) => {
      // undefined: this series has no point at the step (the line goes on); null: a gap (non-finite, or <= 0 on a log axis).
      const column = new Array(steps.length).fill(undefined);
      s.steps.forEach((step, i) => {
        const v = num(s.values[i]);
        if (v === null) return;
        if (!Number.isFinite(v)) {
          nonfinite.set(step, nonfiniteKind(v)); bySeries.push({ label: s.label, kind: nonfiniteKind(v) });
          column[index.get(step)] = null;
          return;
        }
        if (log && v <= 0) { hiddenNonPositive += 1; column[index.get(step)] = null; return; }
        column[index.get(step)] = v;
      });
      return column;
    });
    return { data: [steps, ...columns], nonfinite: [...nonfinite].map(([step, kind]) => ({ step, kind })), bySeries, hiddenNonPositive, series: seriesList.length };
  }

  // Vertical lines mark non-finite steps; with several series the note says whose they are.
  function legendNote(aligned, eventKinds) {
    const items = [];
    const names = { nan: "NaN", inf: "+Inf", ninf: "−Inf" };
    const counts = new Map();
    for (const m of aligned.bySeries) {
      const key = m.kind + "\u0000" + (aligned.series > 1 ? m.label : "");
      counts.set(key, (counts.get(key) || 0) + 1);
    }
    for (const [key, n] of counts) {
      const [kind, label] = key.split("\u0000");
      items.push(el("span", { class: "key" }, el("span", { class: "swatch line", "data-kind": kind }),
        `${names[kind]}${label ? " in " + label : ""} at ${n} ${n === 1 ? "step" : "steps"}`));
    }
    const hiddenNonPositive = aligned.hiddenNonPositive;
    for (const kind of eventKinds) {
      items.push(el("span", { class: "key" }, el("span", { class: "swatch " + MARKERS[kind].shape, "data-kind": kind }), MARKERS[kind].label));
    }
    if (hiddenNonPositive) items.push(el("span", { class: "key muted" }, `${hiddenNonPositive} values ≤ 0 not drawn on the log axis`));
    return el("div", { class: "chart-note" }, items);
  }

  // A line chart of API series ({steps, values}) over steps; a line breaks at its non-finite values.
  // spec: {id, title, unit, log (2|10|0),
  // series: [{label, steps, values}], events: [{step, kind}], onStep(step)}.
  function lineChart(container, spec) {
    const log = spec.log || 0;
    const aligned = align(spec.series, log);
    const events = (spec.events || []).filter((e) => MARKERS[e.kind]);
    const marks = { nonfinite: aligned.nonfinite, events };
    const box = el("section", { class: "chart", id: "chart-" + spec.id });
    box.append(el("h3", {}, spec.title));
    if (spec.subtitle) box.append(el("p", { class: "muted small" }, spec.subtitle));
    const plot = el("div", { class: "plot" });
    box.append(plot);
    const note = el("div", {});
    box.append(note);
    container.append(box);
    const height = spec.height || 210;
    if (aligned.data[0].length === 0) {
      // An empty box as tall as a drawn chart, so the grid keeps its rows and the note is not lost.
      plot.classList.add("nothing-recorded");
      plot.style.height = height + "px";
      plot.append(el("p", { class: "muted" }, "nothing recorded for this chart"));
      registry[spec.id] = { uplot: null, source: spec.series };
      return null;
    }
    const yScale = log ? { distr: 3, log } : { auto: true };
    if (spec.sync && spec.xRange) shared[spec.sync] = shared[spec.sync] || { full: spec.xRange, now: null };
    const xRange = (u, dmin, dmax) => {
      const state = spec.sync && shared[spec.sync];
      return state ? (state.now || state.full) : [dmin, dmax];
    };
    const opts = {
      width: Math.max(300, plot.clientWidth || container.clientWidth || 600),
      height,
      scales: { x: { time: false, range: xRange }, y: yScale },
      axes: [
        { label: "step", size: 40, labelSize: 18, incrs: STEP_INCREMENTS, values: (u, splits) => splits.map((v) => String(v)) },
        { label: spec.unit, size: 64, labelSize: 18, values: tickFormat(log) },
      ],
      series: [
        { label: "step", value: (u, v) => (v === null ? "–" : String(v)) },
        ...spec.series.map((s, i) => ({ label: s.label, stroke: s.color || COLORS[i % COLORS.length], width: 1.5,
          points: { show: aligned.data[0].length < 120, size: 4 }, value: (u, v) => fmt(v) })),
      ],
      cursor: { sync: { key: spec.sync || "nw" }, drag: { x: true, y: false, setScale: !spec.sync } },
      legend: { live: true },
      hooks: {
        draw: [(u) => drawMarks(u, marks)],
        setSelect: [(u) => {
          if (!spec.sync || u.select.width < 2) return;
          const min = u.posToVal(u.select.left, "x"), max = u.posToVal(u.select.left + u.select.width, "x");
          u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
          zoom(spec.sync, [min, max]);
        }],
      },
    };
    const uplot = new uPlot(opts, aligned.data, plot);
    uplot.syncKey = spec.sync;
    group.push(uplot);
    if (spec.sync) uplot.over.addEventListener("dblclick", () => zoom(spec.sync, null));
    note.append(legendNote(aligned, [...new Set(events.map((e) => e.kind))]));
    if (spec.onStep) {
      let downX = null;
      uplot.over.addEventListener("mousedown", (e) => { downX = e.clientX; });
      // A click opens the step, unless it is the first of a double-click (which resets the zoom).
      let pending = null;
      uplot.over.addEventListener("click", (e) => {
        if (downX === null || Math.abs(e.clientX - downX) >= 4 || uplot.cursor.idx === null || uplot.cursor.idx === undefined) return;
        const step = uplot.data[0][uplot.cursor.idx];
        clearTimeout(pending);
        pending = setTimeout(() => spec.onStep(step), DOUBLE_CLICK_MS);
      });
      uplot.over.addEventListener("dblclick", () => clearTimeout(pending));
      uplot.over.title = "drag to zoom, double-click to reset, click to open the step";
    }
    const entry = { uplot, source: spec.series.map((s) => ({ label: s.label, steps: [...s.steps], values: [...s.values] })), marks, log };
    registry[spec.id] = entry;
    entry.append = (steps, valuesBySeries) => {
      const state = spec.sync && shared[spec.sync];
      if (state && steps.length) state.full = [state.full[0], Math.max(state.full[1], steps[steps.length - 1])];
      entry.source.forEach((s, i) => { s.steps.push(...steps); s.values.push(...valuesBySeries[i]); });
      const again = align(entry.source, log);
      marks.nonfinite = again.nonfinite;
      uplot.setData(again.data);
    };
    entry.addEvents = (more) => { marks.events.push(...more.filter((e) => MARKERS[e.kind])); uplot.redraw(); };
    return entry;
  }

  function zoom(key, range) {
    const state = shared[key];
    if (!state) return;
    state.now = range;
    const [min, max] = range || state.full;
    for (const u of group) if (u.syncKey === key) u.setScale("x", { min, max });
  }

  window.addEventListener("resize", () => {
    for (const u of group) {
      const width = u.root.parentElement.clientWidth;
      if (width && Math.abs(width - u.width) > 8) u.setSize({ width, height: u.height });
    }
  });

  // Perceptually ordered colours (viridis stops), interpolated.
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  function viridis(t) {
    const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
    const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
    const f = x - i;
    const c = VIRIDIS[i].map((a, k) => Math.round(a + (VIRIDIS[i + 1][k] - a) * f));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }
  const ZERO_COLOR = "#cfd4dc";
  const LISTED_ROWS = 12;

  // Tensor x step heatmap of a per-tensor stat, log colour scale (spec.linear: linear, for values already
  // logarithmic such as dB); cells: [{step, tensor, value}]; spec.id names its elements (default "heatmap").
  function heatmap(container, spec) {
    const id = spec.id || "heatmap";
    const scaled = spec.linear ? (v) => v : Math.log10;
    const colored = spec.linear ? Number.isFinite : (v) => Number.isFinite(v) && v > 0;
    const names = spec.tensors;
    const rowOf = new Map(names.map((n, i) => [n, i]));
    const steps = [...new Set(spec.cells.map((c) => c.step))].sort((a, b) => a - b);
    const colOf = new Map(steps.map((s, i) => [s, i]));
    const values = new Float64Array(names.length * steps.length).fill(NaN);
    const present = new Uint8Array(names.length * steps.length);
    let lo = Infinity, hi = -Infinity;
    const badRows = new Map();
    for (const cell of spec.cells) {
      const r = rowOf.get(cell.tensor), c = colOf.get(cell.step);
      if (r === undefined || c === undefined) continue;
      const v = num(cell.value);
      values[r * steps.length + c] = v;
      present[r * steps.length + c] = 1;
      if (colored(v)) { const l = scaled(v); lo = Math.min(lo, l); hi = Math.max(hi, l); }
      if (!Number.isFinite(v)) { const first = badRows.get(names[r]); if (first === undefined || cell.step < first) badRows.set(names[r], cell.step); }
    }
    if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
    const box = el("section", { class: "chart heatmap", id: "chart-" + id });
    box.append(el("h3", {}, spec.title), el("p", { class: "muted small" }, spec.subtitle));
    container.append(box);
    if (!steps.length) { box.append(el("p", { class: "muted empty" }, spec.empty || "no per-tensor statistics recorded")); return null; }
    const labelW = 190, axisH = 34, pad = 8;
    const width = Math.max(400, box.clientWidth || 900);
    const rowH = Math.max(2, Math.min(16, Math.floor(420 / names.length)));
    const plotW = width - labelW - pad * 2, plotH = rowH * names.length;
    const colW = plotW / steps.length;
    const px = devicePixelRatio || 1;
    const canvas = el("canvas", { id: id + "-canvas", width: Math.round(width * px), height: Math.round((plotH + axisH + pad) * px) });
    canvas.style.width = width + "px"; canvas.style.height = plotH + axisH + pad + "px";
    const ctx = canvas.getContext("2d");
    ctx.scale(px, px);
    const x0 = labelW + pad, y0 = pad;
    const colorOf = (v) => Number.isNaN(v) ? NONFINITE.nan : v === Infinity ? NONFINITE.inf : v === -Infinity ? NONFINITE.ninf
      : !colored(v) ? ZERO_COLOR : viridis((scaled(v) - lo) / (hi - lo));
    for (let r = 0; r < names.length; r++) {
      for (let c = 0; c < steps.length; c++) {
        const k = r * steps.length + c;
        if (!present[k]) continue;
        ctx.fillStyle = colorOf(values[k]);
        const xa = Math.floor(x0 + c * colW), xb = Math.floor(x0 + (c + 1) * colW);
        ctx.fillRect(xa, y0 + r * rowH, Math.max(1, xb - xa), rowH);
      }
    }
    // Row labels: every row when they fit, else every k-th; rows with non-finite values always, marked.
    ctx.font = "11px system-ui, sans-serif"; ctx.textBaseline = "middle"; ctx.textAlign = "right";
    const every = Math.max(1, Math.ceil(12 / rowH));
    for (let r = 0; r < names.length; r++) {
      const bad = badRows.has(names[r]);
      if (!bad && r % every) continue;
      let label = names[r];
      while (label.length > 4 && ctx.measureText(label).width > labelW - 16) label = "…" + label.slice(2);
      ctx.fillStyle = bad ? NONFINITE.inf : "#374151";
      ctx.fillText(label, labelW - 4, y0 + r * rowH + rowH / 2);
      if (bad) { ctx.fillRect(labelW, y0 + r * rowH, 4, Math.max(2, rowH)); }
    }
    ctx.textAlign = "center"; ctx.textBaseline = "top"; ctx.fillStyle = "#374151";
    // Round step numbers as ticks, each at the column of the first step at or after it.
    const span = steps[steps.length - 1] - steps[0];
    const increment = STEP_INCREMENTS.find((i) => span / i <= Math.max(2, Math.floor(plotW / 90))) || span || 1;
    for (let v = Math.ceil(steps[0] / increment) * increment; v <= steps[steps.length - 1]; v += increment) {
      const c = steps.findIndex((s) => s >= v);
      const x = x0 + (c + 0.5) * colW;
      ctx.fillRect(Math.round(x), y0 + plotH, 1, 4);
      ctx.fillText(String(steps[c]), x, y0 + plotH + 6);
    }
    ctx.fillText("step", x0 + plotW / 2, y0 + plotH + 20);
    const tip = el("div", { class: "tooltip", hidden: true });
    const wrap = el("div", { class: "heatmap-wrap" }, canvas, tip);
    box.append(wrap);
    const cellAt = (event) => {
      const rect = canvas.getBoundingClientRect();
      const c = Math.floor((event.clientX - rect.left - x0) / colW), r = Math.floor((event.clientY - rect.top - y0) / rowH);
      return r >= 0 && r < names.length && c >= 0 && c < steps.length ? { r, c } : null;
    };
    canvas.addEventListener("mousemove", (event) => {
      const cell = cellAt(event);
      if (!cell) { tip.hidden = true; return; }
      const k = cell.r * steps.length + cell.c;
      tip.textContent = `${names[cell.r]} · step ${steps[cell.c]} · ${spec.stat} ${present[k] ? fmt(values[k]) : "not recorded"}`;
      tip.style.left = Math.min(event.offsetX + 12, width - 260) + "px"; tip.style.top = event.offsetY + 12 + "px";
      tip.hidden = false;
    });
    canvas.addEventListener("mouseleave", () => { tip.hidden = true; });
    if (spec.onStep) canvas.addEventListener("click", (event) => { const cell = cellAt(event); if (cell) spec.onStep(steps[cell.c]); });
    box.append(colorBar(lo, hi, spec.stat, spec.linear));
    if (badRows.size) {
      const listed = [...badRows].sort((a, b) => a[1] - b[1]).slice(0, LISTED_ROWS);
      box.append(el("p", { class: "nonfinite-rows", id: id + "-nonfinite" }, "Non-finite (earliest first): ",
        listed.map(([name, step], i) => [i ? ", " : "", el("span", { class: "mono" }, name), ` (from step ${step})`]),
        badRows.size > LISTED_ROWS ? ` and ${badRows.size - LISTED_ROWS} more` : ""));
    }
    const layout = { x0, y0, colW, rowH, steps, names, px,
      cellCenter: (tensor, step) => ({ x: x0 + (colOf.get(step) + 0.5) * colW, y: y0 + (rowOf.get(tensor) + 0.5) * rowH }) };
    registry[id] = { layout, canvas, colors: NONFINITE };
    return registry[id];
  }

  function colorBar(lo, hi, stat, linear) {
    const w = 260, h = 12;
    const px = devicePixelRatio || 1;
    const canvas = el("canvas", { width: w * px, height: h * px, class: "colorbar" });
    canvas.style.width = w + "px"; canvas.style.height = h + "px";
    const ctx = canvas.getContext("2d");
    for (let i = 0; i < w * px; i++) { ctx.fillStyle = viridis(i / (w * px)); ctx.fillRect(i, 0, 1, h * px); }
    const swatch = (color, label) => { const s = el("span", { class: "swatch box" }); s.style.background = color; return el("span", { class: "key" }, s, label); };
    const ends = linear ? [fmt(lo, 3), `${fmt(hi, 3)}`] : [`10^${lo.toFixed(1)}`, `10^${hi.toFixed(1)} (log scale)`];
    return el("div", { class: "chart-note" }, el("span", { class: "key" }, `${stat} ${ends[0]}`, canvas, ends[1]),
      swatch(ZERO_COLOR, "0"), swatch(NONFINITE.nan, "NaN"), swatch(NONFINITE.inf, "+Inf"), swatch(NONFINITE.ninf, "−Inf"));
  }

  // Exponent histogram (count per binade, log count axis) with the formats' ranges as bands.
  function histogram(container, spec) {
    const box = el("section", { class: "chart", id: "chart-histogram" });
    container.append(box);
    const bins = spec.data.exponent;
    if (!bins.length) { box.append(el("p", { class: "muted empty" }, "every value of this tensor is zero, Inf or NaN at this step")); }
    const shift = spec.scaleShift || 0;
    const lowData = bins.length ? bins[0].binade : -20, highData = bins.length ? bins[bins.length - 1].binade : 0;
    const own = FORMAT_BANDS[spec.format];
    let low = lowData - 4, high = highData + 4;
    // The run's format whole (and shifted by the loss scale), so both ends of its ranges show.
    if (own) { low = Math.min(low, own.subnormal[0] - shift - 2, own.subnormal[0] - 2); high = Math.max(high, own.normal[1] - shift + 2, own.normal[1] + 2); }
    low = Math.max(low, -160); high = Math.min(high, 130);
    const xs = [], ys = [];
    const counts = new Map(bins.map((b) => [b.binade, b.count]));
    for (let b = low; b <= high; b++) { xs.push(b); ys.push(counts.get(b) || null); }
    const bands = Object.entries(FORMAT_BANDS).map(([name, r]) => ({ name, ...r, shift: 0 }));
    if (own && shift) bands.unshift({ name: `${spec.format} ÷ loss scale 2^${shift}`, subnormal: own.subnormal, normal: own.normal, shift });
    const bandH = 15;
    const plot = el("div", { class: "plot" });
    box.append(plot);
    const opts = {
      width: Math.max(300, box.clientWidth || 800), height: 300 + bandH * bands.length,
      scales: { x: { time: false, range: [low - 0.5, high + 0.5] }, y: { distr: 3, log: 10, range: (u, mn, mx) => [0.5, Math.max(10, (mx || 1) * 3)] } },
      axes: [
        { label: "binade: floor(log2 |gradient|)", size: 40, labelSize: 18, incrs: STEP_INCREMENTS, values: (u, splits) => splits.map((v) => (Number.isInteger(v) ? "2^" + v : "")) },
        { label: "elements (log)", size: 64, labelSize: 18, values: tickFormat(10) },
      ],
      series: [{ label: "binade", value: (u, v) => (v === null ? "–" : "2^" + v) },
        { label: "elements", stroke: "#1f2937", fill: "rgba(31,41,55,0.55)", paths: uPlot.paths.bars({ size: [0.9, 60] }), points: { show: false }, value: (u, v) => fmt(v) }],
      cursor: { drag: { x: true, y: false } },
      padding: [bandH * bands.length + 8, 16, 0, 0],
      hooks: { drawClear: [(u) => drawBands(u, bands, bandH)] },
    };
    const uplot = new uPlot(opts, [xs, ys], plot);
    registry.histogram = { uplot, bands, source: spec.data };
    box.append(el("div", { class: "chart-note" },
      el("span", { class: "key" }, el("span", { class: "swatch box band-normal" }), "normal range"),
      el("span", { class: "key" }, el("span", { class: "swatch box band-subnormal" }), "subnormal range (precision lost, then zero)"),
      el("span", { class: "key", id: "histogram-special" }, `zero ${spec.data.zero} · Inf ${spec.data.inf} · NaN ${spec.data.nan} elements`)));
    return uplot;
  }

  function drawBands(u, bands, bandH) {
    const ctx = u.ctx, px = devicePixelRatio || 1;
    const { left, width } = u.bbox;
    ctx.save();
    ctx.font = `${11 * px}px system-ui, sans-serif`; ctx.textBaseline = "middle";
    bands.forEach((band, i) => {
      const y = (4 + i * bandH) * px, h = (bandH - 3) * px;
      const pos = (b) => Math.min(left + width, Math.max(left, u.valToPos(b, "x", true)));
      const part = (range, color) => {
        const a = pos(range[0] - band.shift - 0.5), b = pos(range[1] - band.shift + 0.5);
        if (b > a) { ctx.fillStyle = color; ctx.fillRect(a, y, b - a, h); }
        return [a, b];
      };
      part(band.subnormal, "rgba(245,158,11,0.55)");
      const [a, b] = part(band.normal, "rgba(37,99,235,0.35)");
      ctx.fillStyle = "#111827";
      ctx.fillText(band.name, Math.max(left + 2 * px, a + 4 * px), y + h / 2);
      // Shade the plot under the run's own (possibly shifted) normal range lightly.
      if (i === 0 && b > a) { ctx.fillStyle = "rgba(37,99,235,0.06)"; ctx.fillRect(a, u.bbox.top, b - a, u.bbox.height); }
    });
    ctx.restore();
  }

  return { lineChart, heatmap, histogram, registry, COLORS, NONFINITE, MARKERS, FORMAT_BANDS };
})();
