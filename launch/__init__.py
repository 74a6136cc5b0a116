"""Launchers and the TPU fit check (`python -m launch.aot`)."""
