"""The evaluate stage (candidates answer, the recipe's LLM judge scores, report.md) as a Ray job, alone or
after the pipeline; against any endpoints with a dataset file:

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/evaluate.py --config configs/asclepius-r-7b.yaml [key.sub=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under --working-dir

from asclepius.cli import stage_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(stage_job("evaluate"))
