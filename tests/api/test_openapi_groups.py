"""OpenAPI: operations grouped by tag with human summaries; the operationIds clients rely on stay."""

from __future__ import annotations

from fastapi.testclient import TestClient

OPERATION_IDS = {
    "upload_checkpoint", "checkpoint_exists", "get_checkpoint", "get_manifest", "download_checkpoint",
    "list_checkpoints", "delete_checkpoint", "set_name", "list_names", "delete_name", "strip_checkpoint",
    "diff_checkpoints", "diff_uploaded", "merge_checkpoints", "list_architectures", "get_architecture",
    "register_architecture", "delete_architecture", "healthz", "readyz", "metrics", "sign_download_url",
    "import_checkpoint",
    "get_shard_index", "download_shard", "fsck", "update_labels", "gc",
}
TAGS = ["checkpoints", "names", "operations", "architectures", "health", "admin"]


def test_every_operation_has_one_tag_and_a_human_summary(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert [t["name"] for t in schema["tags"]] == TAGS
    seen = {}
    for path, item in schema["paths"].items():
        for method, op in item.items():
            seen[op["operationId"]] = op
            assert len(op["tags"]) == 1 and op["tags"][0] in TAGS, (path, method)
            summary = op["summary"]
            # FastAPI's default is the function name title-cased ("Diff Get"); ours is a sentence.
            default = op["operationId"].replace("_", " ").title()
            assert summary != default and summary[0].isupper() and " " in summary, (path, summary)
    assert set(seen) == OPERATION_IDS
    assert seen["merge_checkpoints"]["summary"] == "Merge a trained checkpoint into its original"
    assert seen["merge_checkpoints"]["tags"] == ["operations"]
    assert seen["set_name"]["tags"] == ["names"] and seen["readyz"]["tags"] == ["health"]
