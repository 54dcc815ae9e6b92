"""The index's list query against a brute-force answer: every filter combination, paged with cursors."""

from __future__ import annotations

import itertools

import torch

from service.store import ArtifactMeta, ArtifactStore, Lineage


def _expected(metas: list[ArtifactMeta], *, label: str | None, operation: str | None,
              format: str | None) -> list[str]:
    key, _, value = (label or "").partition("=")
    out = [m for m in metas
           if (label is None or (key in m.labels and ("=" not in label or m.labels[key] == value)))
           and (operation is None or (m.lineage is not None and m.lineage.operation == operation))
           and (format is None or m.format == format)]
    return [m.id for m in sorted(out, key=lambda m: (m.created, m.id), reverse=True)]


def test_every_filter_pages_like_a_brute_force_list(store: ArtifactStore) -> None:
    metas = []
    for i in range(24):
        labels = {"team": f"t{i % 3}"} if i % 4 else {"other": "x"}
        lineage = Lineage(operation="strip", inputs={"checkpoint": metas[-1].id}) if i % 5 == 4 else None
        metas.append(store.store_state_dict({"w": torch.tensor([float(i)])}, labels=labels, lineage=lineage,
                                            format="safetensors" if i % 2 else "pth").artifact)
    metas = [store.metadata(m.id) for m in metas]
    for label, operation, format in itertools.product(
        [None, "team", "team=t1", "other=x", "missing", "team=none"], [None, "strip"], [None, "safetensors"]
    ):
        expected = _expected(metas, label=label, operation=operation, format=format)
        got: list[str] = []
        cursor = None
        while True:
            page = store.list(label=label, operation=operation, format=format, limit=4, cursor=cursor)
            assert page.total == len(expected), (label, operation, format)
            got.extend(m.id for m in page.items)
            cursor = page.next_cursor
            if cursor is None:
                break
        assert got == expected, (label, operation, format)
