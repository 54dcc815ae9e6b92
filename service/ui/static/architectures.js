// The registered architectures; each one's expected keys as a module tree, fetched when opened.
"use strict";

(() => {
  const { el, api, start, fmtInt, renderTree, buildTree } = CK;

  async function load() {
    const data = await api("/architectures");
    const tbody = document.querySelector("#architectures tbody");
    tbody.replaceChildren();
    const keysBox = document.getElementById("arch-keys");
    keysBox.replaceChildren();
    for (const a of data.items) {
      tbody.append(el("tr", { "data-name": a.name },
        el("td", {}, el("a", { href: "#arch-" + encodeURIComponent(a.name) }, a.name)),
        el("td", {}, a.source),
        el("td", { class: "num" }, fmtInt(a.key_count)),
        el("td", {}, el("code", {}, a.schema_fingerprint.slice(0, 16))),
        el("td", {}, a.description || "")));
      const details = el("details", { id: "arch-" + encodeURIComponent(a.name) },
        el("summary", {}, a.name + " (" + fmtInt(a.key_count) + " keys)"));
      let filled = false;
      details.addEventListener("toggle", async () => {
        if (!details.open || filled) return;
        filled = true;
        try {
          const full = await api("/architectures/" + encodeURIComponent(a.name));
          const keys = Object.keys(full.keys || {});
          details.append(renderTree(buildTree(keys), {
            leaf: (leaf) => el("span", { class: "hint" },
              " " + full.keys[leaf.key].dtype + " [" + full.keys[leaf.key].shape.join(", ") + "]"),
          }));
        } catch (err) {
          details.append(el("p", { class: "error" }, err.message));
        }
      });
      keysBox.append(details);
    }
    const issues = document.getElementById("issues");
    issues.replaceChildren();
    for (const issue of data.issues || []) {
      issues.append(el("li", {}, (issue.name || "?") + " (" + (issue.source || "?") + "): " + (issue.error || "")));
    }
    document.getElementById("issues-section").hidden = !(data.issues || []).length;
  }

  start(load);
})();
