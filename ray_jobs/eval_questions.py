"""The eval_questions stage (one question per held-out note, for evaluation) as a Ray job:

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/eval_questions.py --config configs/asclepius-r-7b.yaml [key.sub=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under --working-dir

from asclepius.cli import stage_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(stage_job("eval_questions"))
