// The compare view: one metric of up to 8 runs overlaid.
"use strict";

const METRICS = ["loss", "global_grad_norm", "loss_scale", "lr", "headroom_bits", "step_time"];
const COMPARE_POINTS = 1000;

NW.start(async () => {
  const { el } = NW;
  const params = new URLSearchParams(location.search);
  const runs = [...new Set(params.getAll("run"))].slice(0, 8);
  const metric = METRICS.includes(params.get("metric")) ? params.get("metric") : "global_grad_norm";
  NW.header(NW.link("/", "runs"), el("span", {}, "compare"));
  const main = NW.clear(NW.main());
  main.append(el("h1", {}, "Compare runs"));
  if (!runs.length) { main.append(el("p", { class: "muted" }, "Pick runs on the runs page (up to 8), then Compare.")); return; }
  const select = el("select", { id: "compare-metric" }, METRICS.map((m) => el("option", { value: m }, m)));
  select.value = metric;
  select.addEventListener("change", () => { params.set("metric", select.value); location.search = params.toString(); });
  main.append(el("p", { class: "controls" }, el("label", {}, "metric ", select), " ",
    el("span", { class: "muted" }, runs.length + " runs: "), runs.map((r, i) => [i ? ", " : "", el("a", { href: NW.runUrl(r), class: "mono" }, r)])));
  const answers = await Promise.all(runs.map((run) => NW.apiRun(run, "/series", { metric, max_points: COMPARE_POINTS })));
  const finite = answers.flatMap((a) => a.values.map(NW.num)).filter((v) => Number.isFinite(v) && v > 0);
  const spread = finite.length ? Math.max(...finite) / Math.min(...finite) : 1;
  const log = metric === "loss_scale" ? 2 : spread > 100 && !answers.some((a) => a.values.some((v) => NW.num(v) < 0)) ? 10 : 0;
  const charts = el("div", { class: "charts wide" });
  main.append(charts);
  Charts.lineChart(charts, { id: "compare", title: metric, unit: metric + (log === 2 ? " (log2)" : log ? " (log)" : ""), log, height: 420,
    series: runs.map((run, i) => ({ label: run, ...answers[i] })) });
  NW.ready();
});
