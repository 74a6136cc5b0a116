"""Helpers for oracle tests: save a seeded torch model, compare outputs at the DESIGN tolerance."""

import numpy as np


def assert_close(ours, ref, rel: float = 1e-4, what: str = "output"):
    """max |ours - ref| <= rel * max |ref| (DESIGN.md §3)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= rel * scale, f"{what}: max |Δ| = {err:.3g} > {rel} × {scale:.3g}"


def save_hf(model, path, **kw):
    model.save_pretrained(str(path), **kw)
    return path
