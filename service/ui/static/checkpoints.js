// The checkpoints list: filters are a GET form, so every filtered view (and page) is a URL.
"use strict";

(() => {
  const { el, api, start, checkpointUrl, fmtInt, fmtBytes, fmtAge, label } = CK;
  const params = new URLSearchParams(location.search);
  for (const f of ["name", "label", "operation"]) {
    const input = document.getElementById("f-" + f);
    if (params.get(f)) input.value = params.get(f);
  }

  async function load() {
    const query = new URLSearchParams();
    for (const f of ["name", "label", "operation", "cursor"]) if (params.get(f)) query.set(f, params.get(f));
    query.set("limit", "50");
    const page = await api("/checkpoints?" + query.toString());
    const tbody = document.querySelector("#checkpoints tbody");
    tbody.replaceChildren();
    for (const a of page.items) {
      const labels = el("ul", { class: "labels" });
      for (const [k, v] of Object.entries(a.labels || {})) labels.append(el("li", {}, k + "=" + v));
      tbody.append(el("tr", { "data-id": a.id },
        el("td", {}, el("a", { href: checkpointUrl(a.id) }, label(a)),
          a.filename ? el("div", { class: "hint" }, a.filename) : null),
        el("td", {}, labels),
        el("td", {}, a.format),
        el("td", { class: "num" }, fmtBytes(a.size)),
        el("td", { class: "num" }, fmtInt(a.key_count)),
        el("td", {}, a.lineage ? a.lineage.operation : "upload"),
        el("td", {}, el("time", { datetime: a.created, title: a.created }, fmtAge(a.created)))));
    }
    document.getElementById("total").textContent =
      fmtInt(page.total) + (page.total === 1 ? " checkpoint" : " checkpoints") + ", newest first";
    const pager = document.getElementById("pager");
    pager.replaceChildren();
    if (params.get("cursor")) {
      const first = new URLSearchParams(params);
      first.delete("cursor");
      pager.append(el("a", { href: "?" + first.toString() }, "First page"), " ");
    }
    if (page.next_cursor) {
      const next = new URLSearchParams(params);
      next.set("cursor", page.next_cursor);
      pager.append(el("a", { href: "?" + next.toString(), rel: "next" }, "Next page"));
    }
  }

  start(load);
})();
