"""torch.distributed checkpoints (DCP): a folder of ``.distcp`` shards and a ``.metadata`` file. Refused, naming
the conversion torch ships; both kinds of file are recognised by their bytes."""

from __future__ import annotations

from service.core.formats.base import Format, Probe
from service.core.loading._archive import first_entry_name

__all__ = ["METADATA", "SHARD", "WAY_OUT", "DcpMetadata", "DcpShard"]

WAY_OUT = ("convert the checkpoint folder with torch.distributed.checkpoint.format_utils.dcp_to_torch_save"
           "(folder, 'model.pth') and send that file")


class DcpShard(Format):
    name = "dcp-shard"
    refusal = ("the file holds several torch.save archives in a row (data precedes the last one), as a "
               f"torch.distributed checkpoint shard (.distcp) does; {WAY_OUT}")

    def detect(self, probe: Probe) -> bool:
        # Archives written one after another: the file opens with a torch.save archive's first entry, and the
        # directory at its end belongs to the last archive, so zip readers see its first entry past the start.
        entries = probe.zip_entries
        if not entries or min(info.header_offset for info in entries) == 0:
            return False
        with open(probe.path, "rb") as f:
            name = first_entry_name(f)
        return name is not None and name.endswith(b"/data.pkl")


class DcpMetadata(Format):
    name = "dcp-metadata"
    refusal = f"the file is the .metadata of a torch.distributed checkpoint; {WAY_OUT}"

    def detect(self, probe: Probe) -> bool:
        return any(name.startswith("torch.distributed.checkpoint.") for name in probe.pickle_globals)


SHARD = DcpShard()
METADATA = DcpMetadata()
