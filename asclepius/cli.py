"""`asclepius` command line: run the pipeline or one stage, or print the resolved config.

    asclepius run --config configs/demo.yaml                    # every stage, skipping finished ones
    asclepius run --config configs/demo.yaml --stage notes      # one stage
    asclepius run --config configs/demo.yaml run_dir=/tmp/r2 ray.num_cpus=2   # overrides: key.sub=value
    asclepius config --config configs/asclepius-r-7b.yaml       # the validated config, defaults filled in
    asclepius serve --config configs/demo.yaml                  # serve the config's `serve.models` until Ctrl-C
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
    commands = (("run", "run the pipeline or one stage"), ("config", "print the resolved config"), ("serve", "serve models over HTTP"))
    for name, help_text in commands:
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("--config", required=True, help="YAML preset, e.g. configs/demo.yaml")
        sp.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        if name == "run":
            sp.add_argument("--stage", action="append", help="run only this stage (repeatable)")
            sp.add_argument("--force", action="store_true", help="rerun stages even if their outputs are complete")
        if name == "serve":
            sp.add_argument("--vllm-config", help="write a ray.serve.llm (vLLM) Serve config for the same models and exit")
            sp.add_argument("--duration", type=float, help="stop after this many seconds (default: run until Ctrl-C)")
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
    if args.command == "serve":
        return _serve(cfg, args)
    from asclepius.notes.readers import NotesInputError
    from asclepius.pipeline import STAGE_ORDER, run_pipeline

    unknown = [s for s in args.stage or [] if s not in STAGE_ORDER]
    if unknown:
        print(f"error: unknown stage(s) {unknown}; stages: {STAGE_ORDER}", file=sys.stderr)
        return 2
    try:
        run_pipeline(cfg, stages=args.stage, force=args.force)
    except NotesInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def stage_job(stage: str) -> int:
    """A `ray_jobs/<stage>.py` entrypoint: the stage, with this process's arguments (--config, overrides)."""
    return main(["run", "--stage", stage, *sys.argv[1:]])


def _serve(cfg, args) -> int:
    if cfg.serve is None:
        print("error: the config has no `serve` section (serve.models)", file=sys.stderr)
        return 2
    if args.vllm_config:
        import yaml

        from asclepius.serve.vllm import vllm_serve_config

        with open(args.vllm_config, "w", encoding="utf-8") as f:
            yaml.safe_dump(vllm_serve_config(cfg.serve), f, sort_keys=False)
        print(f"wrote {args.vllm_config}: serve run {args.vllm_config}")
        return 0
    import time

    from asclepius.cluster import init_ray
    from asclepius.serve.app import start

    init_ray(cfg.ray)
    url = start(cfg.serve)
    print(f"serving {[m.name for m in cfg.serve.models]} at {url}", flush=True)
    deadline = time.time() + args.duration if args.duration else None
    try:
        while deadline is None or time.time() < deadline:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
