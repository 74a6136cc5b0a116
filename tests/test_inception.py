"""FID Inception and the Frechet distance against pytorch-fid itself (tests/pytorch_fid_oracle.py): the network's
pool3 features at seeded random weights, its bilinear resize, the converter both ways, and FID."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from convert import inception as conv
from convert.common import ConversionError
from genllava_jax import evaluate as ev
from oracle import assert_close
from pytorch_fid_oracle import load


@pytest.fixture(scope="module")
def oracle():
    return load(seed=0)


@pytest.fixture(scope="module")
def weights(oracle, tmp_path_factory):
    """A file laid out as pytorch-fid's pt_inception-2015-12-05 weights (the state dict of its fid_inception_v3)."""
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05.pth"
    torch.save(oracle[0].fid_inception_v3().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def ours(weights):
    return conv.from_hf(weights)


@pytest.fixture(scope="module")
def images():
    """Six images in [0, 1], not 299 x 299, so the resize is part of what is compared."""
    return np.random.default_rng(0).uniform(size=(6, 3, 61, 83)).astype(np.float32)


@pytest.fixture(scope="module")
def features(ours, images):
    """Our pool3 features of `images` (one compile)."""
    return np.asarray(jax.jit(lambda m, x: m(x))(ours, jnp.asarray(images.transpose(0, 2, 3, 1))))


@pytest.mark.slow
def test_pool3_features_equal_pytorch_fid(oracle, features, images):
    net = oracle[0].InceptionV3([3]).eval()  # block 3: pool3, resize_input and normalize_input on, as FID uses it
    with torch.no_grad():
        ref = net(torch.from_numpy(images))[0][:, :, 0, 0].numpy()
    assert features.shape == (6, 2048) and np.abs(ref).max() > 0.1
    assert_close(features, ref, what="pool3 features")


@pytest.mark.parametrize("size", [(61, 83), (320, 512)])  # up and down to 299: no antialiasing either way
def test_resize_equals_f_interpolate(size):
    x = np.random.default_rng(1).uniform(size=(1, 3, *size)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=(299, 299), mode="bilinear", align_corners=False).numpy()
    got = jax.image.resize(jnp.asarray(x.transpose(0, 2, 3, 1)), (1, 299, 299, 3), "linear", antialias=False)
    assert_close(np.asarray(got).transpose(0, 3, 1, 2), ref, rel=1e-6, what="resize")


@pytest.mark.slow
def test_round_trip_and_bad_checkpoints(weights, ours, tmp_path):
    conv.to_hf(ours, tmp_path / "out")
    back = conv.from_hf(tmp_path / "out")
    a, b = jax.tree.leaves(ours), jax.tree.leaves(back)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    # the export holds pytorch-fid's keys and values, less the classifier and the batch counters
    from safetensors.numpy import load_file

    exported = load_file(tmp_path / "out/model.safetensors")
    original = torch.load(weights, weights_only=True)
    kept = {k: v for k, v in original.items() if not (k.startswith("fc.") or k.endswith("num_batches_tracked"))}
    assert set(exported) == set(kept)
    assert all(np.array_equal(exported[k], v.numpy()) for k, v in kept.items())
    # the CLI takes the bare .pth file
    from convert.__main__ import main
    from genllava_jax import checkpoint

    assert main(["inception", "--from-hf", str(weights), "--out", str(tmp_path / "cli")]) == 0
    cli = checkpoint.load_module(tmp_path / "cli")
    assert all(np.array_equal(x, y) for x, y in zip(a, jax.tree.leaves(cli)))
    # a missing, a mis-shaped and an unknown key are each refused by name
    for name, change in [("missing", lambda s: s.pop("Mixed_6b.branch7x7_2.conv.weight")),
                         ("shape", lambda s: s.__setitem__("Mixed_5b.branch1x1.bn.weight", torch.ones(3))),
                         ("unexpected", lambda s: s.__setitem__("Mixed_8a.conv.weight", torch.ones(1)))]:
        bad = dict(original)
        change(bad)
        torch.save(bad, tmp_path / f"{name}.pth")
        with pytest.raises(ConversionError, match=r"Mixed_6b\.branch7x7_2|Mixed_5b\.branch1x1\.bn|Mixed_8a"):
            conv.from_hf(tmp_path / f"{name}.pth")


def test_frechet_distance_equals_pytorch_fid(oracle):
    fid_score = oracle[1]
    rng = np.random.default_rng(0)
    for n_a, n_b, d in [(200, 150, 8), (64, 80, 32)]:
        a = rng.normal(size=(n_a, d))
        b = rng.normal(size=(n_b, d)) @ rng.normal(size=(d, d)) * 0.5 + 0.3
        stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]  # calculate_activation_statistics
        ref = fid_score.calculate_frechet_distance(*stats[0], *stats[1])
        assert ev.frechet_distance(*stats[0], *stats[1]) == pytest.approx(ref, rel=1e-9)
        assert ev.fid(a, b) == pytest.approx(ref, rel=1e-9)


@pytest.mark.slow
def test_fid_of_a_set_against_itself_is_zero(features):
    scale = np.trace(np.cov(features, rowvar=False))  # 6 samples in 2048 dimensions: singular covariances
    assert ev.fid(features, features) == pytest.approx(0.0, abs=1e-9 * scale)
    assert ev.fid(features, features[::-1]) == pytest.approx(0.0, abs=1e-9 * scale)
    assert ev.fid(features, features[:3]) > 1e-3 * scale
