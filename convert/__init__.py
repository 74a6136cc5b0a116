"""Weight converters: one module a part, `from_hf(path) -> nnx.Module` and `to_hf(module, path)`."""
