"""pytorch-fid's own `inception.py` and `fid_score.py`, run on torchvision's own Inception blocks, as test oracles.

torchvision's wheel does not import beside the CPU torch (its compiled ops do not register), and pytorch-fid's
network subclasses torchvision's `InceptionA/C/E` and builds on `Inception3`. So the two packages' wheels are
downloaded at install time (`make install`: `pip download --no-deps pytorch-fid==0.3.0 torchvision==0.28.0` into
`<venv>/oracle-wheels`, nothing installed), and here `torchvision/models/inception.py` (pure torch) and pytorch-fid's
two modules are executed from the wheels unchanged, with stand-ins only for what they import and do not use here
(torchvision's weight registry, logging, ImageNet transforms). Nothing is downloaded at test time: pytorch-fid's
weight download is replaced by seeded random weights.
"""

from __future__ import annotations

import enum
import os
import sys
import types
import zipfile
from pathlib import Path

import torch

WHEELS = Path(os.environ.get("GENLLAVA_ORACLE_WHEELS", Path(sys.prefix) / "oracle-wheels"))


def _wheel(name: str) -> zipfile.ZipFile:
    found = sorted(WHEELS.glob(f"{name}-*.whl"))
    if not found:
        raise FileNotFoundError(f"no {name} wheel in {WHEELS}: run `make install`, or `pip download --no-deps -d "
                                f"{WHEELS} pytorch-fid==0.3.0 torchvision==0.28.0`")
    return zipfile.ZipFile(found[-1])


def _module(name: str, source: str | None = None, package: bool = False, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    if package:
        mod.__path__ = []
    mod.__dict__.update(attrs)
    if source is not None:
        mod.__package__ = name.rpartition(".")[0]
        exec(compile(source, f"<wheel>/{name.replace('.', '/')}.py", "exec"), mod.__dict__)
    return mod


class _WeightsEnum(enum.Enum):
    @classmethod
    def verify(cls, obj):
        return obj


def load(seed: int = 0):
    """(pytorch_fid.inception, pytorch_fid.fid_score) modules; `inception.fid_inception_v3()` builds the FID network
    with weights drawn from `seed` (BatchNorm statistics too, so that eval-mode normalisation is exercised)."""
    tv_src = _wheel("torchvision").read("torchvision/models/inception.py").decode()
    fid = _wheel("pytorch_fid")
    ours = lambda k: k == "torchvision" or k.startswith(("torchvision.", "pytorch_fid"))  # noqa: E731
    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    try:
        tv = _module("torchvision", package=True, __version__="0.28.0")
        stand_ins = {
            "torchvision.transforms": _module("torchvision.transforms", package=True),
            "torchvision.transforms._presets": _module("torchvision.transforms._presets", ImageClassification=object),
            "torchvision.utils": _module("torchvision.utils", _log_api_usage_once=lambda *a: None),
            "torchvision.models._api": _module("torchvision.models._api", register_model=lambda *a, **k: lambda f: f,
                                               Weights=lambda **k: k, WeightsEnum=_WeightsEnum),
            "torchvision.models._meta": _module("torchvision.models._meta", _IMAGENET_CATEGORIES=[]),
            "torchvision.models._utils": _module(
                "torchvision.models._utils", _ovewrite_named_param=lambda kw, k, v: kw.__setitem__(k, v),
                handle_legacy_interface=lambda **k: lambda f: f),
        }
        sys.modules.update({"torchvision": tv, "torchvision.models": _module("torchvision.models", package=True),
                            **stand_ins})
        inception = _module("torchvision.models.inception", tv_src)
        tv.models = sys.modules["torchvision.models"]
        tv.models.inception, tv.models.inception_v3 = inception, inception.inception_v3
        tv.transforms = stand_ins["torchvision.transforms"]
        sys.modules["torchvision.models.inception"] = inception
        sys.modules["pytorch_fid"] = _module("pytorch_fid", package=True)
        fid_inception = _module("pytorch_fid.inception", fid.read("pytorch_fid/inception.py").decode())
        sys.modules["pytorch_fid.inception"] = fid_inception
        fid_score = _module("pytorch_fid.fid_score", fid.read("pytorch_fid/fid_score.py").decode())
    finally:  # the stand-ins never outlive the load
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)

    def random_weights(url, progress=True):
        net = inception.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
        for name, block, args in (("Mixed_5b", "FIDInceptionA", (192, 32)), ("Mixed_5c", "FIDInceptionA", (256, 64)),
                                  ("Mixed_5d", "FIDInceptionA", (288, 64)), ("Mixed_6b", "FIDInceptionC", (768, 128)),
                                  ("Mixed_6c", "FIDInceptionC", (768, 160)), ("Mixed_6d", "FIDInceptionC", (768, 160)),
                                  ("Mixed_6e", "FIDInceptionC", (768, 192)), ("Mixed_7b", "FIDInceptionE_1", (1280,)),
                                  ("Mixed_7c", "FIDInceptionE_2", (2048,))):
            setattr(net, name, getattr(fid_inception, block)(*args))
        g = torch.Generator().manual_seed(seed)
        state = {}
        for k, v in net.state_dict().items():
            if k.endswith("running_var"):
                state[k] = 0.5 + torch.rand(v.shape, generator=g)
            elif k.endswith("num_batches_tracked"):
                state[k] = v
            elif k.endswith("running_mean") or k.endswith("bn.bias"):
                state[k] = 0.1 * torch.randn(v.shape, generator=g)
            elif k.endswith("bn.weight"):
                state[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
            else:  # conv kernels at a variance that keeps activations O(1) through 90 layers
                fan_in = v[0].numel()
                state[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
        return state

    fid_inception.load_state_dict_from_url = random_weights
    return fid_inception, fid_score
