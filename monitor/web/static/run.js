// The run page: diagnosis, charts, per-layer heatmap, exponent histogram, events; live while running.
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

  main.append(RunView.summary(detail), RunView.diagnosis(run, detail, events));
  const charts = el("div", { class: "charts", id: "charts" });
  main.append(el("h2", {}, "Over steps"), el("p", { class: "muted small" },
    "Downsampled to at most ", String(layout.max_points), " points per series keeping each bucket's minimum, maximum and every NaN/Inf. Drag to zoom (all charts follow), double-click to reset, click a point to open its step."), charts);

  const seriesAnswers = await Promise.all(layout.series_charts.map((chart) => Promise.all(chart.series.map((s) =>
    apiRun(run, "/series", { metric: s.metric, max_points: layout.max_points, end })))));
  const summary = await apiRun(run, "/tensor-summary", { max_points: layout.max_points });
  const live = [];
  layout.series_charts.forEach((chart, i) => {
    const entry = Charts.lineChart(charts, { ...chart, sync: "run", onStep, events: events.filter((e) => (chart.events || []).includes(e.kind)),
      series: chart.series.map((s, k) => ({ label: s.label, ...seriesAnswers[i][k] })) });
    if (entry) live.push({ entry, metrics: chart.series.map((s) => s.metric) });
  });
  layout.summary_charts.forEach((chart) => {
    Charts.lineChart(charts, { ...chart, sync: "run", onStep, subtitle: `run format ${detail.format}`,
      series: chart.series.map((s) => ({ label: s.label, ...summary[s.key] })) });
  });

  const forward = await apiRun(run, "/forward", { max_points: layout.max_points });
  main.append(el("h2", {}, "Forward pass (sampled steps)"));
  RunView.forwardCharts(main, forward, events, onStep);

  const heat = await apiRun(run, "/heatmap", layout.heatmap);
  main.append(el("h2", {}, "Per layer"));
  Charts.heatmap(main, { title: "Gradient norm per tensor", stat: layout.heatmap.stat, cells: heat, tensors: detail.tensors.map((t) => t.name), onStep,
    subtitle: `Rows: the run's ${detail.tensors.length} tensors in model order; columns: the last ${layout.heatmap.max_steps} steps that have it. Log colour scale; NaN, +Inf and zero in their own colours.` });

  main.append(el("h2", {}, "Exponent histogram"));
  await RunView.histogramSection(main, run, detail);

  main.append(el("h2", {}, `Events (${events.length})`), RunView.eventsTable(run, events));
  if (!NW.exported() && (detail.status === "running" || detail.status === "stale")) RunView.follow(run, end, live);
  document.body.dataset.ready = "true";
});
