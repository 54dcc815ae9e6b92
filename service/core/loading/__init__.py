"""The loader's private parts; `service.core.load` is the public face.

- `_allowlist`: the ``safe_globals`` allowlist of torch's weights-only loader (resolution, denied modules, the
  gate that scopes torch's process-wide allowlist to the loads that asked for it);
- `_scan`: the opcode scan that names a pickle's globals without executing anything;
- `_archive`: checks of zip archives, before torch reads them and after a memory-mapped load;
- `_pickle`: torch's own readers driven by the placeholder unpickler (`service.core.unpickle`) or by the
  weights-only loader, with their errors mapped to ours;
- `_container`: finding the state_dict inside what was unpickled (the default rule, ``container_key``,
  candidates, whole pickled modules) and listing what is around it.

The per-format readers and writers are in `service.core.formats`.
"""
