"""Serve models over HTTP (OpenAI-compatible API + /v1/answer) as a Ray job; runs until stopped:

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/serve.py --config configs/asclepius-r-7b.yaml [key.sub=value ...]
    python ray_jobs/serve.py --config configs/demo.yaml --vllm-config serve_vllm.yaml   # GPU clusters with vLLM
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under --working-dir

from asclepius.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
