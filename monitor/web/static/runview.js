// Pieces of the run page (also used by the step page): summary, diagnosis, events, histogram, live updates.
"use strict";

const POLL_MS = 2000;

const RunView = (() => {
  const { el, fmt, apiRun } = NW;

  function badge(status) { return el("span", { class: "status " + status, id: "run-status" }, status); }

  function summary(d) {
    const rows = [
      ["project", d.project], ["format", d.format], ["world size", d.world_size], ["status", badge(d.status)],
      ["last step", el("span", { id: "run-last-step" }, String(d.last_step))], ["attempts", `${d.steps_total} (${d.skipped_steps_total} skipped)`],
      ["loss", fmt(d.loss)], ["global grad norm", fmt(d.global_grad_norm)], ["loss scale", fmt(d.loss_scale)],
      ["started", NW.fmtTime(d.started_at)], ["last seen", d.last_step_time ? `${NW.fmtTime(d.last_step_time)} (${NW.ago(d.last_step_time)})` : "–"],
      ["tensors", String(d.tensors.length)],
    ];
    const table = el("dl", { class: "facts" }, rows.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
    const config = Object.entries(d.config || {});
    const configBox = config.length ? el("details", { class: "config" }, el("summary", {}, `config (${config.length})`),
      el("dl", { class: "facts" }, config.map(([k, v]) => [el("dt", {}, k), el("dd", { class: "mono" }, typeof v === "string" ? v : JSON.stringify(v))]))) : null;
    return el("section", { class: "summary" }, el("h1", { class: "mono", id: "run-name" }, d.run), table, configBox);
  }

  const first = (events, kind) => events.find((e) => e.kind === kind);
  const plural = (n, word, many) => `${n} ${n === 1 ? word : many || word + "s"}`;
  const count = (events, kind) => events.filter((e) => e.kind === kind).length;

  function tensorsText(list) {
    return (list || []).slice(0, 3).map((t) => `${t.name} (${t.nan ? t.nan + " NaN" : ""}${t.nan && t.inf ? ", " : ""}${t.inf ? t.inf + " Inf" : ""})`).join(", ");
  }

  // The run's story in words, in step order, each line linking to its step.
  function diagnosis(run, detail, events) {
    const items = [];
    const add = (step, ...text) => items.push({ step, node: el("li", {}, NW.link(NW.stepUrl(run, step), `step ${step}`), ": ", ...text) });
    const origin = first(events, "nonfinite_origin");
    const grad = first(events, "nonfinite_grad");
    if (origin) {
      const d = origin.details || {};
      const where = d.module ? ["the first non-finite module output was ", el("strong", { class: "mono", id: "origin-module" }, d.module), " (forward pass)"]
        : [(detail.modules || []).length ? "every traced module output was finite: the values went non-finite in the backward pass" : "activation tracing was off, so the module is unknown"];
      add(origin.step, "first non-finite values; tensors ", el("span", { class: "mono" }, tensorsText(d.tensors)),
        d.nonfinite_tensors > 3 ? ` and ${d.nonfinite_tensors - 3} more` : "", "; ", ...where, ".");
    } else if (grad) {
      add(grad.step, "first non-finite gradients: ", el("span", { class: "mono" }, tensorsText((grad.details || {}).tensors)), ".");
    }
    const explosion = first(events, "grad_explosion");
    if (explosion) {
      const d = explosion.details || {};
      add(explosion.step, `gradient explosion: global norm ${fmt(d.global_grad_norm)}, ${fmt(d.factor, 3)}× the rolling median ${fmt(d.rolling_median)}`,
        count(events, "grad_explosion") > 1 ? ` (${plural(count(events, "grad_explosion"), "step")} in all).` : ".");
    }
    const loss = first(events, "nonfinite_loss");
    if (loss) add(loss.step, `the loss became ${fmt((loss.details || {}).loss)} (${plural(count(events, "nonfinite_loss"), "step")} with a non-finite loss).`);
    const collapse = first(events, "loss_scale_collapse");
    if (collapse) {
      const d = collapse.details || {};
      add(collapse.step, `loss scale collapse: ${fmt(d.loss_scale)} after ${d.backoffs} backoffs in ${d.window} steps.`);
    }
    const spike = first(events, "loss_spike");
    if (spike) {
      const d = spike.details || {};
      add(spike.step, `loss spike: ${fmt(d.loss)} above the ${d.sigmas}σ threshold ${fmt(d.threshold)} of the last ${d.window} steps`,
        d.grad_norm_spike_step !== null && d.grad_norm_spike_step !== undefined ? ["; the gradient norm spiked first, at ", NW.link(NW.stepUrl(run, d.grad_norm_spike_step), `step ${d.grad_norm_spike_step}`)] : "",
        count(events, "loss_spike") > 1 ? ` (${plural(count(events, "loss_spike"), "loss spike")}).` : ".");
    }
    const normSpike = first(events, "grad_norm_spike");
    if (normSpike) {
      const d = normSpike.details || {};
      add(normSpike.step, `gradient-norm spike: ${fmt(d.grad_norm)} above the ${d.sigmas}σ threshold ${fmt(d.threshold)}`,
        count(events, "grad_norm_spike") > 1 ? ` (${plural(count(events, "grad_norm_spike"), "spike")}).` : ".");
    }
    const growth = first(events, "attention_logit_growth");
    if (growth) {
      const d = growth.details || {};
      add(growth.step, `attention logits above ${fmt(d.threshold)} in `, el("span", { class: "mono", id: "attention-layers" }, (d.layers || []).map((l) => `${l.name} (${fmt(l.value)})`).join(", ")),
        count(events, "attention_logit_growth") > 1 ? ` (${count(events, "attention_logit_growth")} episodes).` : ".");
    }
    const drift = first(events, "log_z_drift");
    if (drift) {
      const d = drift.details || {};
      add(drift.step, `mean output log Z ${fmt(d.log_z_mean)} left the band [${fmt(d.low)}, ${fmt(d.high)}].`);
    }
    // Across ranks: which rank went wrong (the collector's message says it in words).
    for (const kind of ["rank_nonfinite", "straggler", "replica_divergence", "rank_outlier"]) {
      const e = first(events, kind);
      if (!e) continue;
      const d = e.details || {};
      const more = count(events, kind) > 1 ? ` (${plural(count(events, kind), "episode")})` : "";
      add(e.step, el("span", { class: "rank-finding", id: "diagnosis-" + kind }, d.message || kind), d.diagnosis ? ": " + d.diagnosis : "", more, ".");
    }
    const skipped = first(events, "skipped_step");
    if (skipped) add(skipped.step, `first skipped optimizer step; ${count(events, "skipped_step")} skipped, ${plural(count(events, "loss_scale_backoff"), "loss-scale backoff")} in all.`);
    const told = new Set(["nonfinite_origin", "nonfinite_grad", "grad_explosion", "nonfinite_loss", "loss_scale_collapse", "loss_spike", "grad_norm_spike",
      "attention_logit_growth", "log_z_drift", "skipped_step", "loss_scale_backoff", "loss_scale_growth",
      "rank_nonfinite", "straggler", "replica_divergence", "rank_outlier"]);
    for (const kind of [...new Set(events.map((e) => e.kind))].filter((k) => !told.has(k))) {
      const e = first(events, kind);
      add(e.step, el("span", { class: "mono" }, kind), ` (${plural(count(events, kind), "event")}).`);
    }
    items.sort((a, b) => a.step - b.step);
    const box = el("section", { class: "diagnosis", id: "diagnosis" }, el("h2", {}, "Diagnosis"));
    if (!items.length) box.append(el("p", { class: "ok" }, `No numeric problems detected in ${detail.last_step} steps.`));
    else box.append(el("ol", {}, items.map((i) => i.node)));
    return box;
  }

  function detailsText(details) {
    return Object.entries(details || {}).map(([k, v]) => {
      if (Array.isArray(v)) return `${k}: ${v.slice(0, 3).map((x) => (x && typeof x === "object" ? x.name ?? JSON.stringify(x) : String(x))).join(", ")}${v.length > 3 ? " …" : ""}`;
      if (v && typeof v === "object") return `${k}: ${JSON.stringify(v)}`;
      return `${k}: ${typeof v === "number" ? fmt(v) : String(v)}`;
    }).join("; ");
  }

  const SHOWN_EVENTS = 1000;
  function eventRow(run, e) {
    return el("tr", { class: "event " + e.kind }, el("td", { class: "num" }, NW.link(NW.stepUrl(run, e.step), String(e.step))), el("td", { class: "num" }, String(e.rank)),
      el("td", { class: "mono" }, e.kind), el("td", { class: "details" }, detailsText(e.details)));
  }

  function eventsTable(run, events) {
    const body = el("tbody", {}, events.slice(0, SHOWN_EVENTS).map((e) => eventRow(run, e)));
    const table = el("table", { class: "events", id: "events-table" },
      el("thead", {}, el("tr", {}, ["step", "rank", "kind", "details"].map((h) => el("th", {}, h)))), body);
    const box = el("div", { class: "table-wrap" }, table);
    if (events.length > SHOWN_EVENTS) box.append(el("p", { class: "muted" }, `first ${SHOWN_EVENTS} of ${events.length} events shown`));
    if (!events.length) box.append(el("p", { class: "muted" }, "no events"));
    return box;
  }

  async function histogramSection(main, run, detail) {
    const box = el("div", { id: "histogram-box" });
    main.append(box);
    const choice = await apiRun(run, "/histogram-steps", { kind: "grad" });
    const sampled = choice.steps;
    if (!choice.suggested) { box.append(el("p", { class: "muted" }, "no histograms recorded (sampled every histogram_every steps)")); return; }
    let { tensor, step } = choice.suggested;
    const tensorSelect = el("select", { id: "histogram-tensor", disabled: NW.exported() || undefined }, detail.tensors.map((t) => el("option", { value: t.name }, t.name)));
    const stepSelect = el("select", { id: "histogram-step", disabled: NW.exported() || undefined }, sampled.map((s) => el("option", { value: String(s) }, String(s))));
    tensorSelect.value = tensor; stepSelect.value = String(step);
    const chart = el("div", {});
    box.append(el("p", { class: "controls" }, el("label", {}, "tensor ", tensorSelect), " ", el("label", {}, "sampled step ", stepSelect),
      NW.exported() ? el("span", { class: "muted" }, " (an exported page holds this one histogram)") : null), chart);
    const draw = async () => {
      const [data, record] = await Promise.all([apiRun(run, "/histograms", { tensor, step, kind: "grad" }), apiRun(run, "/steps/" + step)]);
      const scale = NW.num(record.loss_scale);
      const shift = scale && Number.isFinite(scale) && scale > 0 ? Math.round(Math.log2(scale)) : 0;
      NW.clear(chart).append(el("p", { class: "muted small" },
        `Unscaled gradient of ${tensor} at step ${step}, against the normal (blue) and subnormal (amber) ranges of each format.`,
        shift ? ` The loss scale was 2^${shift}: the gradients are cast to ${detail.format} after multiplying by it, so the top band shows ${detail.format}'s range as it applies to these unscaled values.` : ""));
      Charts.histogram(chart, { data, format: detail.format, scaleShift: shift });
    };
    tensorSelect.addEventListener("change", () => { tensor = tensorSelect.value; draw().catch(NW.showError); });
    stepSelect.addEventListener("change", () => { step = Number(stepSelect.value); draw().catch(NW.showError); });
    await draw();
  }

  // Max attention logit per attention call (one line each, forward order) and the output logits' log Z.
  function forwardCharts(main, forward, events, onStep, xRange) {
    const box = el("div", { class: "charts", id: "forward-charts" });
    main.append(box);
    const calls = Object.keys(forward.attention_logit_max);
    const peak = forward.run_max;
    Charts.lineChart(box, {
      id: "attention_logit_max", title: "Max attention logit per attention call", unit: "scale·q·k (log)", log: 10, sync: "run", xRange, onStep,
      subtitle: peak ? `Largest of the run: ${fmt(peak.value)} in ${peak.call} at step ${peak.step}. Over batch, heads and unmasked positions, pre-softmax, as each scaled_dot_product_attention call computed it.`
        : "No attention call measured (attention_every = 0, or the model does not call scaled_dot_product_attention).",
      events: events.filter((e) => e.kind === "attention_logit_growth"),
      series: calls.map((name) => ({ label: name, steps: forward.steps, values: forward.attention_logit_max[name] })),
    });
    Charts.lineChart(box, {
      id: "log_z", title: "Output logits: log Z = logsumexp over the vocabulary", unit: "nats", log: 0, sync: "run", xRange, onStep,
      events: events.filter((e) => e.kind === "log_z_drift"),
      series: [["log_z_mean", "mean log Z"], ["log_z_max", "largest log Z"], ["logit_absmax", "largest |logit|"]]
        .map(([key, label]) => ({ label, steps: forward.steps, values: forward[key] })),
    });
  }

  // Live: poll the tail (the steps after the last one shown) and append to every chart.
  function follow(run, after, live) {
    let last = after;
    const tick = async () => {
      const tail = await apiRun(run, "/tail", { after: last });
      if (tail.steps.length) {
        for (const { entry, metrics } of live) entry.append(tail.steps, metrics.map((m) => tail.values[m] || tail.steps.map(() => null)));
        last = tail.steps[tail.steps.length - 1];
        document.getElementById("run-last-step").textContent = String(last);
      }
      if (tail.events.length) {
        for (const { entry } of live) entry.addEvents(tail.events);
        const body = document.querySelector("#events-table tbody");
        if (body) body.append(...tail.events.map((e) => eventRow(run, e)));
      }
      const status = document.getElementById("run-status");
      status.textContent = tail.status; status.className = "status " + tail.status;
      document.body.dataset.liveStep = String(last);
      if (tail.truncated) return tick();
      if (tail.status === "running" || tail.status === "stale") setTimeout(() => tick().catch(NW.showError), POLL_MS);
    };
    setTimeout(() => tick().catch(NW.showError), POLL_MS);
  }

  // Which layers must stay in higher precision: per weight tensor the SQNR of each scheme, worst first.
  function quantizationTable(q) {
    if (q.step === null) return el("p", { class: "muted", id: "quantization-none" }, "no quantization measurement yet (every quant_every steps, and at close())");
    const schemes = ["int8", "int4", "nf4", "fp8"];
    const head = el("tr", {}, ["tensor", "shape", ...schemes.map((s) => `${s} dB`)].map((h) => el("th", {}, h)));
    const rows = q.tensors.map((t) => el("tr", {}, el("td", { class: "mono" }, t.tensor), el("td", { class: "mono" }, t.shape.join("×")),
      schemes.map((s) => el("td", { class: "num" }, fmt(t.sqnr_db[s])))));
    return el("div", { class: "table-wrap" },
      el("p", { class: "muted small" }, `SQNR 20·log10(‖w‖/‖w−Q(w)‖) of the weights at step ${q.step}, lowest ${q.sort} first: the layers to keep in higher precision when this checkpoint is deployed.`),
      el("table", { class: "quantization", id: "quantization-table" }, el("thead", {}, head), el("tbody", {}, rows)));
  }

  // Multi-rank runs: each rank's own health (its gradient before the all-reduce, its compute time).
  function ranksSection(slot, run, view, onStep, xRange) {
    const named = [];
    for (const kind of ["rank_nonfinite", "straggler", "replica_divergence", "rank_outlier"]) {
      const e = view.events.find((x) => x.kind === kind);
      if (e) named.push(el("li", {}, NW.link(NW.stepUrl(run, e.step), `step ${e.step}`), ": ", el("strong", {}, (e.details || {}).message || kind),
        (e.details || {}).diagnosis ? ` — ${e.details.diagnosis}` : ""));
    }
    slot.append(el("div", { id: "ranks-named" }, named.length ? el("ol", {}, named)
      : el("p", { class: "ok" }, `No rank stood out among ${view.ranks.length} ranks (judged through step ${view.judged_through}).`)));
    Charts.heatmap(slot, { id: "ranks-heatmap", title: "Each rank's gradient norm before the all-reduce", stat: "local grad norm",
      cells: view.local_grad_norm, tensors: view.ranks.map((r) => `rank ${r}`), onStep, empty: "no rank sent its local gradient (DDP only)",
      subtitle: "Rows: ranks; columns: the whole run (each step, or each bucket of steps at its largest; NaN where the rank's own gradient held NaN/Inf). Log colour scale; NaN and +Inf in their own colours: a rank whose row turns first is where the values went non-finite." });
    const lines = Object.entries(view.compute_time);
    Charts.lineChart(slot, { id: "ranks-compute", title: "Compute time per rank", unit: "seconds", log: 0, sync: "run", xRange, onStep,
      subtitle: `forward + backward before waiting on the reduction; ${lines.length < view.ranks.length ? `the ${lines.length} ranks farthest from the median` : "every rank"}`,
      series: lines.map(([rank, s]) => ({ label: `rank ${rank}`, ...s })) });
    const cell = (v) => el("td", { class: "num" }, v === null || v === undefined ? "–" : fmt(v));
    const rows = view.latest.map((r) => el("tr", { class: NW.num(r.deviation) > Math.log(2) ? "deviating" : "" },
      el("td", { class: "num" }, String(r.rank)), el("td", { class: "num" }, NW.link(NW.stepUrl(run, r.step), String(r.step))),
      cell(r.local_grad_norm), el("td", { class: "num" }, r.local_nonfinite === null ? "–" : String(r.local_nonfinite)), cell(r.compute_time), cell(r.loss),
      el("td", { class: "num" }, NW.num(r.deviation) === Infinity ? "non-finite" : `×${fmt(Math.exp(NW.num(r.deviation)), 3)}`)));
    slot.append(el("h3", {}, "Latest per rank, farthest from the ranks' median first"),
      el("div", { class: "table-wrap" }, el("table", { class: "ranks", id: "ranks-table" },
        el("thead", {}, el("tr", {}, ["rank", "step", "local grad norm", "non-finite", "compute s", "loss", "off the median"].map((h) => el("th", {}, h)))),
        el("tbody", {}, rows))));
    if (view.missing.length) {
      slot.append(el("p", { class: "muted", id: "ranks-missing" }, "Missing when judged: ",
        view.missing.slice(-10).map((g, i) => [i ? "; " : "", `steps ${g.first}–${g.last}: rank${g.ranks.length > 1 ? "s" : ""} ${g.ranks.join(", ")}`])));
    }
  }

  // Low-precision readiness of the matmuls: per Linear the SQNR of each scheme on X, W and dY, the layers
  // with the worst pair under the chosen recipe first; those below the threshold are to be kept in bf16.
  const GEMM_OPERANDS = [["x", "X (input)", "e4m3"], ["w", "W (weight)", "e4m3"], ["dy", "dY (output grad)", "e5m2"]];
  const GEMM_SCHEMES = { e4m3: "e4m3", e5m2: "e5m2", mxfp8: "MX", mxfp8_up: "MX↑", nvfp4: "NV" };
  const pct = (v) => { const n = NW.num(v); return n === null ? "–" : Number.isFinite(n) ? `${(100 * n).toPrecision(2)}%` : fmt(v); };

  function gemmRows(table) {
    return table.layers.map((layer) => {
      const worst = layer.operands[layer.worst.operand].schemes[layer.worst.scheme];
      const cells = GEMM_OPERANDS.flatMap(([operand, , fp8]) => [fp8, "mxfp8", "mxfp8_up", "nvfp4"].map((scheme) => {
        const m = layer.operands[operand].schemes[scheme];
        const low = !(NW.num(m.sqnr_db) >= table.threshold_db);
        return el("td", { class: "num" + (low ? " low" : ""), title: `${operand} · ${scheme}: flushed ${pct(m.flushed)}, saturated ${pct(m.saturated)}` }, fmt(m.sqnr_db, 3));
      }));
      return el("tr", { class: layer.keep_bf16 ? "keep-bf16" : "" },
        el("td", { class: "mono" }, layer.tensor), el("td", {}, layer.keep_bf16 ? el("strong", {}, "yes") : "no"),
        el("td", { class: "mono" }, `${layer.worst.operand} · ${layer.worst.scheme}`), el("td", { class: "num" }, fmt(layer.worst.sqnr_db, 3)),
        el("td", { class: "num" }, pct(worst.flushed)), el("td", { class: "num" }, pct(worst.saturated)), cells,
        GEMM_OPERANDS.map(([operand]) => el("td", { class: "num" }, fmt(layer.operands[operand].range_bits, 3))));
    });
  }

  function gemmTable(table) {
    if (table.step === null) return el("p", { class: "muted", id: "gemm-none" }, "no matmul measured yet (every gemm_every steps, F.linear calls of watched weights)");
    const top = el("tr", {}, el("th", { colspan: 6 }, ""), GEMM_OPERANDS.map(([, label]) => el("th", { colspan: 4 }, `${label} SQNR dB`)), el("th", { colspan: 3 }, "range (bits)"));
    const head = el("tr", {}, ["layer (weight)", "keep in bf16", "worst pair", "worst dB", "flushed", "saturated"].map((h) => el("th", {}, h)),
      GEMM_OPERANDS.flatMap(([, , fp8]) => [fp8, "mxfp8", "mxfp8_up", "nvfp4"].map((s) => el("th", { title: s }, GEMM_SCHEMES[s]))),
      GEMM_OPERANDS.map(([operand]) => el("th", {}, operand)));
    const keep = table.layers.filter((l) => l.keep_bf16).length;
    return el("div", { id: "gemm-box" },
      el("p", { class: "muted small" }, `Step ${table.step}: what each scheme's quantize→dequantize round trip would do to every Linear's matmul operands. `,
        `Sorted by the lowest SQNR under the ${table.recipe} recipe; `, el("strong", { id: "gemm-keep" }, `keep these layers in bf16: ${keep} of ${table.layers.length}`),
        ` (SQNR below ${fmt(table.threshold_db)} dB). e4m3/e5m2: fp8 with one per-tensor scale; MX: MXFP8, blocks of 32 with the OCP scale rule; MX↑: MXFP8 with a round-up scale (never saturates); `,
        "NV: NVFP4, blocks of 16. Flushed and saturated: shares of the non-zero elements, for the worst pair (each cell's tooltip has its own). ",
        table.rows ? el("strong", { id: "gemm-rows" }, `Estimates from ${table.rows} evenly spaced rows of each operand, under the whole operand's scales (gemm_rows=${table.rows}; 0 measures every row).`)
          : el("span", { id: "gemm-rows" }, "Every row measured (exact).")),
      el("div", { class: "table-wrap" }, el("table", { class: "gemm", id: "gemm-table" }, el("thead", {}, top, head), el("tbody", {}, gemmRows(table)))));
  }

  return { summary, diagnosis, ranksSection, eventsTable, eventRow, histogramSection, forwardCharts, quantizationTable, gemmTable, follow, detailsText, badge };
})();
