"""The wheel holds what ``--accelerate_config NAME`` reads: built from a copy of the source tree, installed
into a fresh venv that sees the shared environment's packages (torch, trl, ...) but not this checkout nor
its editable install, and run from a folder with no ``recipes/`` or ``ds_configs/``: ``gmt-align sft
--accelerate_config zero2 --num_processes 2`` trains on 2 CPU ranks with the config and JSON of the
installed package."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gmt_align.quickstart import prepare_quickstart

pytestmark = [pytest.mark.build, pytest.mark.multirank]

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".venv", ".cache", ".git", "build", "dist", "outputs", "wandb", "*.egg-info",
                              "__pycache__", ".pytest_cache")


def test_a_wheel_install_launches_a_named_config_without_a_checkout(tiny_model, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=SKIP)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", str(source), "-w",
                    str(tmp_path / "dist")], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("gmt_align-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    # The shared packages, as a plain path: the .pth files there (the editable gmt_align) are not run.
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "shared.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    data = prepare_quickstart(ROOT / ".cache" / "quickstart")["sft_train"]
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart" / "sft.yaml").read_text())
    recipe["datasets"][0]["data_files"] = str(data)
    (run_dir / "sft.yaml").write_text(yaml.safe_dump(recipe))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    where = subprocess.run([str(python), "-c", "import gmt_align; print(gmt_align.__file__)"], cwd=run_dir, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    package = Path(purelib) / "gmt_align"
    assert Path(where) == package / "__init__.py"
    result = subprocess.run(
        [str(venv / "bin" / "gmt-align"), "sft", "--config", "sft.yaml", "--accelerate_config", "zero2",
         "--num_processes", "2", "--use_cpu", "true", *tiny_model, "--output_dir", "out", "--max_steps", "1",
         "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1", "--logging_steps", "1"],
        cwd=run_dir, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (f"accelerate launch --config_file {package}/accelerate_configs/zero2.yaml --deepspeed_config_file "
            f"{package}/ds_configs/zero2.json --num_processes 2") in result.stderr
    assert "'gmt/kept_fraction': '0.8'" in result.stdout + result.stderr
    assert (run_dir / "out" / "model.safetensors").is_file()
