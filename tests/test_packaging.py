"""Installed like a library: `pip install .` (no extras) into a fresh venv gives genllava_jax with convert, launch
and configs as its subpackages (no generic top-level names), the data makers' prompt files, and console scripts that
train."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_installed_under_genllava_jax():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    tool = project["tool"]["setuptools"]
    dirs = {"genllava_jax." + name: name for name in ("convert", "launch", "configs")}
    assert tool["package-dir"] == dirs
    want = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "genllava_jax").rglob("__init__.py")}
    want |= set(dirs)
    assert set(tool["packages"]) == want
    assert all(p.startswith("genllava_jax") for p in tool["packages"])
    scripts = project["project"]["scripts"]
    assert {"genllava-train", "genllava-convert", "genllava-sweep", "genllava-chat", "genllava-generate",
            "genllava-edit"} <= set(scripts)


def test_converter_is_the_checkouts_never_another_convert_package(tmp_path, monkeypatch):
    import genllava_jax

    assert Path(genllava_jax.converter("clip").__file__).resolve() == ROOT / "convert" / "clip.py"
    (tmp_path / "convert").mkdir()  # a generic `convert` package elsewhere, first on the path
    (tmp_path / "convert" / "__init__.py").write_text("")
    (tmp_path / "convert" / "clip.py").write_text("FOREIGN = True\n")
    for name in ("convert", "convert.clip"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = genllava_jax.converter("clip")
    assert not hasattr(module, "FOREIGN") and module.__name__ == "genllava_jax.convert.clip"


def _constraints(path: Path) -> Path:
    """The versions this interpreter has, so that the fresh venv installs the same ones (and finds them cached);
    torch among them, so that nothing could ever resolve a CUDA build."""
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                         text=True, check=True).stdout
    lines = [line for line in out.splitlines() if "==" in line and not line.startswith("genllava")]
    path.write_text("\n".join(lines) + "\n")
    return path


def _sources(dest: Path) -> Path:
    """The checkout's files (tracked, and new ones git does not ignore) copied to `dest`: a build from the checkout
    itself would reuse its build/ folder, where files deleted since stay."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.mark.slow
def test_pip_install_without_extras_then_genllava_train_runs_the_tiny_config(tmp_path):
    from genllava_jax.data import synthetic

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    src = _sources(tmp_path / "src")
    install = subprocess.run([bin_dir / "pip", "install", "-q", str(src), "-c", _constraints(tmp_path / "c.txt")],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
    assert install.returncode == 0, install.stderr[-3000:]

    # the installed package, not the checkout: run from elsewhere, without PYTHONPATH
    where = subprocess.run([bin_dir / "python", "-c", "import genllava_jax, genllava_jax.convert.mistral, "
                            "genllava_jax.launch.slurm, genllava_jax.configs, importlib.util as u; "
                            "print(genllava_jax.__file__); print([u.find_spec(n) for n in ('convert', 'launch', "
                            "'configs', 'torch')])"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert where.returncode == 0, where.stderr[-3000:]
    path, specs = where.stdout.splitlines()
    assert Path(path).is_relative_to(env_dir) and specs == "[None, None, None, None]"  # no torch: no extras
    # the data makers' prompt files ship with it: found by their loaders in the installed package, each loading
    prompt_check = (
        "import json; from genllava_jax.datagen import edit, prompts; d = prompts.default_dir(); "
        "names = sorted(p.relative_to(d).as_posix() for p in d.rglob('*.toml')); "
        "[edit.load_templates(d / n) if n == 'edit_templates.toml' else prompts.load_fields(d / n) "
        "if n.endswith('fields.toml') else prompts.load(d / n) for n in names]; "
        "print(json.dumps([str(d), names]))")
    found = subprocess.run([bin_dir / "python", "-c", prompt_check], capture_output=True, text=True, env=env,
                           cwd=tmp_path)
    assert found.returncode == 0, found.stderr[-3000:]
    prompt_dir, names = json.loads(found.stdout)
    shipped = ROOT / "configs" / "datagen"
    assert Path(prompt_dir).is_relative_to(env_dir)
    assert names == sorted(p.relative_to(shipped).as_posix() for p in shipped.rglob("*.toml")) and len(names) >= 11
    assert all((Path(prompt_dir) / n).read_bytes() == (shipped / n).read_bytes() for n in names)
    for script, help_flag, flag in (("genllava-convert", "--help", "--from-hf"),
                                    ("genllava-sweep", "--helpfull", "--benchmark")):
        out = subprocess.run([bin_dir / script, help_flag], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert flag in out.stdout + out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]  # absl: exit 1

    # make demo's data (its generator at the tiny config's sizes, fewer records), then 3 steps of configs/tiny.py
    data = synthetic.make_synthetic(tmp_path / "data", num_train=200, num_eval=8, image_size=32, num_img_tokens=8)
    train = subprocess.run([bin_dir / "genllava-train", f"--config={ROOT / 'configs' / 'tiny.py'}",
                            f"--workdir={tmp_path / 'run'}", f"--config.data.path={data['train']}",
                            f"--config.data.tokenizer={data['tokenizer']}", f"--config.data.eval_path={data['eval']}",
                            "--config.train.steps=3", "--config.train.log_every=1"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
    assert train.returncode == 0, train.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir() and list((tmp_path / "run" / "tb").iterdir())
