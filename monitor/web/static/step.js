// The step page: every per-tensor statistic of one step, worst first, and the step's events.
"use strict";

const COLUMNS = ["grad_norm", "grad_absmax", "nan_count", "inf_count", "zeros", "underflow", "subnormal", "overflow",
  "weight_norm", "weight_absmax", "update_ratio", "stale_fraction", "exp_avg_sq_underflow"];

// Worst first: non-finite counts, then non-finite norms, then overflow, then the largest |gradient|.
function badness(stats) {
  const v = (name) => { const x = NW.num(stats[name]); return x === null ? 0 : x; };
  const nonfinite = v("nan_count") + v("inf_count") + (Number.isFinite(v("grad_norm")) ? 0 : 1);
  const absmax = v("grad_absmax");
  return [nonfinite, v("overflow"), Number.isFinite(absmax) ? absmax : Infinity];
}

function compareBadness(a, b) {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return b[i] - a[i];
  return 0;
}

NW.start(async () => {
  const { el, fmt } = NW;
  const { run, step } = NW.context();
  const [record, detail] = await Promise.all([NW.apiRun(run, "/steps/" + step), NW.apiRun(run)]);
  document.title = `numwatch · ${run} · step ${step}`;
  NW.header(NW.link("/", "runs"), NW.link(NW.runUrl(run), el("span", { class: "mono" }, run)), el("span", {}, `step ${step}`));
  const main = NW.clear(NW.main());
  const nav = el("p", { class: "controls" }, step > 1 ? el("a", { href: NW.stepUrl(run, step - 1), id: "prev-step" }, "← previous step") : null, " ",
    step < detail.last_step ? el("a", { href: NW.stepUrl(run, step + 1), id: "next-step" }, "next step →") : null);
  const scalars = [["loss", fmt(record.loss)], ["global grad norm", fmt(record.global_grad_norm)], ["loss scale", fmt(record.loss_scale)],
    ["new loss scale", fmt(record.new_loss_scale)], ["scale decision", record.scale_decision || "–"], ["skipped", record.skipped ? "yes" : "no"],
    ["learning rates", (record.lr || []).map((v) => fmt(v)).join(", ") || "–"], ["headroom", record.headroom_bits === null ? "–" : fmt(record.headroom_bits) + " bits"],
    ["step time", record.step_time === null ? "–" : fmt(record.step_time) + " s"], ["time", NW.fmtTime(record.time)],
    ...Object.entries(record.scalars || {}).map(([k, v]) => [k, fmt(v)])];
  main.append(el("h1", {}, el("span", { class: "mono" }, run), ` · step ${step}`), nav,
    el("dl", { class: "facts" }, scalars.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])));
  main.append(el("h2", {}, `Events at this step (${record.events.length})`));
  main.append(record.events.length ? el("table", { class: "events", id: "step-events" }, el("tbody", {}, record.events.map((e) => RunView.eventRow(run, e))))
    : el("p", { class: "muted" }, "none"));

  const names = Object.keys(record.tensors);
  // The usual stats first, then any other the client recorded (newer clients measure more).
  const recorded = new Set(names.flatMap((n) => Object.keys(record.tensors[n])));
  const present = [...COLUMNS.filter((c) => recorded.has(c)), ...[...recorded].filter((c) => !COLUMNS.includes(c)).sort()];
  const shapes = new Map(detail.tensors.map((t) => [t.name, t.shape]));
  let rows = names.map((name) => ({ name, stats: record.tensors[name], bad: badness(record.tensors[name]) }));
  let sortKey = null, ascending = false;
  const body = el("tbody", {});
  const render = () => {
    const sorted = [...rows];
    if (sortKey === null) sorted.sort((a, b) => compareBadness(a.bad, b.bad));
    else if (sortKey === "tensor") sorted.sort((a, b) => a.name.localeCompare(b.name) * (ascending ? 1 : -1));
    else {
      const key = (r) => { const v = NW.num(r.stats[sortKey]); return v === null ? -Infinity : Number.isNaN(v) ? Infinity : v; };
      sorted.sort((a, b) => (key(a) - key(b) || 0) * (ascending ? 1 : -1));
    }
    NW.clear(body).append(...sorted.map((r) => el("tr", { class: r.bad[0] ? "nonfinite" : "" },
      el("td", { class: "mono" }, r.name), el("td", { class: "mono small" }, JSON.stringify(shapes.get(r.name) || [])),
      present.map((c) => { const v = NW.num(r.stats[c]); return el("td", { class: "num" + (v !== null && !Number.isFinite(v) ? " bad" : "") }, fmt(r.stats[c])); }))));
  };
  const head = el("tr", {}, [["tensor", "tensor"], ["shape", null], ...present.map((c) => [c, c])].map(([label, key]) => {
    const th = el("th", key ? { class: "sortable", "data-key": key } : {}, label);
    if (key) th.addEventListener("click", () => { ascending = sortKey === key ? !ascending : false; sortKey = key; render(); });
    return th;
  }));
  main.append(el("h2", {}, `Per tensor (${names.length}), worst first`), el("p", { class: "muted small" }, "Click a column to sort by it."),
    el("div", { class: "table-wrap" }, el("table", { class: "tensors", id: "tensor-table" }, el("thead", {}, head), body)));
  render();
  NW.ready();
});
