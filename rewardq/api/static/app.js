// rewardq dashboard: fills the server's page shells from the /v1 API and draws charts with Chart.js.
// Text from users (prompts, responses, ids) is only ever set through textContent, never as HTML.
"use strict";

const $main = document.getElementById("main");
const PAGE = document.body.dataset.page;
const PAGE_ID = document.body.dataset.id;
const TERMINAL = new Set(["succeeded", "failed", "cancelled", "rejected"]);
const POLL_MS = 1500;
// Exposed for people poking at the page and for the browser tests.
window.rewardq = { charts: {}, loaded: false, settled: false, polls: 0 };

async function api(path, opts = {}) {
  const headers = { Accept: "application/json", "X-Rewardq-UI": "1" };
  if (opts.body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { credentials: "same-origin", ...opts, headers });
  if (resp.status === 401) {
    location.href = "/ui/login?next=" + encodeURIComponent(location.pathname + location.search);
    throw new Error("signed out");
  }
  if (!resp.ok) {
    let detail = resp.statusText;
    try { detail = (await resp.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(`${resp.status}: ${detail}`);
  }
  return resp.status === 204 ? null : resp.json();
}

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    // Through the CSSOM: the page's CSP (style-src 'self') refuses style attributes, not el.style.
    else if (k === "style") el.style.cssText = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const num = (x, d = 4) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
const int = (x) => (x === null || x === undefined ? "–" : Number(x).toLocaleString("en-US"));
const when = (t) => (t ? new Date(t).toLocaleString() : "–");
const secs = (s) => (s === null || s === undefined ? "–" : s < 120 ? `${s.toFixed(1)} s` : `${(s / 60).toFixed(1)} min`);
const short = (v) => (v && v.length > 20 ? v.slice(0, 20) + "…" : v || "–");

function badge(status) { return h("span", { class: `badge ${status}` }, status); }

function bar(done, failed, total) {
  const pct = (x) => (total ? (100 * x) / total : 100).toFixed(1) + "%";
  return h("div", { class: "bar", title: `${done} scored, ${failed} failed of ${total}` },
    h("span", { style: `width:${pct(done + failed)}`, class: failed ? "failed" : "" }),
    h("span", { style: `width:${pct(done)}` }));
}

function table(headers, rows, attrs = {}) {
  return h("table", attrs,
    h("thead", {}, h("tr", {}, headers.map((c) => h("th", { class: /^#|num:/.test(c) ? "num" : "" }, c.replace(/^num:/, ""))))),
    h("tbody", {}, rows));
}

function flash(message, bad = false) {
  let box = document.getElementById("flash");
  if (!box) { box = h("div", { id: "flash", role: "status" }); document.body.append(box); }
  const item = h("div", { class: bad ? "bad" : "" }, message);
  box.append(item);
  setTimeout(() => item.remove(), 6000);
}

function card(title, ...body) { return h("section", { class: "card" }, title ? h("h2", {}, title) : null, ...body); }

function stats(pairs) { return h("dl", { class: "stats" }, pairs.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])); }

// Re-run `fn` every POLL_MS while it returns true; errors are shown and polling goes on.
// The pause grows with what a poll costs, so a slow database (a huge job) is never asked twice at once.
async function poll(fn) {
  let again = true;
  const t0 = performance.now();
  try { again = await fn(); } catch (e) { flash(e.message, true); }
  window.rewardq.polls += 1;
  window.rewardq.loaded = true;
  if (again) setTimeout(() => poll(fn), Math.max(POLL_MS, 2 * (performance.now() - t0)));
  else window.rewardq.settled = true;  // the page shows its final state (a job that has ended)
}

function chart(name, canvas, config) {
  const old = window.rewardq.charts[name];
  if (old) {
    old.data = config.data;
    old.update("none");
    return old;
  }
  config.options = { responsive: true, maintainAspectRatio: false, animation: false, ...config.options };
  window.rewardq.charts[name] = new Chart(canvas, config);
  return window.rewardq.charts[name];
}

// ---- Jobs -------------------------------------------------------------------------------------

function jobsPage() {
  const body = h("div");
  $main.replaceChildren(h("h1", {}, "Jobs"), card(null, body));
  poll(async () => {
    const { jobs } = await api("/v1/jobs?limit=100");
    body.replaceChildren(jobs.length ? table(["Job", "Status", "Progress", "num:Scored", "num:Failed", "num:Items",
      "Model", "Created", "num:Pairs/s"], jobs.map((j) => h("tr", { "data-job": j.job_id, "data-status": j.status },
      h("td", {}, h("a", { class: "mono", href: `/ui/jobs/${encodeURIComponent(j.job_id)}` }, j.job_id)),
      h("td", {}, badge(j.status)),
      h("td", {}, bar(j.progress.done, j.progress.failed, j.progress.total)),
      h("td", { class: "num" }, int(j.progress.done)),
      h("td", { class: "num" }, int(j.progress.failed)),
      h("td", { class: "num" }, int(j.progress.total)),
      h("td", { class: "mono", title: j.model_version }, short(j.model_version)),
      h("td", {}, when(j.created_at)),
      h("td", { class: "num" }, j.pairs_per_s ? num(j.pairs_per_s, 1) : "–"))), { id: "jobs" })
      : h("p", { class: "muted" }, "No jobs yet. Submit one with ", h("code", {}, "rewardq submit pairs.jsonl"),
        " or POST /v1/jobs."));
    return jobs.some((j) => !TERMINAL.has(j.status));
  });
}

function pairsTable(rows, id) {
  // score_z and percentile place a score in its version's own distribution: comparable across versions.
  return table(["#", "Prompt", "Response", "num:Score", "num:z", "num:Percentile"], rows.map((r) => h("tr", {},
    h("td", { class: "num" }, r.index),
    h("td", { class: "pair" }, r.prompt),
    h("td", { class: "pair" }, r.response),
    h("td", { class: "num" }, num(r.score)),
    h("td", { class: "num", "data-z": r.score_z ?? "" }, r.score_z == null ? "–" : num(r.score_z, 2)),
    h("td", { class: "num" }, r.percentile == null ? "–" : num(r.percentile, 1)))), { id });
}

function jobPage(jobId) {
  const enc = encodeURIComponent(jobId);
  const title = h("h1", {}, "Job ", h("span", { class: "mono" }, jobId), " ");
  const progress = h("div", { id: "progress" });
  const facts = h("div", { id: "facts" });
  const summary = h("div", { id: "summary" }, h("p", { class: "muted" }, "No scores yet."));
  const canvas = h("canvas", { id: "histogram", "aria-label": "score histogram" });
  const failed = h("section", { class: "card", id: "failed", hidden: true });
  const best = h("div", { id: "best" }), worst = h("div", { id: "worst" });
  const downloads = h("p", {},
    h("a", { href: `/v1/jobs/${enc}/results?format=jsonl`, download: `${jobId}.jsonl`, id: "dl-jsonl" }, "results.jsonl"),
    " · ", h("a", { href: `/v1/jobs/${enc}/results?format=csv`, download: `${jobId}.csv`, id: "dl-csv" }, "results.csv"),
    h("span", { class: "muted" }, " (every result, streamed; failed items last, with their reason)"));
  const cancel = h("button", { class: "danger", id: "cancel", hidden: true, onclick: async () => {
    if (!confirm(`Cancel job ${jobId}? Batches not yet scored are dropped.`)) return;
    try { await api(`/v1/jobs/${enc}/cancel`, { method: "POST" }); flash("job cancelled"); } catch (e) { flash(e.message, true); }
  } }, "Cancel job");
  $main.replaceChildren(title,
    card(null, h("div", { class: "toolbar" }, progress, h("span", { class: "spacer" }), cancel), facts),
    h("div", { class: "grid" },
      card("Score distribution", h("div", { class: "chart" }, canvas)),
      card("Summary", summary, h("h2", { style: "margin-top:14px" }, "Download"), downloads)),
    failed,
    h("div", { class: "grid" }, card("Best pairs", best), card("Worst pairs", worst)));
  // The summary, histogram and pairs each read every result: they follow the job at most every 5 s
  // while it runs (progress polls skip the summary), and once more when it has finished.
  let seen = -1, drawnAt = -Infinity;
  poll(async () => {
    let full = performance.now() - drawnAt > 5000;
    let job = await api(`/v1/jobs/${enc}` + (full ? "" : "?summary=false"));
    if (!full && TERMINAL.has(job.status)) {
      job = await api(`/v1/jobs/${enc}`);  // it has just ended: its final summary, shown with the final status
      full = true;
    }
    const p = job.progress;
    title.replaceChildren("Job ", h("span", { class: "mono" }, jobId), " ", badge(job.status));
    progress.replaceChildren(bar(p.done, p.failed, p.total),
      h("span", { id: "progress-text", "data-done": p.done, "data-total": p.total, "data-status": job.status },
        ` ${int(p.done)} / ${int(p.total)} scored` + (p.failed ? `, ${int(p.failed)} failed` : "")));
    progress.style.display = "flex";
    progress.style.gap = "10px";
    progress.style.alignItems = "center";
    cancel.hidden = TERMINAL.has(job.status);
    facts.replaceChildren(stats([
      ["Model version", h("a", { class: "mono", href: "/ui/models", title: job.model_version }, short(job.model_version))],
      ["Created", when(job.created_at)], ["Elapsed", secs(job.elapsed_s)],
      ["Throughput", job.pairs_per_s ? `${num(job.pairs_per_s, 1)} pairs/s` : "–"],
      ["Embedding cache", `${int(job.embed_cache_hits)} hits / ${int(job.embed_cache_misses)} misses`],
      ["Finished", when(job.finished_at)], ["Error", job.error || "–"],
      ["Metadata", Object.keys(job.metadata || {}).length ? JSON.stringify(job.metadata) : "–"]]));
    const s = job.summary;
    if (s && s.count) {
      summary.replaceChildren(stats([["Scored", int(s.count)], ["Mean", num(s.mean)], ["Std", num(s.std)],
        ["Min", num(s.min)], ["p10", num(s.p10)], ["Median", num(s.p50)], ["p90", num(s.p90)], ["Max", num(s.max)]]));
    }
    if (job.failed_items && job.failed_items.length) {
      failed.hidden = false;
      const counts = Object.entries(job.error_counts || {}).map(([c, n]) => `${c}: ${n}`).join(", ");
      failed.replaceChildren(h("h2", {}, `Failed items (${int(p.failed)})`), h("p", { class: "muted" }, counts),
        table(["#", "Id", "Reason", "Message"], job.failed_items.map((f) => h("tr", {},
          h("td", { class: "num" }, f.index), h("td", { class: "mono" }, f.id), h("td", {}, badge(f.code)),
          h("td", {}, f.message))), { id: "failed-items" }),
        p.failed > job.failed_items.length ? h("p", { class: "muted" }, "The first 100 are shown; the downloads hold all.") : null);
    }
    if (full) drawnAt = performance.now();
    if (full && s && s.count !== seen) {
      seen = s.count;
      // Aggregates come from SQL: the browser gets 40 bins and ten pairs, whatever the job's size.
      const [hist, top, bottom] = await Promise.all([api(`/v1/jobs/${enc}/histogram?bins=40`),
        api(`/v1/jobs/${enc}/results?sort=-score&limit=5`), api(`/v1/jobs/${enc}/results?sort=score&limit=5`)]);
      chart("histogram", canvas, {
        type: "bar",
        data: { labels: hist.bins.map((b) => b.lo.toFixed(3)),
          datasets: [{ label: "items", data: hist.bins.map((b) => b.count), backgroundColor: "#2f5bd3",
            barPercentage: 1.0, categoryPercentage: 1.0 }] },
        options: { plugins: { legend: { display: false },
          tooltip: { callbacks: { title: (items) => { const b = hist.bins[items[0].dataIndex];
            return `${b.lo.toFixed(4)} – ${b.hi.toFixed(4)}`; } } } },
          scales: { x: { title: { display: true, text: "reward score" }, ticks: { maxTicksLimit: 8 } },
            y: { title: { display: true, text: "items" }, beginAtZero: true } } },
      });
      canvas.dataset.total = hist.bins.reduce((a, b) => a + b.count, 0);
      best.replaceChildren(top.results.length ? pairsTable(top.results, "best-pairs") : h("p", { class: "muted" }, "–"));
      worst.replaceChildren(bottom.results.length ? pairsTable(bottom.results, "worst-pairs") : h("p", { class: "muted" }, "–"));
    }
    return !TERMINAL.has(job.status);
  });
}

// ---- Models -----------------------------------------------------------------------------------

function modelsPage() {
  const body = h("div", { id: "models" });
  const canvas = h("canvas", { id: "model-metrics", "aria-label": "held-out metrics by version" });
  const empty = h("p", { class: "muted" }, "No training run has produced a version yet.");
  $main.replaceChildren(h("h1", {}, "Models"),
    h("p", { class: "muted" }, "Your new jobs are pinned to your active version (the operator's default until you choose one); jobs already submitted keep theirs. Shared versions are every tenant's; your own come from your training runs."),
    card(null, body), card("Gate decisions: candidate vs the active version on each run's held-out feedback", empty,
      h("div", { class: "chart" }, canvas)));
  const load = async () => {
    const [{ active, default: dflt, models }, { runs }] = await Promise.all([api("/v1/models"), api("/v1/training-runs?limit=500")]);
    const byRun = Object.fromEntries(runs.map((r) => [r.run_id, r]));
    const activeAt = (models.find((m) => m.active) || {}).created_at;
    body.replaceChildren(table(["Version", "Kind", "Owner", "Base", "Created", "num:Pairwise acc.", "num:Spearman", "num:Held-out n",
      "Run", "Gate", ""], models.map((m) => {
      const run = byRun[m.run_id];
      const gate = run && run.metrics && run.metrics.gate;
      const vs = run && run.metrics && run.metrics.active;
      let action;
      if (m.active) action = badge("active");
      else {
        const label = activeAt && m.created_at < activeAt ? "Roll back to this" : "Activate";
        action = h("button", { class: "secondary", "data-activate": m.version, onclick: async (ev) => {
          if (!confirm(`Make ${m.version} the active version?\nNew jobs will be scored with it; jobs already submitted keep their version.`)) return;
          ev.target.disabled = true;
          try { await api(`/v1/models/${encodeURIComponent(m.version)}/activate`, { method: "POST" });
            flash(`${m.version} is now active`); } catch (e) { flash(e.message, true); }
          await load();
        } }, label);
      }
      return h("tr", { "data-version": m.version, "data-active": m.active ? "1" : "0", "data-kind": m.kind },
        h("td", { class: "mono", title: m.name || "" }, m.version, m.version === dflt ? h("span", { class: "muted" }, " (default)") : null),
        h("td", {}, m.kind), h("td", {}, m.owner), h("td", { class: "mono" }, m.base_model), h("td", {}, when(m.created_at)),
        h("td", { class: "num" }, num(m.metrics.pairwise_accuracy, 3)), h("td", { class: "num" }, num(m.metrics.spearman, 3)),
        h("td", { class: "num" }, m.metrics.n ?? "–"),
        h("td", {}, m.run_id ? h("a", { class: "mono", href: `/ui/runs/${encodeURIComponent(m.run_id)}` }, short(m.run_id)) : "–"),
        h("td", {}, gate ? [badge(gate.decision), vs ? h("span", { class: "muted" },
          ` vs ${short(vs.version)} ${num(vs[gate.metric], 3)}`) : null] : "–"),
        h("td", {}, action));
    }), { id: "models-table" }));
    // Each run scored its candidate and the then-active version on the same held-out split: compare those.
    const gated = runs.filter((r) => r.result_version && r.metrics && r.metrics.candidate && r.metrics.active).reverse();
    const metric = (m) => (m && m.pairwise_accuracy !== undefined ? m.pairwise_accuracy : null);
    chart("models", canvas, {
      type: "bar",
      data: { labels: gated.map((r) => short(r.result_version) + (r.result_version === active ? " (active)" : "")),
        datasets: [{ label: "candidate (this version)", data: gated.map((r) => metric(r.metrics.candidate)), backgroundColor: "#2f5bd3", maxBarThickness: 80 },
          { label: "active version at the time", data: gated.map((r) => metric(r.metrics.active)), backgroundColor: "#9ca3af", maxBarThickness: 80 }] },
      options: { scales: { y: { suggestedMin: 0, suggestedMax: 1, title: { display: true, text: "held-out pairwise accuracy" } } } },
    });
    empty.hidden = gated.length > 0;
    window.rewardq.active = active;
    return false;
  };
  poll(load);
}

// ---- Training runs ----------------------------------------------------------------------------

function gateCell(r) {
  const g = r.metrics && r.metrics.gate;
  return g ? badge(g.decision) : "–";
}

function runsPage() {
  const body = h("div", { id: "runs" });
  const train = h("button", { id: "train-now", onclick: async () => {
    if (!confirm("Start a fine-tuning run now on all of this tenant's feedback?")) return;
    try { const r = await api("/v1/training-runs", { method: "POST", body: "{}" });
      location.href = `/ui/runs/${encodeURIComponent(r.run_id)}`; } catch (e) { flash(e.message, true); }
  } }, "Train now");
  $main.replaceChildren(h("div", { class: "toolbar" }, h("h1", {}, "Training runs"), h("span", { class: "spacer" }), train),
    card(null, body));
  poll(async () => {
    const { runs } = await api("/v1/training-runs?limit=200");
    body.replaceChildren(runs.length ? table(["Run", "Status", "Progress", "num:Feedback", "Candidate acc.", "Active acc.",
      "Gate", "Result version", "Created"], runs.map((r) => {
      const steps = r.progress.total_steps || 0;
      return h("tr", { "data-run": r.run_id },
        h("td", {}, h("a", { class: "mono", href: `/ui/runs/${encodeURIComponent(r.run_id)}` }, r.run_id)),
        h("td", {}, badge(r.status)),
        h("td", {}, steps ? bar(r.progress.step || 0, 0, steps) : "–"),
        h("td", { class: "num" }, int(r.n_feedback)),
        h("td", { class: "num" }, num(r.metrics.candidate && r.metrics.candidate.pairwise_accuracy, 3)),
        h("td", { class: "num" }, num(r.metrics.active && r.metrics.active.pairwise_accuracy, 3)),
        h("td", {}, gateCell(r)), h("td", { class: "mono" }, short(r.result_version)), h("td", {}, when(r.created_at)));
    }), { id: "runs-table" }) : h("p", { class: "muted" }, "No training runs yet. Add feedback, then train now or add a schedule."));
    return runs.some((r) => !TERMINAL.has(r.status));
  });
}

const metricText = (x) => (Number.isInteger(x) ? int(x) : num(x, 4));

function runPage(runId) {
  const enc = encodeURIComponent(runId);
  const title = h("h1", {}, "Training run ", h("span", { class: "mono" }, runId));
  const facts = h("div", { id: "run-facts" });
  const canvas = h("canvas", { id: "loss-curve", "aria-label": "training loss" });
  const metrics = h("div", { id: "run-metrics" }, h("p", { class: "muted" }, "Held-out metrics appear when the run ends."));
  const params = h("div", { id: "run-params" });
  const validation = h("div", { id: "run-validation" }, h("p", { class: "muted" }, "Scored after each epoch."));
  const feedback = h("div", { id: "run-feedback" }, h("p", { class: "muted" }, "Counted when the run starts."));
  $main.replaceChildren(title, card(null, facts),
    h("div", { class: "grid" }, card("Loss curve", h("div", { class: "chart" }, canvas)), card("Held-out metrics", metrics)),
    h("div", { class: "grid" }, card("Validation slice: picks the epoch", validation), card("Feedback", feedback)),
    card("Parameters", params));
  poll(async () => {
    const r = await api(`/v1/training-runs/${enc}`);
    const p = r.progress || {};
    title.replaceChildren("Training run ", h("span", { class: "mono" }, runId), " ", badge(r.status));
    facts.replaceChildren(stats([["Status", r.status], ["Step", p.total_steps ? `${p.step} / ${p.total_steps}` : "–"],
      ["Epoch", p.epoch ?? "–"], ["Feedback rows", int(r.n_feedback)], ["Trained from", short(r.start_version)],
      ["Gated against", short(r.base_version)],
      ["Result version", short(r.result_version)], ["Started", when(r.started_at)], ["Finished", when(r.finished_at)]]),
      ...(r.error ? [h("p", { class: "error" }, r.error)] : []),
      ...(r.status === "queued" ? [h("p", { class: "muted", id: "queued-hint" }, "Waiting for a worker that consumes the " +
        "training queue: `rewardq worker` serves it by default (a worker started with -Q scoring alone does not).")] : []));
    chart("loss", canvas, {
      type: "line",
      data: { labels: r.loss_curve.map((_, i) => i + 1),
        datasets: [{ label: "training loss", data: r.loss_curve, borderColor: "#2f5bd3", pointRadius: 0, tension: 0.2 }] },
      options: { scales: { x: { title: { display: true, text: "logged step" } }, y: { title: { display: true, text: "loss" } } } },
    });
    canvas.dataset.points = r.loss_curve.length;
    const c = r.metrics.candidate, a = r.metrics.active, g = r.metrics.gate;
    if (c && a) {
      metrics.replaceChildren(table(["Metric", "num:Candidate", "num:Active"], ["pairwise_accuracy", "spearman", "comparisons", "n"]
        .map((k) => h("tr", {}, h("td", {}, k), h("td", { class: "num" }, metricText(c[k])), h("td", { class: "num" }, metricText(a[k]))))),
      g ? h("p", {}, "Gate: ", badge(g.decision), ` on ${g.metric}, margin ${g.margin} (active: ${short(a.version)})`) : null);
    }
    const val = r.metrics.validation;
    if (val && val.epochs && val.epochs.length) {
      validation.replaceChildren(table(["Epoch", "num:Pairwise accuracy", "num:Spearman"], val.epochs.map((e) =>
        h("tr", { class: e.epoch === val.best_epoch ? "best" : "" }, h("td", {}, e.epoch === val.best_epoch ? `${e.epoch} (kept)` : `${e.epoch}`),
          h("td", { class: "num" }, metricText(e.pairwise_accuracy)), h("td", { class: "num" }, metricText(e.spearman))))),
      h("p", { class: "muted" }, `${int(val.n)} rows, ${int(val.comparisons)} comparisons; ${val.stopped_early ? "stopped early" :
        "ran every epoch"} (patience ${val.patience}).`));
    } else if (val) {
      validation.replaceChildren(h("p", { class: "muted" }, val.early_stopping ? "Scored after each epoch." :
        "No validation slice (or it implies no comparison): the last epoch is kept."));
    }
    const f = r.metrics.feedback;
    if (f) {
      const rows = [["rows", f.rows], ["usable after merging", f.usable], ["duplicates", f.duplicates],
        ["contradictory ratings", f.contradictory_ratings], ["contradictory preferences", f.contradictory_preferences],
        ["train slice", f.train], ["validation slice", f.validation], ["gate slice", f.gate], ["gate comparisons", f.gate_comparisons]]
        .filter(([, x]) => x !== undefined);
      feedback.replaceChildren(table(["Feedback", "num:Count"], rows.map(([k, x]) => h("tr", {}, h("td", {}, k), h("td", { class: "num" }, int(x))))),
        ...(f.warnings || []).map((w) => h("p", { class: "warning" }, w)));
    }
    params.replaceChildren(table(["Parameter", "Value"], Object.entries(r.params).map(([k, v]) =>
      h("tr", {}, h("td", {}, k), h("td", { class: "mono" }, JSON.stringify(v))))));
    return !TERMINAL.has(r.status);
  });
}

// ---- Schedules --------------------------------------------------------------------------------

function schedulesPage() {
  const body = h("div", { id: "schedules" });
  const field = (label, attrs) => h("label", {}, label, h("input", attrs));
  // Epochs and layers start blank, showing the kind's defaults (GET /v1/training-runs/defaults): a blank field is
  // left out of the request, so the API fills in the kind's default.
  const kind = h("select", { name: "kind" }, h("option", { value: "sim_exp" }, "sim_exp"),
    h("option", { value: "classifier" }, "classifier (cross-encoder)"));
  const epochs = h("input", { name: "epochs", type: "number", min: 1, max: 100, style: "width:80px" });
  const layers = h("input", { name: "train_layers", type: "number", min: 0, max: 48, style: "width:90px" });
  let defaults = {}; // each trainable kind's defaults, once the API has answered
  const byKind = () => {
    const clf = kind.value === "classifier";
    const own = defaults[kind.value] || {};
    epochs.placeholder = own.epochs ?? "";
    layers.placeholder = clf ? "all" : own.train_layers ?? "";
    layers.disabled = clf; // a classifier run trains every layer
    if (clf) layers.value = "";
  };
  kind.addEventListener("change", byKind);
  byKind();
  const form = h("form", { class: "inline", id: "add-schedule" },
    field("cron (UTC)", { name: "cron", required: true, placeholder: "0 3 * * *", size: 16 }),
    field("min new feedback", { name: "min_new_feedback", type: "number", min: 0, value: 0, style: "width:110px" }),
    h("label", {}, "kind", kind), h("label", {}, "epochs", epochs), h("label", {}, "train layers", layers),
    h("button", { type: "submit" }, "Add schedule"));
  const load = async () => {
    const { schedules } = await api("/v1/schedules");
    body.replaceChildren(schedules.length ? table(["Schedule", "Cron", "num:Min new feedback", "Params", "Next run",
      "Last fired", ""], schedules.map((s) => h("tr", { "data-schedule": s.schedule_id },
      h("td", { class: "mono" }, s.schedule_id), h("td", { class: "mono" }, s.cron), h("td", { class: "num" }, s.min_new_feedback),
      h("td", { class: "mono" }, JSON.stringify(s.params)), h("td", {}, when(s.next_run_at)), h("td", {}, when(s.last_fired_at)),
      h("td", {}, h("button", { class: "danger", "data-delete": s.schedule_id, onclick: async () => {
        if (!confirm(`Delete schedule ${s.schedule_id} (${s.cron})?`)) return;
        try { await api(`/v1/schedules/${encodeURIComponent(s.schedule_id)}`, { method: "DELETE" }); flash("schedule deleted"); }
        catch (e) { flash(e.message, true); }
        await load();
      } }, "Delete")))), { id: "schedules-table" }) : h("p", { class: "muted" }, "No schedules."));
    return false;
  };
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(form);
    // A blank field is left out: the API fills in the kind's default, never a value made up here.
    const params = Object.fromEntries(["epochs", "train_layers"].filter((k) => String(f.get(k) ?? "").trim() !== "")
      .map((k) => [k, Number(f.get(k))]));
    params.kind = f.get("kind");
    const payload = { cron: f.get("cron").trim(), min_new_feedback: Number(f.get("min_new_feedback") || 0), params };
    try {
      await api("/v1/schedules", { method: "POST", body: JSON.stringify(payload) });
      form.reset(); byKind(); flash("schedule added");
    }
    catch (e) { flash(e.message, true); }
    await load();
  });
  $main.replaceChildren(h("h1", {}, "Schedules"),
    card("Add a retraining schedule", form, h("p", { class: "muted" }, "Fired by ", h("code", {}, "rewardq beat"),
      "; a tick with fewer new feedback rows than the minimum is skipped.")),
    card(null, body));
  api("/v1/training-runs/defaults").then((d) => { defaults = d.kinds; byKind(); })
    .catch((e) => flash(e.message, true));
  poll(load);
}

const PAGES = { jobs: jobsPage, job: () => jobPage(PAGE_ID), models: modelsPage, runs: runsPage,
  run: () => runPage(PAGE_ID), schedules: schedulesPage };
if (PAGES[PAGE]) PAGES[PAGE]();
else window.rewardq.loaded = true;
