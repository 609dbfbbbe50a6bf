"""`asclepius` command line.

    asclepius run --config configs/demo.yaml                    # every stage, skipping finished ones
    asclepius run --config configs/demo.yaml --stage notes      # one stage (repeatable)
    asclepius run --config configs/demo.yaml run_dir=/tmp/r2 ray.num_cpus=2   # overrides: key.sub=value
    asclepius status runs/demo [--config configs/demo.yaml]     # the run's stages: state, counts, times, cost, staleness
    asclepius estimate --config configs/asclepius-r-7b.yaml     # requests, tokens, dollars, time — before spending
    asclepius ask --url http://127.0.0.1:8000/v1 --note note.txt --question "What was the EF?"
    asclepius config --config configs/asclepius-r-7b.yaml       # the validated config, defaults filled in
    asclepius serve --config configs/demo.yaml                  # serve the config's `serve.models` until Ctrl-C
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from asclepius.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asclepius", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    commands = (
        ("run", "run the pipeline or some of its stages"),
        ("status", "what a run directory holds: each stage's state, counts, time, cost, and why it would rerun"),
        ("estimate", "requests, tokens, dollars (online and batch) and time per stage, before anything is spent"),
        ("ask", "one question about a note to a served model, with the recipe's prompt (/v1/answer)"),
        ("config", "print the resolved config"),
        ("serve", "serve models over HTTP"),
    )
    for name, help_text in commands:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name in ("run", "config", "serve", "estimate"):
            sp.add_argument("--config", required=True, help="YAML preset, e.g. configs/demo.yaml")
            sp.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        if name == "run":
            sp.add_argument("--stage", action="append", help="run only this stage (repeatable)")
            sp.add_argument("--force", action="store_true", help="rerun stages even if their outputs are complete")
            sp.add_argument("--verbose", action="store_true", help="Ray's, Ray Data's and Serve's own logs on the console too")
        if name == "config":
            sp.add_argument("--departures", action="store_true", help="list only the values that depart from the recipe's")
        if name == "serve":
            sp.add_argument("--vllm-config", help="write a ray.serve.llm (vLLM) Serve config for the same models and exit")
            sp.add_argument("--duration", type=float, help="stop after this many seconds (default: run until Ctrl-C)")
            sp.add_argument("--print-serve-config", metavar="CONFIG_PATH_IN_IMAGE",
                            help="print the Serve config (a RayService's serveConfigV2) that serves this preset from "
                            "CONFIG_PATH_IN_IMAGE, and exit")  # fmt: skip
        if name == "status":
            sp.add_argument("run_dir", help="a run directory (local path or s3://...)")
            sp.add_argument("--config", help="the config you would run: shows what is stale and why")
            sp.add_argument("overrides", nargs="*", help="key.sub=value overrides")
            sp.add_argument("--json", action="store_true")
        if name == "estimate":
            sp.add_argument("--assume-notes", type=int, help="price this many notes instead of reading the sources (a preset's data elsewhere)")
            sp.add_argument("--assume-note-tokens", type=int, default=1500, help="with --assume-notes: tokens per note")
            sp.add_argument("--json", action="store_true")
        if name == "ask":
            sp.add_argument("--url", required=True, help="the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
            sp.add_argument("--note", required=True, help="a file holding the note (- for standard input)")
            sp.add_argument("--question", required=True)
            sp.add_argument("--model", help="a served model's name (default: the server's first)")
            sp.add_argument("--max-tokens", type=int, default=400)
            sp.add_argument("--key-env", help="environment variable holding the server's key")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # overrides may come after options (`status RUN --config C a.b=1`), which argparse's positionals do not take
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command == "ask":
        return _ask(args)
    if args.command == "status" and not args.config:
        return _status(args, None)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "config":
        if args.departures:
            from asclepius.config import recipe_departures

            print("\n".join(recipe_departures(cfg)) or "none: every recipe value is the recipe's")
            return 0
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    if args.command == "status":
        return _status(args, cfg)
    if args.command == "estimate":
        return _estimate(args, cfg)
    from asclepius.console import setup_console

    if args.command == "serve":
        setup_console(None, verbose=True)
        return _serve(cfg, args)
    from asclepius.fits import ClusterTooSmall
    from asclepius.keys import KeyFileProblem
    from asclepius.lease import RunDirLeased
    from asclepius.notes.readers import NotesInputError
    from asclepius.pipeline import run_pipeline
    from asclepius.stages import STAGE_ORDER

    unknown = [s for s in args.stage or [] if s not in STAGE_ORDER]
    if unknown:
        print(f"error: unknown stage(s) {unknown}; stages: {STAGE_ORDER}", file=sys.stderr)
        return 2
    console = setup_console(cfg.run_dir, verbose=args.verbose)
    try:
        results = run_pipeline(cfg, stages=args.stage, force=args.force)
    except (NotesInputError, ClusterTooSmall, KeyFileProblem, RunDirLeased, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    console.ending(cfg, results)
    return 0


def stage_job(stage: str) -> int:
    """A `ray_jobs/<stage>.py` entrypoint: the stage, with this process's arguments (--config, overrides)."""
    return main(["run", "--stage", stage, *sys.argv[1:]])


# ----------------------------------------------------------------------------------------------- status
def _status(args, cfg) -> int:
    from asclepius.run import RunDir
    from asclepius.status import published_outputs, status_rows, status_table

    run_dir = args.run_dir
    if cfg is not None and os.path.abspath(os.path.expanduser(cfg.run_dir)) != os.path.abspath(os.path.expanduser(run_dir)) and "://" not in run_dir:
        cfg = cfg.model_copy(update={"run_dir": run_dir})
    if "://" not in run_dir and not os.path.exists(os.path.join(run_dir, "manifest.json")):
        print(f"error: {run_dir} holds no manifest.json (not a run directory, or nothing has run yet)", file=sys.stderr)
        return 2
    if cfg is not None:
        from asclepius.storage import storage_env

        storage_env(cfg.storage.endpoint_url, cfg.storage.region)
    run = RunDir.open(run_dir)
    statuses = None
    if cfg is not None:
        from asclepius.pipeline import pipeline_stages
        from asclepius.run import stage_status

        statuses = [stage_status(s, cfg, run) for s in pipeline_stages(cfg)]
    rows = status_rows(run, statuses)
    print(json.dumps(rows, indent=1) if args.json else status_table(rows, run_dir, published_outputs(run)))
    return 0


# ----------------------------------------------------------------------------------------------- estimate
def _estimate(args, cfg) -> int:
    from asclepius.estimate import estimate_run, format_table, input_notes
    from asclepius.run import RunDir

    teacher = cfg.teacher
    if teacher is None and cfg.teacher_from_serve:
        from asclepius.config import TeacherConfig

        teacher = TeacherConfig(provider="openai_compatible", base_url="http://served/v1", model=cfg.teacher_from_serve)
    run_notes = None
    if not args.assume_notes and "://" not in cfg.run_dir and os.path.exists(os.path.join(cfg.run_dir, "manifest.json")):
        run = RunDir.open(cfg.run_dir)
        if (run.stage_entry("notes") or {}).get("status") == "complete":
            run_notes = run.read_frame("notes", ["note_id", "source", "text"])
    notes = input_notes(cfg, run_notes, args.assume_notes, args.assume_note_tokens)
    rows = estimate_run(cfg, notes, teacher)
    if args.json:
        print(json.dumps([r.row() for r in rows], indent=1))
    else:
        where = (f"assuming {args.assume_notes:,} notes of {args.assume_note_tokens:,} tokens" if args.assume_notes
                 else f"{len(notes):,} notes from {'the run directory' if run_notes is not None else 'the configured sources'}")  # fmt: skip
        print(f"estimate for {args.config} ({where}):\n")
        print(format_table(rows, teacher))
    return 0


# ----------------------------------------------------------------------------------------------- ask
def _ask(args) -> int:
    import urllib.error
    import urllib.request

    note = sys.stdin.read() if args.note == "-" else open(args.note, encoding="utf-8").read()
    body = {"note": note, "question": args.question, "max_tokens": args.max_tokens}
    if args.model:
        body["model"] = args.model
    headers = {"content-type": "application/json"}
    if args.key_env:
        key = os.environ.get(args.key_env, "")
        if not key:
            print(f"error: the environment variable {args.key_env} is not set", file=sys.stderr)
            return 2
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(args.url.rstrip("/") + "/answer", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.loads(r.read())
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read())["error"]["message"]
        except Exception:  # not our JSON error
            message = err.reason
        print(f"error: {err.code} {message}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: cannot reach {args.url}: {err}", file=sys.stderr)
        return 1
    print(out["answer"])
    note_cut = f", note shortened by {out['usage'].get('note_tokens_removed', 0)} tokens" if out.get("truncated_note") else ""
    print(f"\n({out['model']}: {out['usage']['prompt_tokens']} prompt + {out['usage']['completion_tokens']} answer tokens, "
          f"finish {out['finish_reason']}{note_cut})", file=sys.stderr)  # fmt: skip
    return 0


# ----------------------------------------------------------------------------------------------- serve
def _serve(cfg, args) -> int:
    if cfg.serve is None:
        print("error: the config has no `serve` section (serve.models)", file=sys.stderr)
        return 2
    if args.print_serve_config:
        import yaml

        from asclepius.serve.app import serve_deploy_config

        print(yaml.safe_dump(serve_deploy_config(args.print_serve_config, cfg.serve, args.overrides), sort_keys=False), end="")
        return 0
    if args.vllm_config:
        import yaml

        from asclepius.serve.app import with_published_sources
        from asclepius.serve.vllm import vllm_serve_config

        with open(args.vllm_config, "w", encoding="utf-8") as f:
            yaml.safe_dump(vllm_serve_config(with_published_sources(cfg)), f, sort_keys=False)
        print(f"wrote {args.vllm_config}: serve run {args.vllm_config}")
        return 0
    import signal
    import threading

    from asclepius.cluster import init_ray
    from asclepius.serve.app import ServeConfigError, start, with_published_sources
    from asclepius.storage import storage_env

    init_ray(cfg.ray, storage_env(cfg.storage.endpoint_url, cfg.storage.region))
    try:
        url = start(with_published_sources(cfg))
    except ServeConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stop = threading.Event()
    # Ctrl-C, and a container's stop. Installed explicitly: a command started in the background (`asclepius serve &`,
    # a non-interactive shell) inherits SIGINT ignored, and would not stop on it
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        print(f"serving {[m.name for m in cfg.serve.models]} at {url} (Ctrl-C stops it)", flush=True)
        stop.wait(args.duration if args.duration else None)
    except KeyboardInterrupt:
        pass
    print("stopping ...", flush=True)
    _stop_serving()
    return 0


def _stop_serving() -> None:
    """Stop what `serve` started. A local Ray instance of its own: `ray.shutdown()` stops it whole (GCS, raylet,
    Serve's controller, proxy and replicas) in seconds. A cluster it joined: the app is deleted there first (it is
    detached and would outlive this command), then this driver disconnects. A second Ctrl-C ends it at once."""
    import signal

    import ray
    from ray import serve

    from asclepius.cluster import started_here

    signal.signal(signal.SIGINT, signal.default_int_handler)
    if not started_here():
        serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
