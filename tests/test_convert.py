"""`python -m convert` file to file (convert/stream.py): bit-exact both ways in the source's dtype, stacked layers
chunked one apiece, nothing left behind by a killed run, the user's umask, one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import MistralConfig, MistralForCausalLM

from convert.__main__ import main as convert_cli
from genllava_jax import errors, param_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory):
    """A tiny Mistral in bfloat16, sharded over several safetensors files as big checkpoints are."""
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    path = tmp_path_factory.mktemp("hf") / "mistral"
    model.to(torch.bfloat16).save_pretrained(str(path), max_shard_size="40KB")
    assert len(list(path.glob("*.safetensors"))) > 1
    return model, path


def tensors_of(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_import_and_export_are_bit_exact_in_the_source_dtype(hf_bf16, tmp_path):
    _, hf = hf_bf16
    assert convert_cli(["mistral", "--from-hf", str(hf), "--out", str(tmp_path / "ours")]) == 0
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["part"] == "mistral" and saved["config"]["param_dtype"] == "bfloat16"  # the source's, not float32
    zarray = json.loads((tmp_path / "ours" / "params" / "layers.q.kernel.value" / ".zarray").read_text())
    assert zarray["shape"][0] == 3 and zarray["chunks"][0] == 1 and zarray["dtype"] == "bfloat16"  # a chunk a layer
    reader = param_store.ParamReader(tmp_path / "ours" / "params")
    source = tensors_of(hf)
    q0 = source["model.layers.1.self_attn.q_proj.weight"].float().numpy()
    np.testing.assert_array_equal(reader.read("layers/q/kernel", 1).astype(np.float32), q0.T.reshape(32, 4, 8))

    assert convert_cli(["mistral", "--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back"),
                        "--max-shard-size", str(30_000 / 2**30)]) == 0
    back = tmp_path / "back"
    assert (back / "model.safetensors.index.json").exists() and len(list(back.glob("*.safetensors"))) > 1
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "bfloat16"
    exported = tensors_of(back)
    assert exported.keys() == source.keys()
    for key, t in source.items():
        assert exported[key].dtype == torch.bfloat16 and torch.equal(exported[key], t), key
    reloaded, info = MistralForCausalLM.from_pretrained(str(back), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert reloaded.dtype == torch.bfloat16
    ids = torch.tensor(np.random.RandomState(0).randint(0, 96, (2, 7)))
    original = MistralForCausalLM.from_pretrained(str(hf)).eval()  # (`model` itself has bfloat16 RoPE buffers)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids).logits, original(ids).logits)

    # --dtype overrides both ways; the exported config records it
    assert convert_cli(["mistral", "--from-hf", str(hf), "--out", str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    f32 = param_store.ParamReader(tmp_path / "f32" / "params")
    np.testing.assert_array_equal(f32.read("layers/q/kernel", 1), q0.T.reshape(32, 4, 8))
    assert convert_cli(["mistral", "--to-hf", str(tmp_path / "f32"), "--out", str(tmp_path / "f16"),
                        "--dtype", "float16"]) == 0
    assert json.loads((tmp_path / "f16" / "config.json").read_text())["torch_dtype"] == "float16"
    assert tensors_of(tmp_path / "f16")["model.layers.1.self_attn.q_proj.weight"].dtype == torch.float16


SLOW_WRITER = """
import sys, time
from genllava_jax import param_store
write = param_store.ParamWriter.write
def slow(self, *a, **kw):
    write(self, *a, **kw)
    time.sleep(0.05)  # the conversion is still writing when the test kills it
param_store.ParamWriter.write = slow
from convert.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_conversion_leaves_nothing_behind_after_the_next_run(hf_bf16, tmp_path, capsys):
    _, hf = hf_bf16
    out = tmp_path / "out" / "mistral"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, "mistral", "--from-hf", str(hf), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(out.parent.glob(".mistral.tmp-*/params/_CHECKPOINT_METADATA")) and \
            not any(p.is_dir() for p in out.parent.glob(".mistral.tmp-*/params/*")):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stale = list(out.parent.glob(".mistral.tmp-*"))
    assert len(stale) == 1 and not out.exists()  # what kill -9 leaves: a half-written hidden folder

    assert convert_cli(["mistral", "--from-hf", str(hf), "--out", str(out)]) == 0
    assert f"{stale[0]}: removed, left by a killed run (process {proc.pid})" in capsys.readouterr().err
    assert sorted(p.name for p in out.parent.iterdir()) == ["mistral"]
    assert param_store.ParamReader(out / "params").read("layers/q/kernel").shape == (3, 32, 4, 8)


def test_outputs_keep_the_users_umask(hf_bf16, tmp_path):
    _, hf = hf_bf16
    old = os.umask(0o027)
    try:
        assert convert_cli(["mistral", "--from-hf", str(hf), "--out", str(tmp_path / "ours")]) == 0
        assert convert_cli(["mistral", "--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    finally:
        os.umask(old)
    for top in (tmp_path / "ours", tmp_path / "back"):
        for p in [top, *top.rglob("*")]:
            want = 0o750 if p.is_dir() else 0o640
            assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode & 0o777))


def test_failures_print_one_line_naming_the_file_or_key(hf_bf16, tmp_path, capsys):
    _, hf = hf_bf16
    cli = lambda *a: errors.guard(convert_cli, list(a))  # as `python -m convert` runs it  # noqa: E731
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("mistral", "--from-hf", str(empty), "--out", str(tmp_path / "a")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(empty / "config.json") in err and "Traceback" not in err, err

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in hf.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    key = "model.layers.2.mlp.up_proj.weight"
    del index["weight_map"][key]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    assert cli("mistral", "--from-hf", str(bad), "--out", str(tmp_path / "b")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and "missing" in err, err
    assert not (tmp_path / "b").exists()

    # a checkpoint of another part; the traceback with --verbose
    assert cli("mistral", "--from-hf", str(hf), "--out", str(tmp_path / "ours")) == 0
    assert cli("unet", "--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "c")) == 2
    assert "a 'mistral' checkpoint, not 'unet'" in capsys.readouterr().err
    assert cli("unet", "--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "c"), "--verbose") == 2
    assert "Traceback" in capsys.readouterr().err
