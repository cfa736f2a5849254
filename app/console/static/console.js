// The web console: sign-in, datasets, jobs with live curves, the new-job form, adapters and the playground.
// Plain ES modules talking to the public API with the user's key; every view is a function of `main`.
import { Api, ApiError } from "./api.js";
import { histogram, lineChart } from "./chart.js";

const KEY_STORAGE = "adaptery.api_key";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const COLORS = { train: "#2563eb", valid: "#ea580c", lr: "#16a34a" };
let api = null;
let cleanups = []; // what the current view must stop when the user leaves it (timers, streams)

// ------------------------------------------------------------------ small helpers

function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "class") element.className = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  element.append(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false)
    .map((c) => (c instanceof Node ? c : String(c))));
  return element;
}

function onLeave(callback) { cleanups.push(callback); }
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const when = (unix) => (unix ? new Date(unix * 1000).toLocaleString() : "");
const number = (value, digits = 4) => (value === null || value === undefined ? "–"
  : typeof value === "number" ? String(Number(value.toPrecision(digits))) : String(value));

function duration(seconds) {
  if (seconds === null || seconds === undefined || seconds < 0) return "";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

function statusBadge(status, id) { return h("span", { class: `badge ${status}`, id }, status.replace("_", " ")); }

function alertBox(id) { return h("div", { class: "alert", role: "alert", id, hidden: true }); }

function showError(box, error) {
  box.hidden = false;
  box.replaceChildren(error instanceof ApiError && error.param
    ? h("span", {}, error.message, " ", h("code", {}, error.param)) : String(error.message || error));
}

function table(headers, rows, attrs = {}) {
  return h("table", attrs, h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))), h("tbody", {}, rows));
}

function section(title, ...children) { return h("section", { class: "card" }, h("h3", {}, title), ...children); }

async function download(path, filename) {
  const blob = await api.blob(path);
  const link = h("a", { href: URL.createObjectURL(blob), download: filename });
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

// Calls `fn` now and every `ms` until the view is left.
function every(ms, fn) {
  let stopped = false;
  const loop = async () => {
    while (!stopped) {
      await fn().catch(() => {});
      await sleep(ms);
    }
  };
  onLeave(() => { stopped = true; });
  loop();
}

// ------------------------------------------------------------------ sign-in

function signInView(main) {
  const box = alertBox("sign-in-error");
  const input = h("input", { type: "password", id: "api-key", autocomplete: "current-password", required: true,
    placeholder: "sk-…", size: 48 });
  main.append(h("section", { class: "card narrow" },
    h("h2", {}, "Sign in"),
    h("p", {}, "Paste an API key of your tenant. It stays in this browser (local storage) until you sign out."),
    h("form", { id: "sign-in", onsubmit: async (event) => {
      event.preventDefault();
      const candidate = new Api(input.value.trim());
      try {
        await candidate.get("/v1/models");
      } catch (error) {
        showError(box, error.status === 401 ? new Error("That key was not accepted.") : error);
        return;
      }
      localStorage.setItem(KEY_STORAGE, candidate.key);
      api = candidate;
      location.hash = "#/jobs";
      route();
    } }, h("label", {}, "API key ", input), " ", h("button", { type: "submit" }, "Sign in")),
    box));
}

// ------------------------------------------------------------------ datasets

// "line 3: not valid JSON; line 7: …; and 4 more problem(s)" → [[3, "not valid JSON"], …], "and 4 more …".
function problemLines(message) {
  const found = [...message.matchAll(/line (\d+): (.*?)(?=; line \d+: |; and \d+ more problem|$)/g)];
  const more = message.match(/and \d+ more problem\(s\)/);
  return { lines: found.map((m) => [Number(m[1]), m[2]]), more: more ? more[0] : null };
}

async function showProblems(box, file, error) {
  box.hidden = false;
  const { lines, more } = problemLines(error.message);
  const text = lines.length ? (await file.text()).split("\n") : [];
  box.replaceChildren(...[
    h("strong", {}, `${file.name} was not accepted`), lines.length ? null : h("p", {}, error.message),
    h("ul", { id: "problems" }, lines.map(([line, problem]) => h("li", { "data-line": line },
      h("b", {}, `line ${line}: `), problem,
      text[line - 1] !== undefined ? h("pre", {}, text[line - 1].slice(0, 300)) : null))),
    more ? h("p", {}, more) : null].filter(Boolean));
}

async function fileDetail(panel, file) {
  const stats = file.stats || {};
  const chart = h("div", { id: "length-histogram" });
  panel.replaceChildren(section(`${file.filename}`,
    h("dl", { class: "facts", id: "file-stats" },
      h("dt", {}, "id"), h("dd", {}, file.id),
      h("dt", {}, "format"), h("dd", {}, file.format || ""),
      h("dt", {}, "examples"), h("dd", { "data-stat": "n_examples" }, file.n_examples),
      h("dt", {}, "tokens"), h("dd", { "data-stat": "n_tokens" }, file.n_tokens),
      h("dt", {}, "trained tokens"), h("dd", {}, stats.trained_tokens ?? "–"),
      h("dt", {}, "tokens per example"),
      h("dd", {}, stats.min_tokens === undefined ? "–" : `${stats.min_tokens}–${stats.max_tokens}, mean `
        + `${stats.mean_tokens}, median ${stats.p50_tokens}, 95th percentile ${stats.p95_tokens}`)),
    chart,
    h("h4", {}, "First examples"), h("div", { id: "file-preview" }, "Loading…"),
    h("button", { class: "danger", onclick: async () => {
      if (!confirm(`Delete ${file.filename}?`)) return;
      await api.request("DELETE", `/v1/files/${file.id}`).catch((e) => alert(e.message));
      panel.replaceChildren();
      route();
    } }, "Delete file")));
  if (stats.length_histogram) histogram(chart, stats.length_histogram);
  const preview = await api.get(`/v1/files/${file.id}/preview`, { limit: 5 });
  panel.querySelector("#file-preview").replaceChildren(...preview.data.map((row) =>
    h("div", { class: "example" }, h("span", { class: "muted" }, `line ${row.line}`),
      h("pre", {}, JSON.stringify(row.example, null, 1).slice(0, 1200)))));
}

async function datasetsView(main) {
  const problems = alertBox("upload-error");
  const status = h("p", { id: "upload-status", class: "muted" });
  const list = h("div", { id: "files" });
  const detail = h("div", { id: "file-detail" });
  const input = h("input", { type: "file", id: "file-input", accept: ".jsonl,.json,application/jsonl", multiple: true,
    onchange: () => uploadAll(input.files) });
  const zone = h("div", { id: "dropzone", class: "dropzone", tabindex: 0 },
    h("p", {}, "Drop JSONL files here, or ", h("label", { class: "link" }, "choose files", input)),
    h("p", { class: "muted" }, "One example per line: chat (messages), prompt + completion, instruction + output, "
      + "or text. Every line is checked before the file is kept."));
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    uploadAll(event.dataTransfer.files);
  });

  async function uploadAll(files) {
    problems.hidden = true;
    for (const file of files) {
      status.textContent = `Uploading ${file.name}…`;
      const form = new FormData();
      form.append("purpose", "fine-tune");
      form.append("file", file, file.name);
      try {
        const created = await api.request("POST", "/v1/files", { form });
        status.textContent = `${file.name}: ${created.n_examples} examples, ${created.n_tokens} tokens.`;
        await refresh();
        await fileDetail(detail, created);
      } catch (error) {
        status.textContent = "";
        if (error instanceof ApiError) await showProblems(problems, file, error);
        else showError(problems, error);
      }
    }
    input.value = "";
  }

  async function refresh() {
    const files = await api.get("/v1/files", { limit: 100 });
    list.replaceChildren(files.data.length ? table(["file", "id", "format", "examples", "tokens", "uploaded"],
      files.data.map((f) => h("tr", { class: "clickable", "data-file": f.id, onclick: () => fileDetail(detail, f) },
        h("td", {}, f.filename), h("td", { class: "mono" }, f.id), h("td", {}, f.format || ""),
        h("td", {}, f.n_examples ?? ""), h("td", {}, f.n_tokens ?? ""), h("td", {}, when(f.created_at)))))
      : h("p", { class: "muted" }, "No files yet."));
  }

  main.append(h("h2", {}, "Datasets"), zone, status, problems, h("div", { class: "split" }, list, detail));
  await refresh();
}

// ------------------------------------------------------------------ jobs

function progressCell(job) {
  const { step, total_steps: total } = job.progress || {};
  if (!total) return h("span", { class: "muted" }, job.status === "succeeded" ? "done" : "–");
  return h("span", { class: "progress-cell" }, h("progress", { value: step, max: total }), ` ${step}/${total}`);
}

function eta(job) {
  if (job.status !== "running" || !job.estimated_finish) return "";
  return duration(job.estimated_finish - Date.now() / 1000);
}

async function jobsView(main) {
  const list = h("div", { id: "jobs" });
  main.append(h("div", { class: "row" }, h("h2", {}, "Fine-tuning jobs"),
    h("a", { href: "#/new", class: "button" }, "New job")), list);
  every(3000, async () => {
    const jobs = await api.get("/v1/fine_tuning/jobs", { limit: 50 });
    list.replaceChildren(jobs.data.length ? table(["job", "model", "method", "status", "progress", "ETA",
      "fine-tuned model", "created"], jobs.data.map((job) => h("tr", { "data-job": job.id },
      h("td", {}, h("a", { href: `#/jobs/${job.id}`, class: "mono" }, job.id)), h("td", {}, job.model),
      h("td", {}, job.method.type), h("td", {}, statusBadge(job.status)), h("td", {}, progressCell(job)),
      h("td", {}, eta(job)), h("td", { class: "mono" }, job.fine_tuned_model || ""),
      h("td", {}, when(job.created_at))))) : h("p", { class: "muted" }, "No jobs yet."));
  });
}

const CURVES = [
  { id: "loss-chart", title: "Loss", series: [["train_loss", "training", COLORS.train],
    ["valid_loss", "validation", COLORS.valid]] },
  { id: "accuracy-chart", title: "Token accuracy", series: [["train_mean_token_accuracy", "training", COLORS.train],
    ["valid_mean_token_accuracy", "validation", COLORS.valid]] },
  { id: "lr-chart", title: "Learning rate", series: [["learning_rate", "learning rate", COLORS.lr]] },
];

function resultTable(result) {
  if (!result) return h("p", { class: "muted" }, "Shown when the job has succeeded.");
  const base = result.base_model || {};
  const rows = [["validation loss", "full_valid_loss"], ["validation token accuracy", "full_valid_mean_token_accuracy"],
    ["validation exact match", "full_valid_exact_match"]].filter(([, key]) => key in result)
    .map(([label, key]) => h("tr", {}, h("td", {}, label), h("td", {}, number(result[key])),
      h("td", {}, number(base[key]))));
  return h("div", {},
    h("p", {}, `Kept step ${result.step ?? "–"}${result.stopped_early ? " (stopped early)" : ""}; final training loss `
      + `${number(result.train_loss)}.`),
    rows.length ? table(["", "fine-tuned", "base model"], rows, { id: "result-table" })
      : h("p", { class: "muted" }, "Give a validation file to compare with the base model."));
}

// Graders the console offers beside exact match: each compares the greedy answer with the line's reference answer.
const ANSWER = { input: "{{sample.output_text}}", reference: "{{item.reference_answer}}" };
const CONSOLE_GRADERS = {
  rouge_l: { type: "text_similarity", evaluation_metric: "rouge_l", ...ANSWER },
  bleu: { type: "text_similarity", evaluation_metric: "bleu", ...ANSWER },
  fuzzy_match: { type: "text_similarity", evaluation_metric: "fuzzy_match", ...ANSWER },
  contains: { type: "string_check", operation: "ilike", ...ANSWER },
};

function evaluationPanel(job) {
  const out = h("div", { id: "evaluation" });
  const file = job.validation_file || job.training_file;
  const grader = h("select", { id: "grader", "aria-label": "grader" }, h("option", { value: "" }, "exact match only"),
    ...Object.keys(CONSOLE_GRADERS).map((name) => h("option", { value: name }, `and ${name.replace("_", " ")}`)));
  const run = h("button", { id: "evaluate", onclick: async () => {
    run.disabled = true;
    try {
      const graders = grader.value ? [{ name: grader.value, ...CONSOLE_GRADERS[grader.value] }] : undefined;
      let evaluation = await api.post("/v1/evaluations", { file, models: [job.model, job.fine_tuned_model], graders });
      while (!TERMINAL.has(evaluation.status)) {
        out.textContent = `Evaluation ${evaluation.id}: ${evaluation.status}…`;
        await sleep(1500);
        evaluation = await api.get(`/v1/evaluations/${evaluation.id}`);
      }
      const graded = (evaluation.graders || []).map((g) => g.name);
      out.replaceChildren(evaluation.results ? table(["model", "loss", "token accuracy", "exact match", "tokens",
        ...graded], evaluation.results.map((r) => h("tr", {}, h("td", { class: "mono" }, r.model),
          h("td", {}, number(r.loss)), h("td", {}, number(r.mean_token_accuracy)), h("td", {}, number(r.exact_match)),
          h("td", {}, r.tokens), ...(r.grades || []).map((g) => h("td", {}, number(g.score))))))
        : h("p", {}, evaluation.error ? evaluation.error.message : evaluation.status));
    } catch (error) {
      out.textContent = error.message;
    }
    run.disabled = false;
  } }, `Evaluate against ${job.model} on ${file}`);
  return job.fine_tuned_model ? h("div", {}, run, " ", grader, out) : h("p", { class: "muted" }, "Available once the job has "
    + "produced a fine-tuned model.");
}

async function jobView(main, jobId) {
  let job = await api.get(`/v1/fine_tuning/jobs/${jobId}`);
  const points = Object.fromEntries(CURVES.flatMap((c) => c.series.map(([key]) => [key, []])));
  const header = h("div", { id: "job-header" });
  const charts = Object.fromEntries(CURVES.map((c) => [c.id, h("div", { id: c.id, class: "chart-box" })]));
  const events = h("ol", { id: "events", class: "events" });
  const checkpoints = h("div", { id: "checkpoints" });
  const result = h("div", { id: "result" });
  const evaluation = h("div");
  const hyper = h("div", { id: "hyperparameters" });
  const streamState = h("span", { id: "stream-state", class: "muted" });
  const actionError = alertBox("action-error");

  const action = (verb) => h("button", { id: `${verb}-job`, class: verb === "cancel" ? "danger" : "", onclick:
    async () => {
      if (verb === "cancel" && !confirm(`Cancel ${jobId}? Its checkpoints are kept; training cannot continue.`)) {
        return;
      }
      try {
        job = await api.post(`/v1/fine_tuning/jobs/${jobId}/${verb}`);
        actionError.hidden = true;
        drawHeader();
      } catch (error) { showError(actionError, error); }
    } }, verb[0].toUpperCase() + verb.slice(1));

  function drawHeader() {
    const running = ["validating_files", "queued", "running"].includes(job.status);
    header.replaceChildren(
      h("div", { class: "row" }, h("h2", { class: "mono" }, job.id), statusBadge(job.status, "job-status"),
        running ? action("pause") : null, job.status === "paused" ? action("resume") : null,
        !TERMINAL.has(job.status) ? action("cancel") : null),
      h("p", {}, `${job.method.type} on ${job.model} · training file ${job.training_file}`,
        job.validation_file ? ` · validation file ${job.validation_file}` : "", " · ", progressCell(job),
        job.status === "running" && job.estimated_finish ? ` · about ${eta(job)} left` : "",
        job.fine_tuned_model ? h("span", {}, " · model ", h("code", { id: "fine-tuned-model" }, job.fine_tuned_model),
          " ", h("a", { href: `#/playground?models=${encodeURIComponent(job.fine_tuned_model)}` }, "chat"))
          : ""),
      job.error ? h("p", { class: "alert" }, `${job.error.code}: ${job.error.message}`) : "", actionError);
    hyper.replaceChildren(table(["hyperparameter", "value"], Object.entries(job.hyperparameters).map(([k, v]) =>
      h("tr", {}, h("td", {}, k), h("td", { class: "mono" }, Array.isArray(v) ? v.join(", ") : String(v))))));
    result.replaceChildren(resultTable(job.result));
    evaluation.replaceChildren(evaluationPanel(job));
  }

  let drawPending = false;
  function drawCharts() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => {
      drawPending = false;
      for (const c of CURVES) {
        lineChart(charts[c.id], { series: c.series.map(([key, label, color]) => ({ name: key, label, color,
          points: points[key] })) });
      }
    });
  }

  async function refreshJob() {
    job = await api.get(`/v1/fine_tuning/jobs/${jobId}`);
    drawHeader();
    const list = await api.get(`/v1/fine_tuning/jobs/${jobId}/checkpoints`, { limit: 100 });
    checkpoints.replaceChildren(list.data.length ? table(["step", "model", "loss", ""], list.data.map((c) =>
      h("tr", { "data-checkpoint": c.fine_tuned_model_checkpoint }, h("td", {}, c.step_number),
        h("td", { class: "mono" }, c.fine_tuned_model_checkpoint),
        h("td", {}, number(c.metrics.valid_loss ?? c.metrics.train_loss)),
        h("td", {}, h("a", { href: `#/playground?models=${encodeURIComponent(job.model)},`
          + `${encodeURIComponent(c.fine_tuned_model_checkpoint)}` }, "chat"))))) : h("p", { class: "muted" },
      "No checkpoints yet."));
  }

  // Status changes arrive as events; a burst of them (a replayed history) costs one refresh, not one each.
  let refreshTimer = null;
  function refreshSoon() {
    if (refreshTimer) return;
    refreshTimer = setTimeout(() => { refreshTimer = null; refreshJob().catch(() => {}); }, 500);
  }
  onLeave(() => clearTimeout(refreshTimer));

  function addEvent(event) {
    if (event.type === "metrics") {
      const data = event.data;
      for (const key of Object.keys(points)) {
        if (typeof data[key] === "number") points[key].push([data.step, data[key]]);
      }
      drawCharts();
    }
    events.prepend(h("li", { class: event.level, "data-type": event.type },
      h("time", {}, new Date(event.created_at * 1000).toLocaleTimeString()), " ", event.message));
  }

  main.append(header, h("div", { class: "charts" }, CURVES.map((c) => section(c.title, charts[c.id]))),
    h("div", { class: "split" }, section("Hyperparameters", hyper),
      section("Result against the base model", result, h("h4", {}, "Evaluation"), evaluation)),
    section("Checkpoints", checkpoints), section("Events ", streamState, events));
  drawHeader();
  drawCharts();
  await refreshJob();

  // The stream replays the whole history, so a reopened page draws every point; a dropped connection
  // resumes after the last event seen (Last-Event-ID), so nothing is drawn twice.
  const controller = new AbortController();
  onLeave(() => controller.abort());
  (async () => {
    let lastId = null;
    let finished = false;
    while (!finished && !controller.signal.aborted) {
      try {
        streamState.textContent = "(live)";
        for await (const message of api.stream(`/v1/fine_tuning/jobs/${jobId}/events?stream=true`,
          { lastEventId: lastId, signal: controller.signal })) {
          if (message.event === "end") { finished = true; break; }
          lastId = message.id;
          const event = JSON.parse(message.data);
          addEvent(event);
          if (event.type !== "metrics") refreshSoon();
        }
      } catch (error) {
        if (controller.signal.aborted) return;
        streamState.textContent = `(reconnecting: ${error.message})`;
        await sleep(2000);
      }
    }
    streamState.textContent = finished ? "(job finished)" : "";
    if (finished) await refreshJob().catch(() => {});
  })();
  every(5000, async () => { if (!TERMINAL.has(job.status)) await refreshJob(); });
}

// ------------------------------------------------------------------ new job

function hyperparameterInput(name, schema, fallback) {
  const options = (schema.anyOf || [schema]).flatMap((s) => s.enum || (s.const !== undefined ? [s.const] : []))
    .filter((v) => v !== "auto");
  const types = (schema.anyOf || [schema]).map((s) => s.type);
  const hint = fallback === undefined || fallback === null ? "" : Array.isArray(fallback) ? fallback.join(",")
    : String(fallback);
  const attrs = { name, id: `hp-${name}`, "data-hyperparameter": name };
  if (options.length) {
    return h("select", attrs, h("option", { value: "" }, `default (${hint})`),
      options.map((o) => h("option", { value: o }, o)));
  }
  if (types.includes("boolean")) {
    return h("select", { ...attrs, "data-kind": "boolean" }, h("option", { value: "" }, `default (${hint})`),
      h("option", { value: "true" }, "true"), h("option", { value: "false" }, "false"));
  }
  if (types.includes("array")) return h("input", { ...attrs, "data-kind": "list", placeholder: hint });
  if (types.includes("integer") || types.includes("number")) {
    return h("input", { ...attrs, type: "number", "data-kind": "number", placeholder: hint,
      min: schema.minimum ?? schema.exclusiveMinimum, max: schema.maximum,
      step: types.includes("integer") ? 1 : "any" });
  }
  return h("input", { ...attrs, placeholder: hint });
}

function rangeText(schema) {
  const low = schema.minimum ?? schema.exclusiveMinimum;
  if (low === undefined && schema.maximum === undefined) return "";
  return ` (${schema.exclusiveMinimum !== undefined ? "more than " : ""}${low} to ${schema.maximum})`;
}

// A base model as the forms show it: its id, then its family, size and context when the server knows them.
function baseModelLabel(m) {
  const size = m.parameters ? `${(m.parameters / 1e6).toFixed(m.parameters < 1e7 ? 1 : 0)}M parameters` : null;
  const facts = [m.family, size, m.context_length ? `${m.context_length} tokens` : null].filter(Boolean);
  return facts.length ? `${m.id} (${facts.join(", ")})` : m.id;
}

async function newJobView(main) {
  const [models, files] = await Promise.all([api.get("/v1/models"), api.get("/v1/files", { limit: 100 })]);
  const box = alertBox("job-error");
  const fields = h("div", { id: "hyperparameter-fields", class: "grid" });
  const processed = files.data.filter((f) => f.status === "processed");
  const fileOptions = (empty) => [empty ? h("option", { value: "" }, empty) : null,
    processed.map((f) => h("option", { value: f.id }, `${f.filename} (${f.n_examples} examples) ${f.id}`))];
  const model = h("select", { name: "model", id: "job-model" },
    models.data.filter((m) => m.owned_by === "system").map((m) => h("option", { value: m.id }, baseModelLabel(m))));
  const training = h("select", { name: "training_file", id: "job-training-file", required: true },
    fileOptions(processed.length ? null : "upload a file first"));
  const validation = h("select", { name: "validation_file", id: "job-validation-file" }, fileOptions("none"));
  const method = h("select", { name: "method", id: "job-method" });
  const suffix = h("input", { name: "suffix", id: "job-suffix", maxlength: 64, placeholder: "optional" });
  let catalogue = [];
  let asked = 0; // answers can arrive out of order: only the latest question's answer is drawn

  async function loadMethods() {
    const chosen = method.value;
    const question = ++asked;
    const answer = await api.get("/v1/fine_tuning/methods", { model: model.value, training_file: training.value });
    if (question !== asked) return;
    catalogue = answer.data;
    method.replaceChildren(...catalogue.map((m) => h("option", { value: m.id, selected: chosen ? m.id === chosen
      : m.default }, m.id + (m.aliases.length ? ` (also ${m.aliases.join(", ")})` : ""))));
    drawFields();
  }

  function drawFields() {
    const entry = catalogue.find((m) => m.id === method.value);
    if (!entry) return;
    const old = Object.fromEntries([...fields.querySelectorAll("[data-hyperparameter]")].map((e) => [e.name,
      e.value]));
    fields.replaceChildren(...Object.entries(entry.hyperparameters.properties).map(([name, schema]) => {
      const input = hyperparameterInput(name, schema, entry.defaults[name]);
      if (old[name]) input.value = old[name];
      return h("label", { title: schema.description || "" }, h("span", {}, name),
        input, h("small", { class: "muted" }, (schema.description || "") + rangeText(schema)));
    }));
  }

  function hyperparameters() {
    const values = {};
    for (const input of fields.querySelectorAll("[data-hyperparameter]")) {
      const raw = input.value.trim();
      if (!raw) continue;
      const kind = input.dataset.kind;
      values[input.name] = kind === "number" ? Number(raw) : kind === "boolean" ? raw === "true"
        : kind === "list" ? raw.split(",").map((s) => s.trim()).filter(Boolean) : raw;
    }
    return values;
  }

  model.addEventListener("change", loadMethods);
  training.addEventListener("change", loadMethods);
  method.addEventListener("change", drawFields);
  main.append(h("h2", {}, "New fine-tuning job"), h("form", { id: "new-job", class: "card", onsubmit:
    async (event) => {
      event.preventDefault();
      box.hidden = true;
      for (const marked of fields.querySelectorAll(".invalid")) marked.classList.remove("invalid");
      const body = { model: model.value, training_file: training.value,
        method: { type: method.value, [method.value]: { hyperparameters: hyperparameters() } } };
      if (validation.value) body.validation_file = validation.value;
      if (suffix.value.trim()) body.suffix = suffix.value.trim();
      try {
        const job = await api.post("/v1/fine_tuning/jobs", body);
        location.hash = `#/jobs/${job.id}`;
      } catch (error) {
        showError(box, error);
        const name = (error.param || "").split(".").pop();
        fields.querySelector(`[data-hyperparameter="${CSS.escape(name)}"]`)?.classList.add("invalid");
      }
    } },
  h("div", { class: "grid" }, h("label", {}, h("span", {}, "base model"), model),
    h("label", {}, h("span", {}, "method"), method), h("label", {}, h("span", {}, "training file"), training),
    h("label", {}, h("span", {}, "validation file"), validation), h("label", {}, h("span", {}, "suffix"), suffix)),
  h("h3", {}, "Hyperparameters"),
  h("p", { class: "muted" }, "Empty fields take the default shown; defaults marked auto depend on the training "
    + "file's size."), fields, box, h("button", { type: "submit", id: "create-job" }, "Start training")));
  await loadMethods();
}

// ------------------------------------------------------------------ adapters

async function adaptersView(main) {
  const list = h("div", { id: "adapters" });
  const box = alertBox("adapter-error");
  const act = (adapter, verb) => h("button", { "data-action": verb, onclick: async () => {
    try {
      await api.post(`/v1/adapters/${encodeURIComponent(adapter.id)}/${verb}`);
      box.hidden = true;
      await refresh();
    } catch (error) { showError(box, error); }
  } }, verb);

  async function refresh() {
    const adapters = await api.get("/v1/adapters");
    list.replaceChildren(adapters.data.length ? table(["model", "base", "method", "rank", "state", "size",
      "load", ""], adapters.data.map((a) => h("tr", { "data-adapter": a.id, "data-name": a.name },
      h("td", { class: "mono" }, a.name), h("td", {}, a.base_model), h("td", {}, a.method), h("td", {}, a.rank ?? ""),
      h("td", {}, statusBadge(a.state), a.pinned ? h("span", { class: "badge pinned" }, "pinned") : "",
        a.error ? h("small", { class: "alert" }, a.error) : ""),
      h("td", {}, `${(a.size_bytes / 1024).toFixed(0)} KiB`), h("td", {}, a.load_ms ? `${number(a.load_ms, 3)} ms`
        : ""),
      h("td", { class: "actions" }, act(a, a.pinned ? "unpin" : "pin"),
        act(a, a.state === "active" ? "unload" : "load"),
        h("button", { "data-action": "download", onclick: () => download(`/v1/adapters/${encodeURIComponent(a.id)}/content`,
          `${a.name.replace(/[^\w.-]+/g, "_")}.zip`).catch((e) => showError(box, e)) }, "download"),
        h("a", { href: `#/playground?models=${encodeURIComponent(a.name)}` }, "chat"),
        h("button", { "data-action": "delete", class: "danger", onclick: async () => {
          if (!confirm(`Delete ${a.name}? Requests running on it finish; then it is gone.`)) return;
          try {
            await api.request("DELETE", `/v1/models/${encodeURIComponent(a.name)}`);
            box.hidden = true;
            await refresh();
          } catch (error) { showError(box, error); }
        } }, "delete")))))
      : h("p", { class: "muted" }, "No adapters yet: train one or import one."));
    const aliases = await api.get("/v1/aliases");
    const aliasAct = (alias, label, method, path) => h("button", { "data-action": label, onclick: async () => {
      try {
        await api.request(method, path);
        box.hidden = true;
        await refresh();
      } catch (error) { showError(box, error); }
    } }, label);
    aliasList.replaceChildren(aliases.data.length ? table(["alias", "points to", "since", ""],
      aliases.data.map((x) => h("tr", { "data-alias": x.id }, h("td", { class: "mono" }, x.id),
        h("td", { class: "mono" }, x.model ?? "(deleted)"), h("td", {}, when(x.updated_at)),
        h("td", { class: "actions" },
          aliasAct(x, "rollback", "POST", `/v1/aliases/${encodeURIComponent(x.id)}/rollback`),
          aliasAct(x, "remove", "DELETE", `/v1/aliases/${encodeURIComponent(x.id)}`),
          h("a", { href: `#/playground?models=${encodeURIComponent(x.id)}` }, "chat")))))
      : h("p", { class: "muted" }, "No aliases: an alias is the name an application calls, pointed at one model."));
    const chosen = aliasModel.value;  // a refresh keeps what the user picked
    aliasModel.replaceChildren(...adapters.data.map((a) => h("option", { value: a.name }, a.name)));
    if (adapters.data.some((a) => a.name === chosen)) aliasModel.value = chosen;
  }

  const aliasList = h("div", { id: "aliases" });
  const aliasName = h("input", { id: "alias-name", placeholder: "alias, e.g. support-bot", required: true });
  const aliasModel = h("select", { id: "alias-model" });
  const aliasForm = h("form", { id: "promote-alias", onsubmit: async (event) => {
    event.preventDefault();
    try {
      await api.request("PUT", `/v1/aliases/${encodeURIComponent(aliasName.value.trim())}`,
        { json: { model: aliasModel.value } });
      box.hidden = true;
      await refresh();
    } catch (error) { showError(box, error); }
  } }, aliasName, " → ", aliasModel, " ", h("button", { type: "submit" }, "Promote"));

  const archive = h("input", { type: "file", id: "import-file", accept: ".zip" });
  const name = h("input", { id: "import-name", placeholder: "optional model name" });
  const importForm = h("form", { id: "import-adapter", onsubmit: async (event) => {
    event.preventDefault();
    if (!archive.files.length) return;
    const form = new FormData();
    form.append("file", archive.files[0], archive.files[0].name);
    if (name.value.trim()) form.append("name", name.value.trim());
    try {
      await api.request("POST", "/v1/adapters", { form });
      box.hidden = true;
      importForm.reset();
      await refresh();
    } catch (error) { showError(box, error); }
  } }, h("label", {}, "PEFT adapter archive (zip of adapter_config.json and adapter_model.safetensors) ",
    archive), " ", name, " ", h("button", { type: "submit" }, "Import"));
  main.append(h("h2", {}, "Adapters"), box, list, section("Aliases", aliasList, aliasForm),
    section("Import an adapter", importForm));
  every(4000, refresh);
}

// ------------------------------------------------------------------ playground

async function playgroundView(main, query) {
  const listed = (await api.get("/v1/models")).data;
  const models = listed.map((m) => m.id);
  const parent = Object.fromEntries(listed.map((m) => [m.id, m.parent]));
  const byId = Object.fromEntries(listed.filter((m) => m.owned_by === "system").map((m) => [m.id, m]));
  const wanted = (query.get("models") || "").split(",").filter(Boolean);
  // The first column is the base model the asked-for adapters share, so the comparison is like for like.
  const base = wanted.map((m) => parent[m]).find(Boolean) || wanted.find((m) => m in parent && !parent[m])
    || listed.find((m) => !m.parent)?.id;
  const initial = [base, ...wanted.filter((m) => m !== base)].slice(0, 3);
  const columns = [0, 1, 2].map((i) => {
    // Another model in a column: its earlier answer is no longer the one shown, so "better" cannot pair with it.
    const select = h("select", { id: `model-${i}`, "data-column": i, onchange: () => { columns[i].last = undefined; } },
      i ? h("option", { value: "" }, "(none)") : null, [...new Set([...models, ...wanted])].map((m) =>
        h("option", { value: m, selected: m === initial[i] }, byId[m] ? baseModelLabel(byId[m]) : m)));
    return { select, history: [], log: h("div", { class: "transcript", id: `transcript-${i}` }) };
  });
  const prompt = h("textarea", { id: "prompt", rows: 3, placeholder: "Ask all selected models the same thing" });
  const maxTokens = h("input", { id: "max-tokens", type: "number", min: 1, max: 2048, value: 64 });
  const temperature = h("input", { id: "temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0 });
  const send = h("button", { type: "submit", id: "send" }, "Send");

  const feedbackStatus = h("p", { id: "feedback-status", class: "muted", role: "status" });

  // Each button judges once: it is disabled while its line is sent, and stays so once saved (no double append).
  async function judge(button, dataset, lines) {
    button.disabled = true;
    try {
      const saved = await api.post("/v1/feedback", { dataset, lines });
      const count = `${saved.n_examples} line${saved.n_examples === 1 ? "" : "s"}`;
      feedbackStatus.textContent = `Saved to ${saved.name} (${count}, file ${saved.file}): `
        + "train on it with a DPO or KTO job.";
    } catch (error) {
      button.disabled = false;
      feedbackStatus.textContent = error.message;
    }
  }

  // Under each answer: thumbs up / down (a feedback line, for KTO) and "better" (a preference line against each other
  // column's answer to the same prompt, for DPO). The conversation before it is the line's input.
  function judgeButtons(column, context, text, content) {
    const answer = [{ role: "assistant", content }];
    const thumb = (label, sign) => h("button", { type: "button", class: "small", "data-judge": label ? "up" : "down",
      onclick: (event) => judge(event.currentTarget, "playground-feedback",
        [{ input: { messages: context }, output: answer, label }]) }, sign);
    const better = h("button", { type: "button", class: "small", "data-judge": "better", onclick: (event) => {
      const others = columns.filter((c) => c !== column && c.last?.text === text && c.last.content !== content);
      if (!others.length) {
        feedbackStatus.textContent = "Another column needs a different answer to this prompt to compare with.";
        return;
      }
      judge(event.currentTarget, "playground-preferences", others.map((c) => ({ input: { messages: context },
        preferred_output: answer,
        non_preferred_output: [{ role: "assistant", content: c.last.content }] })));
    } }, "better");
    return h("div", { class: "row judge" }, thumb(true, "good"), thumb(false, "bad"), better);
  }

  async function ask(column, text, signal) {
    const model = column.select.value;
    const context = [...column.history, { role: "user", content: text }];
    column.history.push({ role: "user", content: text });
    column.log.append(h("div", { class: "turn user" }, text));
    const answer = h("div", { class: "turn assistant streaming" });
    column.log.append(answer);
    let content = "";
    try {
      for await (const message of api.stream("/v1/chat/completions", { signal, json: { model,
        messages: column.history, stream: true, max_tokens: Number(maxTokens.value) || 64,
        temperature: Number(temperature.value) } })) {
        if (message.data === "[DONE]") break;
        const chunk = JSON.parse(message.data);
        if (chunk.error) throw new Error(chunk.error.message);
        content += chunk.choices?.[0]?.delta?.content || "";
        answer.textContent = content;
      }
      column.history.push({ role: "assistant", content });
      column.last = { text, content };
      answer.after(judgeButtons(column, context, text, content));
    } catch (error) {
      column.history.pop();
      answer.classList.add("alert");
      answer.textContent = error.message;
    }
    answer.classList.remove("streaming");
  }

  const controller = new AbortController();
  onLeave(() => controller.abort());
  main.append(h("h2", {}, "Playground"),
    h("p", { class: "muted" }, "The same prompt goes to every selected model at once and the answers stream side "
      + "by side: the base model against one or two fine-tuned models or checkpoints."),
    h("div", { class: "columns" }, columns.map((c) => h("div", { class: "column" }, c.select, c.log))),
    h("form", { id: "chat", class: "card", onsubmit: async (event) => {
      event.preventDefault();
      const text = prompt.value.trim();
      if (!text) return;
      prompt.value = "";
      send.disabled = true;
      await Promise.all(columns.filter((c) => c.select.value).map((c) => ask(c, text, controller.signal)));
      send.disabled = false;
    } }, prompt, h("div", { class: "row" }, h("label", {}, "max tokens ", maxTokens),
      h("label", {}, "temperature ", temperature), send,
      h("button", { type: "button", onclick: () => columns.forEach((c) => {
        c.history = []; c.last = undefined; c.log.replaceChildren();
      }) }, "Clear")), feedbackStatus));
  for (const c of columns) {
    c.select.addEventListener("change", () => { c.history = []; c.log.replaceChildren(); });
  }
}

// ------------------------------------------------------------------ routing

const VIEWS = [
  [/^#\/datasets$/, (main) => datasetsView(main)],
  [/^#\/jobs\/([\w-]+)$/, (main, m) => jobView(main, m[1])],
  [/^#\/jobs$/, (main) => jobsView(main)],
  [/^#\/new$/, (main) => newJobView(main)],
  [/^#\/adapters$/, (main) => adaptersView(main)],
  [/^#\/playground$/, (main, m, query) => playgroundView(main, query)],
];

function nav() {
  const links = [["#/datasets", "Datasets"], ["#/jobs", "Jobs"], ["#/new", "New job"], ["#/adapters", "Adapters"],
    ["#/playground", "Playground"]];
  const current = location.hash.split("?")[0];
  document.getElementById("nav").replaceChildren(...(api ? [
    ...links.map(([href, label]) => h("a", { href, class: current.startsWith(href) ? "active" : "" }, label)),
    h("button", { id: "sign-out", class: "link", onclick: () => {
      localStorage.removeItem(KEY_STORAGE);
      api = null;
      location.hash = "";
      route();
    } }, "Sign out")] : []));
}

async function route() {
  for (const cleanup of cleanups.splice(0)) cleanup();
  // A fresh element per visit: a view still loading from the previous visit writes into a detached one.
  const main = h("div", { class: "view" });
  document.getElementById("main").replaceChildren(main);
  const [path, search] = location.hash.split("?");
  nav();
  if (!api) { signInView(main); return; }
  const found = VIEWS.map(([pattern, view]) => [path.match(pattern), view]).find(([m]) => m);
  if (!found) { location.replace("#/jobs"); return; }
  try {
    await found[1](main, found[0], new URLSearchParams(search || ""));
  } catch (error) {
    if (error.status === 401) {
      localStorage.removeItem(KEY_STORAGE);
      api = null;
      route();
      return;
    }
    main.append(h("div", { class: "alert", role: "alert" }, error.message));
  }
}

const saved = localStorage.getItem(KEY_STORAGE);
if (saved) api = new Api(saved);
window.addEventListener("hashchange", route);
route();
