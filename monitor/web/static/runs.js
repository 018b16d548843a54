// The runs page: every run this reader may see, newest first, filtered by project and name.
"use strict";

const MAX_COMPARE = 8;

NW.start(async () => {
  const { el, fmt } = NW;
  const runs = await NW.api(NW.RUNS_PATH);
  NW.header(el("span", {}, "runs"));
  const main = NW.clear(NW.main());
  const params = new URLSearchParams(location.search);
  const projects = [...new Set(runs.map((r) => r.project))].sort();
  const projectSelect = el("select", { id: "filter-project" }, el("option", { value: "" }, "all projects"), projects.map((p) => el("option", { value: p }, p)));
  projectSelect.value = projects.includes(params.get("project")) ? params.get("project") : "";
  const nameInput = el("input", { id: "filter-name", type: "search", placeholder: "run name contains…", value: params.get("q") || "" });
  const compareButton = el("button", { id: "compare-button", type: "button", disabled: true }, "Compare selected");
  main.append(el("h1", {}, "Runs"), el("p", { class: "controls" }, el("label", {}, "project ", projectSelect), " ", nameInput, " ", compareButton,
    el("span", { class: "muted" }, ` select up to ${MAX_COMPARE} runs to overlay one metric`)));
  if (!runs.length) {
    main.append(el("p", { class: "muted", id: "no-runs" }, "No runs yet: add numwatch.watch(model, optimizer, url=…) to a training script pointed at this collector."));
    return;
  }
  const body = el("tbody", {});
  const header = ["", "run", "project", "status", "last step", "loss", "grad norm", "loss scale", "events", "started", "last step at"];
  main.append(el("div", { class: "table-wrap" }, el("table", { class: "runs", id: "runs-table" }, el("thead", {}, el("tr", {}, header.map((h) => el("th", {}, h)))), body)));
  const chosen = new Set();
  for (const r of runs) {
    const box = el("input", { type: "checkbox", class: "pick", "aria-label": "compare " + r.run });
    box.addEventListener("change", () => {
      if (box.checked) chosen.add(r.run); else chosen.delete(r.run);
      if (chosen.size > MAX_COMPARE) { box.checked = false; chosen.delete(r.run); }
      compareButton.disabled = chosen.size < 1;
    });
    const events = Object.entries(r.events).map(([kind, n]) => el("span", { class: "event-count " + kind }, `${kind} ${n}`));
    const row = el("tr", { class: "run-row" }, el("td", {}, box), el("td", { class: "mono" }, el("a", { href: NW.runUrl(r.run), class: "run-link" }, r.run)),
      el("td", {}, r.project), el("td", {}, RunStatus(r.status)), el("td", { class: "num" }, String(r.last_step)), el("td", { class: "num" }, fmt(r.loss)),
      el("td", { class: "num" }, fmt(r.global_grad_norm)), el("td", { class: "num" }, fmt(r.loss_scale)), el("td", { class: "events-cell" }, events.length ? events : "–"),
      el("td", {}, NW.fmtTime(r.started_at)), el("td", {}, r.last_step_time ? NW.ago(r.last_step_time) : "–"));
    row.dataset.project = r.project; row.dataset.run = r.run;
    body.append(row);
  }
  const apply = () => {
    const project = projectSelect.value, text = nameInput.value.trim().toLowerCase();
    for (const row of body.rows) row.hidden = (project && row.dataset.project !== project) || (text && !row.dataset.run.toLowerCase().includes(text));
    const query = new URLSearchParams();
    if (project) query.set("project", project);
    if (text) query.set("q", nameInput.value.trim());
    history.replaceState(null, "", query.toString() ? "?" + query : location.pathname);
  };
  projectSelect.addEventListener("change", apply);
  nameInput.addEventListener("input", apply);
  compareButton.addEventListener("click", () => {
    const query = new URLSearchParams();
    for (const run of chosen) query.append("run", run);
    location.href = "/compare?" + query;
  });
  apply();
  NW.ready();
});

function RunStatus(status) { return NW.el("span", { class: "status " + status }, status); }
