// Shared by every page: the token, API calls, DOM builders (text only: data never becomes HTML), formatting,
// and the module tree. No framework, no build step.
"use strict";

const CK = (() => {
  const body = document.body;
  const root = body.dataset.root || "";
  const TOKEN_KEY = "ckpt-token";

  class AuthNeeded extends Error {}

  function token() { return sessionStorage.getItem(TOKEN_KEY); }

  // el("a", {href: x, class: "y"}, "text", child): attributes through setAttribute, strings as text nodes.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const SVG_NS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = String(v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
  }

  function status(text, isError) {
    const p = document.getElementById("status");
    p.textContent = text || "";
    p.classList.toggle("error", Boolean(isError));
  }

  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    const mark = opts.mark;
    delete opts.mark;
    const headers = new Headers(opts.headers || {});
    headers.set("Accept", "application/json");
    const t = token();
    if (t) headers.set("Authorization", "Bearer " + t);
    opts.headers = headers;
    const response = await fetch(root + path, opts);
    if (mark) performance.mark(mark);
    if (response.status === 401) {
      let detail = "";
      try { detail = (await response.json()).detail || ""; } catch (e) { /* not JSON */ }
      throw new AuthNeeded(detail);
    }
    if (!response.ok) {
      let detail = response.status + " " + response.statusText;
      try {
        const problem = await response.json();
        detail = (problem.title ? problem.title + ": " : "") + (problem.detail || detail);
      } catch (e) { /* not JSON */ }
      throw new Error(detail);
    }
    return response.json();
  }

  // Run a page's loader; on 401 ask for a token and run it again once one is given.
  let currentLoad = null;
  let wired = false;
  function start(load) {
    currentLoad = load;
    if (!wired) {
      wired = true;
      document.getElementById("forget-token").addEventListener("click", () => {
        sessionStorage.removeItem(TOKEN_KEY);
        location.reload();
      });
      document.getElementById("token-form").addEventListener("submit", (event) => {
        event.preventDefault();
        const input = document.getElementById("token-input");
        sessionStorage.setItem(TOKEN_KEY, input.value.trim());
        input.value = "";
        run();
      });
    }
    return run();
  }

  async function run() {
    const section = document.getElementById("auth");
    const has = Boolean(token());
    document.getElementById("forget-token").hidden = !has;
    document.getElementById("token-state").textContent = has ? "Using a token from this tab." : "";
    status("Loading…");
    try {
      await currentLoad();
      section.hidden = true;
      if (document.getElementById("status").textContent === "Loading…") status("");
    } catch (err) {
      if (err instanceof AuthNeeded) {
        status("");
        document.getElementById("auth-error").textContent = token() ? "That token was refused: " + err.message : "";
        section.hidden = false;
        document.getElementById("token-input").focus();
      } else {
        status("Error: " + err.message, true);
      }
    }
  }

  function ui(path) { return root + "/ui/" + path; }
  function checkpointUrl(id) { return ui("checkpoints/" + encodeURIComponent(id)); }

  const INT = new Intl.NumberFormat("en-US");  // one formatter: toLocaleString builds one per call
  function fmtInt(n) { return n === null || n === undefined ? "–" : INT.format(n); }
  function fmtBytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = Number(n), i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return (i === 0 ? v : v.toFixed(v < 10 ? 2 : 1)) + " " + units[i];
  }
  function fmtSci(x) {
    if (x === null || x === undefined) return "∞";
    if (x === 0) return "0";
    return Math.abs(x) >= 0.01 && Math.abs(x) < 1000 ? x.toPrecision(3) : x.toExponential(2);
  }
  function fmtAge(iso) {
    const seconds = (Date.now() - Date.parse(iso)) / 1000;
    if (!isFinite(seconds)) return iso;
    if (seconds < 90) return Math.max(0, Math.round(seconds)) + " s ago";
    if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
    if (seconds < 129600) return Math.round(seconds / 3600) + " h ago";
    return Math.round(seconds / 86400) + " days ago";
  }
  function shortId(id) { return id.slice(0, 12); }
  function label(artifact) {
    return artifact.names && artifact.names.length ? artifact.names.join(", ") : shortId(artifact.id);
  }

  // A module tree from keys: a key's module is the key minus its last part. Nodes are built at once (cheap);
  // their DOM only when opened, so a 20k-key tree costs a few top-level <details> until someone looks.
  function buildTree(keys, info) {
    const rootNode = { name: "", path: "", children: new Map(), leaves: [], count: 0, bytes: 0, numel: 0 };
    for (const key of keys) {
      const parts = key.split(".");
      const extra = info ? info(key) : null;
      let node = rootNode;
      const visit = (n) => {
        n.count += 1;
        if (extra) { n.bytes += extra.bytes || 0; n.numel += extra.numel || 0; }
      };
      visit(node);
      for (let i = 0; i < parts.length - 1; i += 1) {
        let child = node.children.get(parts[i]);
        if (!child) {
          child = { name: parts[i], path: parts.slice(0, i + 1).join("."), children: new Map(), leaves: [],
                    count: 0, bytes: 0, numel: 0 };
          node.children.set(parts[i], child);
        }
        node = child;
        visit(node);
      }
      node.leaves.push({ key, name: parts[parts.length - 1], extra });
    }
    return rootNode;
  }

  // Render a tree as nested <details>/<summary> (keyboard: Tab to a summary, Enter/Space opens it).
  function renderTree(tree, options) {
    const opts = options || {};
    const list = el("ul", { class: "tree" });
    fillTreeLevel(list, tree, opts);
    return list;
  }

  function fillTreeLevel(list, node, opts) {
    for (const child of node.children.values()) {
      const summary = el("summary", {}, el("span", { class: "mod" }, child.name), " ",
        el("span", { class: "hint" }, opts.describe ? opts.describe(child) : fmtInt(child.count) + " keys"));
      const details = el("details", { "data-module": child.path }, summary);
      let filled = false;
      details.addEventListener("toggle", () => {
        if (!details.open || filled) return;
        filled = true;
        const inner = el("ul", { class: "tree" });
        fillTreeLevel(inner, child, opts);
        details.append(inner);
      });
      list.append(el("li", {}, details));
    }
    for (const leaf of node.leaves) {
      list.append(el("li", { class: "leaf", "data-key": leaf.key }, el("code", {}, leaf.name),
        opts.leaf ? opts.leaf(leaf) : null));
    }
  }

  return { root, el, svg, api, start, status, ui, checkpointUrl, fmtInt, fmtBytes, fmtSci, fmtAge, shortId,
           label, buildTree, renderTree, AuthNeeded, token };
})();
