// numwatch pages: shared helpers. Every string that comes from a client (run, project, tensor,
// module names, config, event details) reaches the page through textContent or a text node,
// never as markup; the Content-Security-Policy forbids inline script as a second line of defence.
"use strict";

const NW = (() => {
  const TOKEN_KEY = "numwatch.readToken";
  const RUNS_PATH = "/api/v1/runs"; // numwatch.protocol.RUNS_PATH (a test keeps them equal)
  let bundle;

  class AuthNeeded extends Error {}
  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  // An exported page carries its API answers in a JSON script element (not executed).
  function exported() {
    if (bundle === undefined) {
      const node = document.getElementById("numwatch-data");
      bundle = node ? JSON.parse(node.textContent) : null;
    }
    return bundle;
  }

  // The key of a read: path plus its parameters in a fixed order (the export uses the same keys).
  function requestKey(path, params) {
    const query = Object.keys(params || {}).filter((k) => params[k] !== undefined && params[k] !== null).sort()
      .map((k) => encodeURIComponent(k) + "=" + encodeURIComponent(String(params[k]))).join("&");
    return query ? path + "?" + query : path;
  }

  async function api(path, params) {
    const key = requestKey(path, params);
    const data = exported();
    if (data) {
      if (!(key in data.responses)) throw new ApiError(404, "not in this exported page: " + key);
      return data.responses[key];
    }
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    const response = await fetch(key, { headers, cache: "no-store", credentials: "omit" });
    if (response.status === 401) {
      if (token) sessionStorage.removeItem(TOKEN_KEY);
      throw new AuthNeeded(token ? "that token was refused (invalid or revoked)" : "");
    }
    if (!response.ok) {
      let detail = response.statusText;
      try { const body = await response.json(); detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail); } catch (_) { /* not JSON */ }
      throw new ApiError(response.status, detail);
    }
    return response.json();
  }

  function apiRun(run, tail, params) {
    return api(RUNS_PATH + "/" + encodeURIComponent(run) + (tail || ""), params);
  }

  // el("a", {href: url, class: "x"}, "text", child): attributes by setAttribute, children as text nodes.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name.startsWith("on")) throw new Error("event handlers are attached with addEventListener");
      node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }

  // Protocol floats: non-finite values arrive as the strings "NaN", "Infinity", "-Infinity".
  function num(value) {
    if (value === null || value === undefined) return null;
    if (value === "NaN") return NaN;
    if (value === "Infinity") return Infinity;
    if (value === "-Infinity") return -Infinity;
    return Number(value);
  }

  function fmt(value, digits) {
    const v = num(value);
    if (v === null) return "–";
    if (Number.isNaN(v)) return "NaN";
    if (v === Infinity) return "+Inf";
    if (v === -Infinity) return "−Inf";
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (Number.isInteger(v) && a < 1e6) return String(v);
    if (a >= 1e5 || a < 1e-3) return v.toExponential((digits || 4) - 1).replace("e+", "e");
    return String(Number(v.toPrecision(digits || 4)));
  }

  function fmtTime(epochSeconds) {
    if (!epochSeconds) return "–";
    const d = new Date(epochSeconds * 1000);
    const pad = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function ago(epochSeconds) {
    if (!epochSeconds) return "";
    const s = Math.max(0, Date.now() / 1000 - epochSeconds);
    if (s < 90) return Math.round(s) + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    if (s < 172800) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " days ago";
  }

  const runUrl = (run) => "/runs/" + encodeURIComponent(run);
  const stepUrl = (run, step) => runUrl(run) + "/steps/" + step;

  // A link, or plain text in an exported page (its links would lead nowhere offline).
  function link(href, ...children) {
    return exported() ? el("span", {}, ...children) : el("a", { href }, ...children);
  }

  // The run (and step) a page is about: from its URL, or from the export.
  function context() {
    const data = exported();
    if (data) return data.context;
    const parts = location.pathname.split("/").filter(Boolean);
    const out = {};
    if (parts[0] === "runs" && parts.length >= 2) out.run = decodeURIComponent(parts[1]);
    if (parts[2] === "steps" && parts.length >= 4) out.step = Number(parts[3]);
    return out;
  }

  function main() { return document.getElementById("main"); }

  function tokenPrompt(message) {
    const input = el("input", { type: "password", id: "token-input", autocomplete: "off", placeholder: "nw_…", required: true, size: 48 });
    const form = el("form", { id: "token-form", class: "token-form" },
      el("h2", {}, "This collector needs a read token"),
      el("p", {}, "Paste a token from ", el("code", {}, "numwatch token create --project P"),
        ". It is kept in this browser tab only (session storage) and sent as an Authorization header, never in a URL."),
      message ? el("p", { class: "error" }, message) : null,
      input, " ", el("button", { type: "submit" }, "Use token"));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      location.reload();
    });
    clear(main()).append(form);
    input.focus();
  }

  function showError(error) {
    if (error instanceof AuthNeeded) return tokenPrompt(error.message);
    const text = error instanceof ApiError ? `The collector answered ${error.status}: ${error.message}` : `This page failed: ${error.message}`;
    clear(main()).append(el("p", { class: "error", id: "page-error" }, text));
    if (!(error instanceof ApiError)) console.error(error);
  }

  // Every chart drawn and every handler attached: what the tests wait for and the benchmark times.
  function ready() {
    document.body.dataset.ready = "true";
    performance.mark("numwatch-ready");
  }

  function start(page) {
    const run = () => Promise.resolve().then(page).catch(showError);
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", run);
    else run();
  }

  function signOutLink() {
    if (exported() || !sessionStorage.getItem(TOKEN_KEY)) return null;
    const a = el("a", { href: "#", id: "sign-out" }, "forget token");
    a.addEventListener("click", (event) => { event.preventDefault(); sessionStorage.removeItem(TOKEN_KEY); location.reload(); });
    return a;
  }

  function header(...crumbs) {
    const nav = document.getElementById("crumbs");
    if (!nav) return;
    clear(nav).append(...crumbs.flatMap((c) => [" / ", c]));
    const out = signOutLink();
    if (out) document.getElementById("top").append(out);
  }

  return { RUNS_PATH, api, apiRun, requestKey, el, clear, num, fmt, fmtTime, ago, runUrl, stepUrl, link, context, main, start, ready, header, exported, showError, ApiError, AuthNeeded };
})();
