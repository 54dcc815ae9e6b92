// One checkpoint: metadata, lineage graph, downloads through signed URLs, diff-with, report, manifest tree.
"use strict";

(() => {
  const { el, api, start, checkpointUrl, ui, fmtInt, fmtBytes, fmtAge, shortId, buildTree, renderTree } = CK;
  const ref = document.body.dataset.ref;

  function row(dl, term, ...value) { dl.append(el("dt", {}, term), el("dd", {}, ...value)); }

  function renderMeta(a) {
    const dl = document.getElementById("meta");
    dl.replaceChildren();
    document.querySelector("h1").textContent = "Checkpoint " + CK.label(a);
    document.title = "Checkpoint " + CK.label(a) + " · ckpt-service";
    row(dl, "Id", el("code", { id: "artifact-id" }, a.id));
    row(dl, "Names", a.names.length ? a.names.join(", ") : "–");
    const labels = el("ul", { class: "labels", id: "labels" });
    for (const [k, v] of Object.entries(a.labels || {})) labels.append(el("li", {}, k + "=" + v));
    row(dl, "Labels", labels);
    row(dl, "Filename", a.filename || "–");
    row(dl, "Format", a.format + (a.container_key ? " (state_dict under '" + a.container_key + "')" : ""));
    row(dl, "Size", fmtBytes(a.size));
    row(dl, "Keys", el("span", { id: "key-count" }, fmtInt(a.key_count)));
    row(dl, "Tensor bytes", fmtBytes(a.tensor_bytes));
    row(dl, "Created", el("time", { datetime: a.created }, a.created + " (" + fmtAge(a.created) + ")"));
    row(dl, "Schema fingerprint", el("code", {}, a.schema_fingerprint));
  }

  // inputs → operation → this checkpoint, each input a link to its page.
  function renderLineage(a) {
    const box = document.getElementById("lineage");
    box.replaceChildren();
    if (!a.lineage) {
      box.append(el("p", {}, "Uploaded (no inputs)."));
      return;
    }
    const inputs = el("ul", { class: "nodes" });
    for (const [role, id] of Object.entries(a.lineage.inputs)) {
      inputs.append(el("li", { class: "node" }, el("span", { class: "role" }, role),
        el("a", { href: checkpointUrl(id), "data-role": role }, shortId(id))));
    }
    const params = Object.entries(a.lineage.params || {})
      .filter(([, v]) => v !== null && v !== undefined && v !== false)
      .map(([k, v]) => k + "=" + (typeof v === "object" ? JSON.stringify(v) : String(v)));
    box.append(el("div", { class: "graph", role: "group", "aria-label": "lineage" },
      inputs,
      el("span", { class: "arrow", "aria-hidden": "true" }, "→"),
      el("div", { class: "node op" }, el("strong", {}, a.lineage.operation),
        params.length ? el("div", { class: "hint" }, params.join(", ")) : null),
      el("span", { class: "arrow", "aria-hidden": "true" }, "→"),
      el("div", { class: "node self" }, el("a", { href: checkpointUrl(a.id), "aria-current": "page" }, shortId(a.id)))));
  }

  function renderDiffWith(a) {
    const inputs = a.lineage ? a.lineage.inputs : {};
    const preferred = inputs.original || Object.values(inputs)[0] || "";
    document.getElementById("diff-a").value = preferred;
    document.getElementById("diff-b").value = a.id;
    const links = document.getElementById("diff-links");
    links.replaceChildren();
    const frozen = a.lineage && a.lineage.params && a.lineage.params.frozen_prefixes;
    for (const [role, id] of Object.entries(inputs)) {
      const q = new URLSearchParams({ a: id, b: a.id });
      if (frozen && frozen.length && role === "original") q.set("frozen", frozen.join(","));
      links.append(el("li", {}, el("a", { href: ui("diff?" + q.toString()), class: "diff-link" },
        "Diff " + role + " (" + shortId(id) + ") → this")));
    }
  }

  function keyList(title, keys) {
    if (!keys || !keys.length) return null;
    return el("details", {}, el("summary", {}, title + " (" + fmtInt(keys.length) + ")"),
      renderTree(buildTree(keys)));
  }

  function renderReport(a) {
    const report = a.lineage && a.lineage.report;
    if (!report || !Object.keys(report).length) return;
    document.getElementById("report-section").hidden = false;
    const box = document.getElementById("report");
    box.replaceChildren();
    const warnings = report.warnings || [];
    if (warnings.length) {
      const ul = el("ul", { class: "warnings" });
      for (const w of warnings) ul.append(el("li", {}, "⚠ " + (typeof w === "string" ? w : JSON.stringify(w))));
      box.append(el("h3", {}, "Warnings"), ul);
    }
    if (report.prefixes) {
      const dl = el("dl", { class: "meta" });
      for (const [side, value] of Object.entries(report.prefixes)) {
        const applied = Object.entries((value && value.applied) || {});
        const text = applied.length
          ? applied.map(([prefix, n]) => "'" + prefix + "' from " + fmtInt(n) + " keys").join(", ")
          : (value && value.applied ? "none" : JSON.stringify(value));
        dl.append(el("dt", {}, side), el("dd", {}, text));
      }
      box.append(el("h3", {}, "Prefixes removed"), dl);
    }
    if (report.provenance_counts) {
      const dl = el("dl", { class: "meta" });
      for (const [k, v] of Object.entries(report.provenance_counts)) dl.append(el("dt", {}, k), el("dd", {}, fmtInt(v)));
      box.append(el("h3", {}, "Keys by provenance"), dl);
    }
    const lists = [keyList("Filled from the original, by module", report.filled),
      keyList("Unexpected keys", report.unexpected), keyList("Dropped keys", report.dropped)].filter(Boolean);
    if (lists.length) box.append(el("h3", {}, "Keys"), ...lists);
    if (report.frozen) {
      const f = report.frozen;
      box.append(el("h3", {}, "Frozen check"), el("p", { class: f.ok ? "ok" : "error" },
        (f.ok ? "✓ frozen part unchanged: " : "✗ frozen part changed: ") + fmtInt(f.checked) + " checked, " +
        fmtInt((f.changed || []).length) + " changed, " + fmtInt((f.missing || []).length) + " missing"));
    }
    box.append(el("details", {}, el("summary", {}, "Full report (JSON)"),
      el("pre", {}, JSON.stringify(report, null, 2))));
  }

  function renderManifest(m) {
    const entries = m.entries;
    const keys = Object.keys(entries);
    const numelOf = (e) => e.shape.reduce((x, y) => x * y, 1);
    const tree = buildTree(keys, (k) => ({ bytes: entries[k].nbytes, numel: numelOf(entries[k]) }));
    document.getElementById("manifest-summary").textContent =
      fmtInt(m.key_count) + " keys, " + fmtBytes(m.tensor_bytes) + " of tensors";
    const dtypesOf = (node, out) => {
      for (const leaf of node.leaves) out.add(entries[leaf.key].dtype);
      for (const c of node.children.values()) if (out.size < 4) dtypesOf(c, out);
      return out;
    };
    document.getElementById("manifest").replaceChildren(renderTree(tree, {
      describe: (n) => fmtInt(n.numel) + " parameters, " + fmtBytes(n.bytes) + ", " + fmtInt(n.count) + " keys, " +
        Array.from(dtypesOf(n, new Set())).join("/"),
      leaf: (leaf) => el("span", { class: "hint" },
        " " + entries[leaf.key].dtype + " [" + entries[leaf.key].shape.join(", ") + "] " + fmtBytes(entries[leaf.key].nbytes)),
    }));
  }

  async function download(button) {
    const state = document.getElementById("download-state");
    const format = button.dataset.format;
    state.textContent = "Preparing " + format + "…";
    try {
      const signed = await api("/checkpoints/" + encodeURIComponent(ref) + "/download-url?format=" + format,
        { method: "POST" });
      const a = el("a", { href: signed.url, download: "" });
      document.body.append(a);
      a.click();
      a.remove();
      state.textContent = "Download started (link valid until " + new Date(signed.expires * 1000).toLocaleTimeString() + ").";
    } catch (err) {
      state.textContent = "Download failed: " + err.message;
    }
  }
  for (const button of document.querySelectorAll("button.download")) {
    button.addEventListener("click", () => download(button));
  }

  async function load() {
    const a = await api("/checkpoints/" + encodeURIComponent(ref));
    renderMeta(a);
    renderLineage(a);
    renderDiffWith(a);
    renderReport(a);
    renderManifest(await api("/checkpoints/" + encodeURIComponent(ref) + "/manifest"));
  }

  start(load);
})();
