"""The device script's dry run: every step of benchmarks/device_run.py on `tiny`, on the CPU, in a venv that holds only
what the GPU image has (transformers 5.17, no Ray) plus what the device run carries — so the first lent device spends
its minutes measuring, not debugging an import."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import device_image  # noqa: E402
import device_run  # noqa: E402


def test_the_orchestrator_imports_only_the_standard_library():
    """An import error must be a step's recorded result, never the script's end."""
    tree = ast.parse((ROOT / "benchmarks" / "device_run.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and n.module != "__future__"}
    assert names and names <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)


def test_every_carried_package_is_one_the_image_lacks():
    image = {device_image._norm(n) for n in device_image.IMAGE_NAMES}
    assert not image & {device_image._norm(n) for n in device_image.CARRIED}
    assert {"ray", "deepspeed", "pydantic", "flash-attn"}.isdisjoint(image - {"deepspeed"})


def test_the_venv_shares_only_what_this_environment_holds_at_the_needed_version():
    import importlib.metadata

    shared = device_image._shareable(["torch==2.13.0", "transformers==5.17.0", "pyarrow"], present={"pip", "setuptools"})
    assert {"torch", "pyarrow", "sympy", "networkx"} <= set(shared)  # torch's own dependencies come along
    assert importlib.metadata.version("transformers") != "5.17.0" and "transformers" not in shared  # the image's pin: installed
    assert "setuptools" not in shared  # the new venv holds its own, found first on its path
    assert not device_image._shareable(["torch==2.11.0"], present=set())  # another version: nothing of it


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, device_venv_build):
    python = device_image.build_venv(ROOT / ".device-venv")  # at once when the session's background build made it
    out = tmp_path_factory.mktemp("device-out")
    proc = subprocess.run([str(python), "benchmarks/device_run.py", "--cpu-dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    return proc, out, python


def test_the_dry_run_goes_through_every_step_in_the_device_images_packages(dry_run):
    proc, out, python = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "device.json").read_text())
    assert {r["step"] for r in summary["runs"]} == {name for name, _, _ in device_run.STEPS}
    assert all(r["rc"] == 0 for r in summary["runs"])
    by_step = {}
    for r in summary["results"]:
        by_step.setdefault(r["step"], []).append(r)
    env = by_step["environment"][0]
    assert env["packages"]["transformers"] == device_image.IMAGE_PINS["transformers"]  # the image's, not this venv's 5.24
    assert env["packages"]["deepspeed"] == device_image.CARRIED["deepspeed"] and env["packages"]["flash_attn"].startswith("missing")
    no_ray = subprocess.run([str(python), "-c", "import ray"], capture_output=True, text=True)
    assert no_ray.returncode != 0  # the image has no Ray, and neither has this venv
    attention = {r["path"]: r for r in by_step["attention"]}
    assert set(attention) == {"mask", "flex"}  # varlen only where flash-attn is
    assert attention["mask"]["rows"] == 2 and attention["flex"]["rows"] == 1  # the dense mask keeps max_len rows
    assert all(r["tokens_per_s"] > 0 for r in attention.values())
    (loop,) = by_step["loop"]
    assert "skipped" not in loop and loop["accumulation"] > 1 and loop["steps"] == 3  # the presets' global batch
    (serve,) = by_step["serve"]
    # ours streams tokens inside the short window; naive generate may not finish one long request in it on a busy CPU
    assert serve["clients"] == 16 and serve["ours_tokens_per_s"] > 0 and serve["naive_tokens_per_s"] >= 0 and serve["requests"] > 0
    rows = (out / "device_rows.md").read_text().splitlines()
    assert len(rows) == len(attention) + 2  # every figure has its BENCHMARKS.md row, formatted here first
