"""TorchScript archives (``torch.jit.save``): a zip with ``code/`` and ``constants.pkl``. Refused: loading one
runs its code; the way out is a plain state_dict."""

from __future__ import annotations

from service.core.formats.base import Format, Probe

__all__ = ["FORMAT", "TorchScript"]


class TorchScript(Format):
    name = "torchscript"
    refusal = "the file is a TorchScript archive; export a state_dict with torch.save(model.state_dict())"

    def detect(self, probe: Probe) -> bool:
        for name in probe.zip_names or ():
            parts = name.split("/")
            if len(parts) >= 2 and (parts[1] == "code" or parts[1:] == ["constants.pkl"]):
                return True
        return False


FORMAT = TorchScript()
