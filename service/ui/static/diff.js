// The diff of two checkpoints: counts, a per-module chart of the relative change (SVG drawn here, log scale),
// a sortable table, and the keys that do not match as module trees. Every control lives in the URL.
"use strict";

(() => {
  const { el, svg, api, start, checkpointUrl, fmtInt, fmtSci, shortId, buildTree, renderTree } = CK;
  const TABLE_ROWS = 200;
  const CHART_BARS = 60;
  const form = document.getElementById("controls");
  const inputs = {
    a: document.getElementById("c-a"),
    b: document.getElementById("c-b"),
    normalize: document.getElementById("c-normalize"),
    frozen: document.getElementById("c-frozen"),
    depth: document.getElementById("c-depth"),
  };
  let state = readUrl();
  let data = null;
  let generation = 0;  // a newer load wins: an older response arriving late is dropped

  function readUrl() {
    const q = new URLSearchParams(location.search);
    const [sortKey, sortDir] = (q.get("sort") || "module:asc").split(":");
    return {
      a: q.get("a") || "", b: q.get("b") || "",
      normalize: ["true", "1", "on", "yes"].includes((q.get("normalize_prefixes") || "").toLowerCase()),
      frozen: q.get("frozen") || "",
      depth: q.get("depth") ? Math.max(1, parseInt(q.get("depth"), 10) || 1) : null,  // null: automatic
      sortKey, sortDir: sortDir === "desc" ? "desc" : "asc",
    };
  }

  function writeUrl() {
    const q = new URLSearchParams();
    q.set("a", state.a);
    q.set("b", state.b);
    if (state.normalize) q.set("normalize_prefixes", "true");
    if (state.frozen) q.set("frozen", state.frozen);
    if (state.depth !== null) q.set("depth", String(state.depth));
    if (!(state.sortKey === "module" && state.sortDir === "asc")) q.set("sort", state.sortKey + ":" + state.sortDir);
    history.replaceState(null, "", "?" + q.toString());
    const link = document.getElementById("permalink");
    link.replaceChildren("Link to this view: ", el("a", { href: location.href, id: "permalink-link" }, location.href));
  }

  function showControls() {
    inputs.a.value = state.a;
    inputs.b.value = state.b;
    inputs.normalize.checked = state.normalize;
    inputs.frozen.value = state.frozen;
    inputs.depth.value = state.depth === null ? "" : String(state.depth);
  }

  function frozenPrefixes() {
    const raw = state.frozen.trim();
    if (!raw || ["true", "yes", "1", "on", "params", "auto"].includes(raw.toLowerCase())) return [];
    return raw.split(",").map((p) => p.trim().replace(/\.+$/, "")).filter(Boolean);
  }
  function isFrozen(module, prefixes) {
    return prefixes.some((p) => module === p || module.startsWith(p + "."));
  }

  async function load() {
    showControls();
    if (!state.a || !state.b) {
      CK.status("Choose two checkpoints (ids, id prefixes or names) and press Compare.");
      return;
    }
    writeUrl();
    const q = new URLSearchParams({ a: state.a, b: state.b, values: "true", limit: "100000" });
    // The page lists only the keys that do not match; changed and unchanged keys are counted, not listed.
    for (const cat of ["only_in_a", "only_in_b", "shape_mismatch", "dtype_mismatch"]) q.append("category", cat);
    if (state.normalize) q.set("normalize_prefixes", "true");
    if (state.frozen.trim()) q.set("frozen", state.frozen.trim());
    const gen = ++generation;
    const responseMark = "diff:response:" + gen;
    const [diff, ma, mb] = await Promise.all([
      api("/diff?" + q.toString(), { mark: responseMark }),
      api("/checkpoints/" + encodeURIComponent(state.a)),
      api("/checkpoints/" + encodeURIComponent(state.b)),
    ]);
    if (gen !== generation) return;
    performance.mark("diff:parsed:" + gen);
    data = { diff, ma, mb };
    delete document.body.dataset.painted;
    renderAll();
    performance.mark("diff:rendered:" + gen);
    // Painted: the frame after the DOM changes has been rendered.
    requestAnimationFrame(() => setTimeout(() => {
      if (gen !== generation) return;
      performance.mark("diff:painted:" + gen);
      performance.clearMeasures("diff:response-to-paint");
      performance.measure("diff:response-to-paint", responseMark, "diff:painted:" + gen);
      document.body.dataset.painted = "true";
    }, 0));
  }

  function renderAll() {
    const { diff, ma, mb } = data;
    document.querySelector("h1").replaceChildren("Diff of ",
      el("a", { href: checkpointUrl(ma.id), id: "link-a" }, CK.label(ma)), " and ",
      el("a", { href: checkpointUrl(mb.id), id: "link-b" }, CK.label(mb)));
    const dl = document.getElementById("summary");
    dl.replaceChildren();
    for (const [k, v] of Object.entries(diff.summary)) {
      dl.append(el("div", {}, el("dt", {}, k.replace(/_/g, " ")), el("dd", { id: "count-" + k }, fmtInt(v))));
    }
    const rel = diff.changes ? diff.changes.rel_change : null;
    if (diff.changes) dl.append(el("div", {}, el("dt", {}, "relative change (all)"), el("dd", {}, fmtSci(rel))));
    const fr = document.getElementById("frozen-report");
    if (diff.frozen) {
      const f = diff.frozen;
      fr.className = f.ok ? "ok" : "error";
      fr.textContent = (f.ok ? "✓ Frozen part unchanged: " : "✗ Frozen part changed: ") + fmtInt(f.checked) +
        " tensors checked, " + fmtInt((f.changed || []).length) + " changed, " + fmtInt((f.missing || []).length) +
        " missing in B, " + fmtInt((f.mismatched || []).length) + " with another shape or dtype.";
    } else {
      fr.textContent = "";
    }
    renderChart();
    renderTable();
    renderTrees();
  }

  let rowsCache = { key: null, rows: [] };
  function moduleRows() {
    const cacheKey = [state.sortKey, state.sortDir, state.frozen].join("\n");
    if (rowsCache.data === data && rowsCache.key === cacheKey) return rowsCache.rows;
    const mods = (data.diff.changes && data.diff.changes.modules) || {};
    const prefixes = frozenPrefixes();
    const rows = [];
    for (const [name, m] of Object.entries(mods)) {
      if (name === "") continue;
      rows.push({ module: name, numel: m.numel, max_abs: m.max_abs, rel_change: m.rel_change,
        changed_keys: m.changed_keys, unchanged_keys: m.keys - m.changed_keys,
        depth: name.split(".").length, frozen: isFrozen(name, prefixes) });
    }
    const key = state.sortKey, dir = state.sortDir === "desc" ? -1 : 1;
    // null stands for an infinite change (JSON has no Infinity): it sorts above every number.
    const val = (r) => (r[key] === null ? Infinity : r[key]);
    rows.sort((x, y) => {
      const a = val(x), b = val(y);
      if (key === "module") return dir * (a < b ? -1 : a > b ? 1 : 0);
      return dir * (a - b) || (x.module < y.module ? -1 : 1);
    });
    rowsCache = { key: cacheKey, data, rows };
    return rows;
  }

  function frozenTag() { return el("span", { class: "frozen-tag", title: "under a frozen prefix" }, "❄ frozen"); }

  function renderTable() {
    const rows = moduleRows();
    for (const th of document.querySelectorAll("#modules th[data-key]")) {
      th.setAttribute("aria-sort", th.dataset.key === state.sortKey
        ? (state.sortDir === "asc" ? "ascending" : "descending") : "none");
    }
    const tbody = document.querySelector("#modules tbody");
    const fill = (limit) => {
      const frag = document.createDocumentFragment();
      for (const r of rows.slice(0, limit)) {
        const moved = r.frozen && r.changed_keys > 0;
        frag.append(el("tr", { "data-module": r.module, class: (r.frozen ? "frozen" : "") + (moved ? " moved" : "") },
          el("th", { scope: "row" }, el("code", {}, r.module), r.frozen ? " " : null, r.frozen ? frozenTag() : null,
            moved ? el("span", { class: "warn-tag" }, " ⚠ changed") : null),
          el("td", { class: "num" }, fmtInt(r.numel)),
          el("td", { class: "num" }, fmtSci(r.max_abs)),
          el("td", { class: "num" }, fmtSci(r.rel_change)),
          el("td", { class: "num" }, fmtInt(r.changed_keys)),
          el("td", { class: "num" }, fmtInt(r.unchanged_keys))));
      }
      tbody.replaceChildren(frag);
    };
    fill(TABLE_ROWS);
    const more = document.getElementById("table-more");
    more.replaceChildren();
    if (rows.length > TABLE_ROWS) {
      more.append(fmtInt(TABLE_ROWS) + " of " + fmtInt(rows.length) + " modules shown. ",
        el("button", { type: "button", onclick: () => { fill(rows.length); more.replaceChildren(); } }, "Show all"));
    } else if (!rows.length) {
      more.textContent = "No tensors with equal shape and dtype in both checkpoints.";
    }
  }

  // Automatic depth: the shallowest level with at least two modules (one bar for "backbone" says little).
  function chartDepth(all) {
    if (state.depth !== null) return state.depth;
    const counts = new Map();
    for (const r of all) counts.set(r.depth, (counts.get(r.depth) || 0) + 1);
    const depths = Array.from(counts.keys()).sort((x, y) => x - y);
    return depths.find((d) => counts.get(d) >= 2) || depths[0] || 1;
  }

  function renderChart() {
    const box = document.getElementById("chart");
    const all = moduleRows();
    const depth = chartDepth(all);
    inputs.depth.placeholder = "auto (" + depth + ")";
    let rows = all.filter((r) => r.depth === depth);
    if (!rows.length) {
      box.replaceChildren(el("p", {}, "No modules at depth " + depth + "."));
      return;
    }
    const total = rows.length;
    rows = rows.slice(0, CHART_BARS);
    const positive = rows.map((r) => r.rel_change).filter((v) => v !== null && v > 0);
    let lo = positive.length ? Math.floor(Math.log10(Math.min(...positive))) : -6;
    let hi = positive.length ? Math.ceil(Math.log10(Math.max(...positive))) : 0;
    lo = Math.max(lo, -12);
    hi = Math.max(hi, lo + 1);
    const labelW = 280, barW = 420, valueW = 200, rowH = 20, top = 24;
    const width = labelW + barW + valueW, height = top + rows.length * rowH + 8;
    const x = (v) => labelW + ((Math.log10(v) - lo) / (hi - lo)) * barW;
    const chart = svg("svg", { viewBox: "0 0 " + width + " " + height, width, height, role: "img",
      "aria-labelledby": "chart-title", class: "chart" });
    chart.append(svg("title", { id: "chart-title" }, "Relative change per module at depth " + depth +
      ", log scale from 1e" + lo + " to 1e" + hi));
    chart.append(svg("defs", {}, svg("pattern", { id: "hatch", width: 6, height: 6, patternUnits: "userSpaceOnUse",
      patternTransform: "rotate(45)" }, svg("rect", { width: 6, height: 6, class: "hatch-bg" }),
      svg("line", { x1: 0, y1: 0, x2: 0, y2: 6, class: "hatch-line" }))));
    for (let d = lo; d <= hi; d += 1) {
      const gx = x(Math.pow(10, d));
      chart.append(svg("line", { x1: gx, x2: gx, y1: top - 4, y2: height - 8, class: "grid" }),
        svg("text", { x: gx, y: top - 8, class: "axis", "text-anchor": "middle" }, "1e" + d));
    }
    rows.forEach((r, i) => {
      const y = top + i * rowH;
      const g = svg("g", { class: "bar" + (r.frozen ? " frozen" : ""), "data-module": r.module });
      const name = r.module.length > 38 ? "…" + r.module.slice(-37) : r.module;
      g.append(svg("title", {}, r.module + (r.frozen ? " (frozen)" : "") + ": relative change " + fmtSci(r.rel_change)));
      g.append(svg("text", { x: labelW - 8, y: y + 14, "text-anchor": "end", class: "label" },
        (r.frozen ? "❄ " : "") + name));
      const v = r.rel_change;
      if (v === null || v > 0) {
        const end = v === null ? labelW + barW : Math.min(labelW + barW, Math.max(labelW + 1, x(v)));
        g.append(svg("rect", { x: labelW, y: y + 3, width: end - labelW, height: rowH - 6,
          class: r.frozen ? "frozen-bar" : "change-bar" }));
      }
      const text = v === 0 ? "0 (unchanged)" : fmtSci(v);
      g.append(svg("text", { x: labelW + barW + 6, y: y + 14, class: "value" },
        text + (r.frozen ? (r.changed_keys > 0 ? "  frozen, CHANGED" : "  frozen") : "")));
      chart.append(g);
    });
    const parts = [chart];
    if (total > rows.length) {
      parts.push(el("p", { class: "hint" }, rows.length + " of " + total + " modules at depth " + depth +
        " (in the table's order); the table has them all."));
    }
    box.replaceChildren(...parts);
  }

  function renderTrees() {
    const { diff } = data;
    const box = document.getElementById("trees");
    box.replaceChildren();
    const sections = [
      ["only_in_a", "Only in A", null],
      ["only_in_b", "Only in B", null],
      ["shape_mismatch", "Shape mismatches", (k) => detail(diff.details.shape_mismatch[k])],
      ["dtype_mismatch", "Dtype mismatches", (k) => detail(diff.details.dtype_mismatch[k])],
    ];
    for (const [cat, title, describe] of sections) {
      const entry = diff.keys[cat];
      if (!entry) continue;
      const summary = el("summary", {}, title + " (" + fmtInt(entry.total) + ")");
      const details = el("details", { id: "tree-" + cat }, summary);
      let filled = false;
      details.addEventListener("toggle", () => {
        if (!details.open || filled) return;
        filled = true;
        if (!entry.keys.length) { details.append(el("p", {}, "None.")); return; }
        details.append(renderTree(buildTree(entry.keys), {
          leaf: describe ? (leaf) => el("span", { class: "hint" }, " " + describe(leaf.key)) : null,
        }));
        if (entry.truncated) details.append(el("p", { class: "hint" }, "First " + fmtInt(entry.keys.length) + " shown."));
      });
      box.append(details);
    }
  }
  function detail(d) {
    if (!d) return "";
    const show = (v) => (Array.isArray(v) ? "[" + v.join(", ") + "]" : String(v));
    return "A " + show(d.a) + " → B " + show(d.b);
  }

  for (const th of document.querySelectorAll("#modules th[data-key]")) {
    th.querySelector("button").addEventListener("click", () => {
      const key = th.dataset.key;
      state.sortDir = state.sortKey === key && state.sortDir === "asc" ? "desc" : (state.sortKey === key ? "asc" :
        (key === "module" ? "asc" : "desc"));
      state.sortKey = key;
      writeUrl();
      if (data) { renderTable(); renderChart(); }
    });
  }

  function fromControls() {
    state.a = inputs.a.value.trim();
    state.b = inputs.b.value.trim();
    state.normalize = inputs.normalize.checked;
    state.frozen = inputs.frozen.value.trim();
    state.depth = inputs.depth.value.trim() ? Math.max(1, parseInt(inputs.depth.value, 10) || 1) : null;
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    fromControls();
    start(load);
  });
  for (const input of [inputs.normalize, inputs.frozen]) {
    input.addEventListener("change", () => { fromControls(); if (state.a && state.b) start(load); });
  }
  inputs.depth.addEventListener("change", () => {
    fromControls();
    writeUrl();
    if (data) renderChart();
  });

  start(load);
})();
