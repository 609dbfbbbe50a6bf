"""The whole pipeline as a Ray job (stages whose outputs are complete are skipped):

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/pipeline.py --config configs/asclepius-r-7b.yaml [key.sub=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under --working-dir

from asclepius.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
