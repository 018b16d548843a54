// The run page: diagnosis, charts, ranks (multi-rank runs), per-layer heatmap, exponent histogram, quantization and matmul readiness, events; live while running.
// Every read starts at once and each part is drawn as soon as its data arrives, in a slot laid out
// up front (the page does not jump); the page is ready when every part is drawn.
"use strict";

NW.start(async () => {
  const { el, apiRun } = NW;
  const { run } = NW.context();
  const [detail, events, layout] = await Promise.all([apiRun(run), apiRun(run, "/events"), NW.api("/static/charts.json")]);
  document.title = `numwatch · ${run}`;
  NW.header(NW.link("/", "runs"), el("span", { class: "mono" }, run));
  const main = NW.clear(NW.main());
  const onStep = NW.exported() ? null : (step) => { location.href = NW.stepUrl(run, step); };
  const end = detail.last_step;
  const slot = (parent) => parent.appendChild(el("div", { class: "slot" }));
  const xRange = [1, Math.max(2, end)];  // every chart of the page spans the run's steps

  main.append(RunView.summary(detail), RunView.diagnosis(run, detail, events));
  const charts = el("div", { class: "charts", id: "charts" });
  main.append(el("h2", {}, "Over steps"), el("p", { class: "muted small" },
    "Downsampled to at most ", String(layout.max_points), " points per series keeping each bucket's minimum, maximum and every NaN/Inf. Drag to zoom (all charts follow), double-click to reset, click a point to open its step."), charts);
  const seriesSlots = layout.series_charts.map(() => slot(charts));
  const summarySlots = layout.summary_charts.map(() => slot(charts));
  const ranksSlot = detail.world_size > 1 ? (main.append(el("h2", { id: "ranks" }, "Ranks")), slot(main)) : null;
  main.append(el("h2", {}, "Forward pass (sampled steps)"));
  const forwardSlot = slot(main);
  main.append(el("h2", {}, "Per layer"));
  const heatSlot = slot(main);
  main.append(el("h2", {}, "Exponent histogram"));
  const histogramSlot = slot(main);
  main.append(el("h2", {}, "Quantization readiness"));
  const quantSlot = slot(main);
  main.append(el("h2", {}, "Low-precision readiness of the matmuls (sampled steps)"));
  const gemmSlot = slot(main);
  const gemmHeatSlot = slot(main);
  main.append(el("h2", {}, `Events (${events.length})`), RunView.eventsTable(run, events));

  const live = [];
  const seriesCharts = layout.series_charts.map((chart, i) => Promise.all(chart.series.map((s) =>
    apiRun(run, "/series", { metric: s.metric, max_points: layout.max_points, end }))).then((answers) => {
    const entry = Charts.lineChart(seriesSlots[i], { ...chart, sync: "run", xRange, onStep, events: events.filter((e) => (chart.events || []).includes(e.kind)),
      series: chart.series.map((s, k) => ({ label: s.label, ...answers[k] })) });
    if (entry) live.push({ entry, metrics: chart.series.map((s) => s.metric) });
  }));
  const summaryCharts = apiRun(run, "/tensor-summary", { max_points: layout.max_points }).then((summary) => {
    layout.summary_charts.forEach((chart, i) => Charts.lineChart(summarySlots[i], { ...chart, sync: "run", xRange, onStep, subtitle: `run format ${detail.format}`,
      series: chart.series.map((s) => ({ label: s.label, ...summary[s.key] })) }));
  });
  const heatmap = apiRun(run, "/heatmap", layout.heatmap).then((cells) => Charts.heatmap(heatSlot, {
    title: "Gradient norm per tensor", stat: layout.heatmap.stat, cells, tensors: detail.tensors.map((t) => t.name), onStep,
    subtitle: `Rows: the run's ${detail.tensors.length} tensors in model order; columns: the whole run, at most ${layout.heatmap.max_steps} (each step that has it, or each bucket of steps at its maximum, NaN when it holds one). Log colour scale; NaN, +Inf and zero in their own colours.` }));
  const forward = apiRun(run, "/forward", { max_points: layout.max_points }).then((answer) => RunView.forwardCharts(forwardSlot, answer, events, onStep, xRange));
  const histogram = RunView.histogramSection(histogramSlot, run, detail);
  const quantization = apiRun(run, "/quantization").then((table) => quantSlot.append(RunView.quantizationTable(table)));
  const ranks = ranksSlot ? apiRun(run, "/ranks", { max_steps: layout.heatmap.max_steps, max_points: layout.max_points })
    .then((view) => RunView.ranksSection(ranksSlot, run, view, onStep, xRange)) : null;
  const gemm = Promise.all([apiRun(run, "/gemm"), apiRun(run, "/heatmap", layout.gemm_heatmap)]).then(([table, cells]) => {
    gemmSlot.append(RunView.gemmTable(table));
    if (table.step === null) return;
    const layers = new Set(table.layers.map((l) => l.tensor));
    Charts.heatmap(gemmHeatSlot, { id: "gemm-heatmap", linear: true, title: "e4m3 SQNR of each Linear's input X (dB)", stat: layout.gemm_heatmap.stat, onStep,
      cells, tensors: detail.tensors.map((t) => t.name).filter((n) => layers.has(n)),
      subtitle: `Rows: the Linear layers (by weight) in model order; columns: the measured steps, at most ${layout.gemm_heatmap.max_steps} (buckets of steps at their maximum). Linear colour scale: dark is low SQNR, what fp8 per-tensor scaling would lose.` });
  });
  await Promise.all([...seriesCharts, summaryCharts, forward, heatmap, histogram, quantization, gemm, ranks]);
  if (!NW.exported() && (detail.status === "running" || detail.status === "stale")) RunView.follow(run, end, live);
  NW.ready();
});
