"""The GPU device image's Python packages, what the device run carries to it, and a venv here that holds only those.

    python benchmarks/device_image.py --carried          # the pins benchmarks/device_wheels.sh downloads into .whl/
    python benchmarks/device_image.py --venv .device-venv  # a venv of the image's names (pinned where KINDS.md gives
                                                         # a version) + the carried pins, for device_run.py --cpu-dry-run

The image ('cuda', as /work/.library/device/KINDS.md read it on 2026-11-17) runs Python 3.12 with torch 2.11.0+cu130
and transformers 5.17.0, and has no Ray, DeepSpeed, pydantic or flash-attn. The venv pins transformers and its
companions to the image's versions; torch is this machine's CPU build (2.13.0: no other CPU wheel is reachable here)
and Python is this machine's. What this project's environment already holds at the version the venv needs (torch and
its dependencies, numpy, pyarrow, DeepSpeed, ...) is linked, not installed again. After installing, every package in
the venv must be one the image has or one that is carried: a dependency the image lacks fails here, not on the device.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# KINDS.md, "Python packages already there" (nvidia-h200)
IMAGE_NAMES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson
ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()
# KINDS.md's pip list row (2026-11): the versions that matter to the steps
IMAGE_PINS = {"transformers": "5.17.0", "tokenizers": "0.23.2", "huggingface-hub": "1.33.0", "safetensors": "0.8.0",
              "accelerate": "1.15.0", "sentencepiece": "0.2.2", "tiktoken": "0.14.0"}  # fmt: skip
# what device_run.py's steps import from the image
STEP_NEEDS = ["torch", "transformers", "tokenizers", "huggingface-hub", "safetensors", "accelerate", "sentencepiece",
              "numpy", "pyarrow", "pyyaml", "psutil"]  # fmt: skip
# what the image lacks and the device run carries (benchmarks/device_wheels.sh): asclepius.config needs pydantic,
# the loop step DeepSpeed (a pure-Python wheel built here; its ops JIT-build on the device)
CARRIED = {"pydantic": "2.14.4", "pydantic-core": None, "annotated-types": None, "typing-inspection": None, "hjson": None,
           "deepspeed": "0.19.8"}  # fmt: skip
TORCH_HERE = "torch==2.13.0"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def carried_pins() -> list[str]:
    """name==version for every carried package, the versions of this project's own venv where not fixed."""
    import importlib.metadata

    return [f"{name}=={version or importlib.metadata.version(name)}" for name, version in CARRIED.items()]


def venv_requirements() -> list[str]:
    return [TORCH_HERE if n == "torch" else f"{n}=={IMAGE_PINS[n]}" if n in IMAGE_PINS else n for n in STEP_NEEDS] + carried_pins()


def _installed_here() -> dict:
    """This environment's distributions by normalized name."""
    import importlib.metadata

    return {_norm(d.metadata["Name"]): d for d in importlib.metadata.distributions() if d.metadata["Name"]}


def _tops(dist) -> set[str]:
    """The top-level names a distribution puts in site-packages (packages, modules, its dist-info, its .libs)."""
    return {Path(f).parts[0] for f in dist.files or [] if Path(f).parts and Path(f).parts[0] not in ("..", "__pycache__")}


def _shareable(requirements: list[str], present: set[str]) -> dict:
    """What this environment already holds of the requirements (at the pinned version where one is pinned) and of their
    dependencies, transitively: each a distribution whose top-level names no other distribution here also uses, and
    none the new venv holds already (`present`: its pip and setuptools, found first on its path)."""
    from packaging.requirements import Requirement

    here = _installed_here()
    owners: dict[str, set[str]] = {}
    for name, dist in here.items():
        for top in _tops(dist):
            owners.setdefault(top, set()).add(name)
    chosen: dict = {}
    queue = [Requirement(r) for r in requirements]
    while queue:
        req = queue.pop()
        name = _norm(req.name)
        dist = here.get(name)
        if name in chosen or name in present or dist is None or not req.specifier.contains(dist.version, prereleases=True):
            continue
        if not dist.files or any(owners[top] != {name} for top in _tops(dist)):
            continue
        chosen[name] = dist
        for dep in map(Requirement, dist.requires or []):
            if dep.marker is None or dep.marker.evaluate({"extra": ""}):
                # the version here fits this environment; the constraints file makes pip say if it does not fit the venv
                queue.append(Requirement(dep.name))
    return chosen


def _share_installed(target: Path, requirements: list[str]) -> Path:
    """Put this environment's copies of what the new venv needs on its path instead of installing them again (torch and
    its dependencies, numpy, pyarrow, DeepSpeed, ...): the same files, already compiled, and pip sees them installed
    (their dist-info comes along). Returns a constraints file pinning each shared distribution to its version: pip must
    keep them (replacing one would uninstall it, through the links, from this environment) or fail."""
    import sysconfig

    shared = target / "shared-site"
    shared.mkdir()
    purelib = sysconfig.get_path("purelib", vars={"base": str(target), "platbase": str(target)})
    present = {_norm(p.name.split("-")[0]) for p in Path(purelib).glob("*.dist-info")}
    Path(purelib, "shared_site.pth").write_text(f"{shared}\n")
    chosen = _shareable(requirements, present)
    for dist in chosen.values():
        site_here = Path(dist.locate_file(""))
        for top in _tops(dist):
            (shared / top).symlink_to(site_here / top)
    constraints = target / "shared-constraints.txt"
    constraints.write_text("".join(f"{dist.metadata['Name']}=={dist.version}\n" for dist in chosen.values()))
    return constraints


def build_venv(target: Path) -> Path:
    """The venv at `target` (reused while the requirements are the same); raises if it holds a package the image lacks."""
    python = target / "bin" / "python"
    requirements = venv_requirements()
    stamp = target / ".requirements"
    digest = hashlib.sha256("\n".join(requirements).encode()).hexdigest()
    if not (python.exists() and stamp.exists() and stamp.read_text() == digest):
        install = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements]
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(target)], check=True)
        if subprocess.run([*install, "-c", str(_share_installed(target, requirements))]).returncode != 0:
            # what is shared here does not fit the image's pins: everything installed into the venv instead
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(target)], check=True)
            subprocess.run(install, check=True)
        stamp.write_text(digest)
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"], check=True,
                            capture_output=True, text=True).stdout.split()  # fmt: skip
    allowed = {_norm(n) for n in IMAGE_NAMES} | {_norm(n) for n in CARRIED}
    extra = sorted(line for line in listed if _norm(line.split("==")[0]) not in allowed)
    if extra:
        raise SystemExit(f"the device venv holds packages the device image does not have and nothing carries: {extra}; "
                         f"add them to CARRIED (and benchmarks/device_wheels.sh carries them) or avoid them")  # fmt: skip
    return python


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--carried", action="store_true")
    ap.add_argument("--venv")
    args = ap.parse_args()
    if args.carried:
        print("\n".join(carried_pins()))
    if args.venv:
        print(build_venv(Path(args.venv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
