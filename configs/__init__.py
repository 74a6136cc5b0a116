"""ml_collections config files: `--config=configs/<name>.py`; each docstring gives its command and output."""
