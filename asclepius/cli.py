"""`asclepius` command line: run the pipeline or one stage, or print the resolved config.

    asclepius run --config configs/demo.yaml                    # every stage, skipping finished ones
    asclepius run --config configs/demo.yaml --stage notes      # one stage
    asclepius run --config configs/demo.yaml run_dir=/tmp/r2 ray.num_cpus=2   # overrides: key.sub=value
    asclepius config --config configs/asclepius-r-7b.yaml       # the validated config, defaults filled in
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from asclepius.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asclepius", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run the pipeline or one stage"), ("config", "print the resolved config")):
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("--config", required=True, help="YAML preset, e.g. configs/demo.yaml")
        sp.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        if name == "run":
            sp.add_argument("--stage", action="append", help="run only this stage (repeatable)")
            sp.add_argument("--force", action="store_true", help="rerun stages even if their outputs are complete")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    from asclepius.notes.readers import NotesInputError
    from asclepius.pipeline import STAGES, run_pipeline

    unknown = [s for s in args.stage or [] if s not in STAGES]
    if unknown:
        print(f"error: unknown stage(s) {unknown}; stages: {list(STAGES)}", file=sys.stderr)
        return 2
    try:
        run_pipeline(cfg, stages=args.stage, force=args.force)
    except NotesInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
