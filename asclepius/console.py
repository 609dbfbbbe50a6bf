"""What a person sees: a quiet console, the full logs in `<run>/logs/`, and an ending that says where things are.

Quiet (the default of `asclepius run`): the console shows each stage's progress (a live bar in a terminal, a line
every `teacher.progress_every_s` otherwise) and its summary, warnings and errors — nothing of Ray's, Ray Data's or
Serve's own logs, which go to `<run>/logs/asclepius.log` (and Ray's session directory). `--verbose` puts them all
back on the console. Never any note text, question or answer — except, at the very end of a run on the bundled
fictional samples, one answer of the fine-tuned model, so a newcomer sees what was built.
"""

from __future__ import annotations

import logging
import atexit
import os
import re
import socket
import sys
import threading
import time

log = logging.getLogger("asclepius")
# Ray's C++ core worker writes its own lines ("[2026-01-01 12:00:00,000 E 123 456] core_worker.cc:...") straight to
# file descriptor 2, past Python's logging; the quiet console sends them to the log file instead.
NATIVE_LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] ")
# what Ray's driver prints for its processes, e.g. "(raylet) WARNING: 8 PYTHON worker processes have been started"
RAY_PROCESS_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|autoscaler|gcs_server)[^)]*\)")
TERMINAL: dict = {"stream": None}  # the real stderr when it is a terminal (for live bars), set by setup_console


LOG: dict = {"file": None}  # this driver's log file (set by setup_console)
workers_log = logging.getLogger("asclepius.workers")
# a worker's line worth the console: a warning or error of any logger, a traceback; and the autoscaler's events
SHOWN_WORKER_LINE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback \(most recent call last\)|^\w*Error: ")


def route_worker_logs(data: dict) -> None:
    """Ray's worker output as it reaches the driver: every line to the log file, warnings and errors (and the
    autoscaler's node events) to the console too — so they are in `ray job logs`."""
    pid = data.get("pid")
    if pid == "autoscaler":  # its node events (Adding 2 node(s) of type ...), as Ray's own printer picks them
        lines = data.get("lines") or []
        try:
            from ray._private.worker import filter_autoscaler_events

            events = list(filter_autoscaler_events(lines))
        except Exception:  # noqa: BLE001 — no GCS to ask which autoscaler runs: v1's event marker
            events = [line.split(":event_summary:", 1)[1] for line in lines if ":event_summary:" in line]
        for line in events:
            workers_log.warning("(autoscaler) %s", line.rstrip())
        return
    who = data.get("actor_name") or data.get("task_name") or "worker"
    for line in data.get("lines") or []:
        level = logging.WARNING if SHOWN_WORKER_LINE.search(line) else logging.INFO
        workers_log.log(level, "(%s, pid=%s, ip=%s) %s", who, pid, data.get("ip"), line.rstrip())


def publish_log(run) -> None:
    """A run in object storage gets the driver's log file in `<run>/logs/` (uploaded whole at every stage's end); a
    local run writes it there already. A failed upload is a warning, never the run's end."""
    path = LOG["file"]
    if not path or run.is_local or not os.path.exists(path):
        return
    from asclepius.storage import write_bytes

    try:
        with open(path, "rb") as f:
            write_bytes(run.uri_of("logs", os.path.basename(path)), f.read())
    except Exception as err:  # noqa: BLE001
        log.warning("logs: could not upload %s to the run (%s)", os.path.basename(path), type(err).__name__)


def shown(logger: logging.Logger, message: str, *args) -> None:
    """An INFO line for the quiet console too (stage summaries, progress)."""
    logger.info(message, *args, extra={"console": True})


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.startswith("asclepius")
        if ours:
            return record.levelno >= logging.WARNING or bool(getattr(record, "console", False))
        return record.levelno >= logging.ERROR  # Ray's own errors still show; its info and warnings go to the file


class Console:
    def __init__(self, run_dir: str | None, verbose: bool, log_file: str | None):
        self.run_dir, self.verbose, self.log_file = run_dir, verbose, log_file
        self.started = time.time()

    def ending(self, cfg, results: dict[str, dict]) -> None:
        """The stages as a table, where the model, the report and the logs are, and — on the bundled fictional
        samples only — one answer of the fine-tuned model."""
        if not results:
            return
        out = [f"\n{'stage':<16}{'in':>10}{'out':>12}{'time':>9}{'cost':>10}"]
        for name, e in results.items():
            from asclepius.status import _cost, _rows_in_out

            rows_in, rows_out = _rows_in_out(name, e)
            state = "skipped" if e.get("skipped") else f"{e.get('wall_seconds', e.get('seconds', 0)):.0f} s"
            out.append(f"{name:<16}{rows_in:>10}{rows_out:>12}{state:>9}{'$' + format(_cost(e), '.4f'):>10}")
        out.append(f"total {time.time() - self.started:.0f} s")
        from asclepius.run import RunDir

        run = RunDir.open(cfg.run_dir)
        for label, parts in (("model", ("checkpoints", "finetune", "final")), ("report", ("eval", "report.md"))):
            if run.exists(run.output_path(*parts)):
                out.append(f"{label}: {run.output_uri(*parts)}")
        if self.log_file:
            where = self.log_file if run.is_local else f"{run.uri_of('logs', os.path.basename(self.log_file))} (local copy {self.log_file})"
            out.append(f"logs: {where} (Ray's own: /tmp/ray/session_latest/logs)")
        print("\n".join(out), file=sys.stderr, flush=True)
        sample = sample_answer(cfg)
        if sample:
            print(sample, file=sys.stderr, flush=True)


def sample_answer(cfg) -> str | None:
    """One question answered by the fine-tuned model on a bundled fictional note. Only when every source is a
    bundled sample: the rule that no note text is ever printed holds for real data."""
    if not all(s.path.startswith("sample:") for s in cfg.notes.sources):
        return None
    from asclepius.recipe import load_recipe
    from asclepius.run import RunDir
    from asclepius.storage import local_copy

    run = RunDir.open(cfg.run_dir)
    if not run.exists(run.output_path("checkpoints", "finetune", "final", "config.json")):
        return None
    model_dir = local_copy(run.output_uri("checkpoints", "finetune", "final"))
    notes = run.read_frame("notes", ["note_id", "source", "text"])
    notes = notes[~notes.source.isin(cfg.synthesize.case_report_sources)].sort_values("note_id")
    if notes.empty:
        return None
    note = notes.iloc[0]
    question = load_recipe().tasks[7].seed_questions[1]  # a Question Answering seed question
    return (f"\nthe fine-tuned model on a bundled fictional note ({note.note_id}):\n  question: {question}\n"
            f"  answer:   {shown_answer(model_answer(model_dir, note.text, question))}\n"
            f"(a 135M model after a few CPU steps: the machinery is real, the answer is not clinical advice)")  # fmt: skip


def model_answer(model_dir: str, note: str, question: str, max_tokens: int = 96) -> str:
    """The model's answer as /v1/answer gives it to people: greedy, ending at the recipe's prompt markers, a loop cut
    to one copy."""
    from transformers.utils import logging as hf_logging

    from asclepius.models import load_model, load_tokenizer, text_prompt_ids
    from asclepius.recipe import load_recipe
    from asclepius.serve.engine import Engine, GenRequest
    from asclepius.serve.schemas import PROMPT_MARKERS

    hf_logging.disable_progress_bar()  # "Loading weights" bars: not for the newcomer's screen
    tok = load_tokenizer(model_dir)
    prompt = load_recipe().model_prompt.format(note=note.strip("\n"), question=question)
    request = GenRequest(text_prompt_ids(tok, prompt), max_tokens, temperature=0, stop=list(PROMPT_MARKERS), cut_repetition=True)
    return Engine(load_model(model_dir), tok).generate([request])[0][0]


def shown_answer(text: str, width: int = 96, max_lines: int = 4) -> str:
    """An answer as the console shows it: blank lines dropped, wrapped, at most `max_lines` lines (then "…")."""
    import textwrap

    lines = [part for line in text.strip().splitlines() if line.strip() for part in textwrap.wrap(line.strip(), width)]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " …"
    return "\n            ".join(lines) or "(empty)"


def _route_native_stderr(log_file: str | None) -> None:
    """File descriptor 2 through a pipe: a thread passes every line to the real stderr except Ray's native log
    lines, which go to the log file. Python's own writes (sys.stderr) take the same path, in order."""
    real = os.dup(2)
    TERMINAL["stream"] = os.fdopen(os.dup(real), "w", buffering=1, encoding="utf-8", errors="replace") if os.isatty(real) else None
    read_end, write_end = os.pipe()
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    out = os.fdopen(real, "w", buffering=1, encoding="utf-8", errors="replace")
    keep = open(log_file, "a", encoding="utf-8") if log_file else None  # noqa: SIM115 — open for the process's life

    def pump() -> None:
        with os.fdopen(read_end, "r", encoding="utf-8", errors="replace") as pipe:
            for line in pipe:
                if NATIVE_LOG_LINE.match(line) or RAY_PROCESS_LINE.match(line):
                    if keep:
                        keep.write(line)
                        keep.flush()
                else:
                    out.write(line)
                    out.flush()

    thread = threading.Thread(target=pump, name="quiet-stderr", daemon=True)
    thread.start()

    def restore() -> None:  # at exit: the real stderr back, and what is still in the pipe written out
        sys.stderr.flush()
        os.dup2(out.fileno(), 2)
        thread.join(timeout=2)

    atexit.register(restore)


class _Bar:
    """A rich live progress bar for a terminal (the quiet console's display of a teacher stage)."""

    def __init__(self, stage: str, total: int, terminal):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self.progress = RichProgress(TextColumn(f"teacher {stage}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"), transient=False,
                                     console=Console(file=terminal, force_terminal=True))  # fmt: skip
        self.task = self.progress.add_task(stage, total=total, info="")
        self.progress.start()

    def update(self, done: int, info: str) -> None:
        self.progress.update(self.task, completed=done, info=info.split(", ", 2)[-1][:90])

    def close(self) -> None:
        self.progress.stop()


def _live_bar(stage: str, total: int) -> _Bar | None:
    """The display a teacher stage reports to (asclepius.progress): a live bar on a terminal under the quiet console."""
    from asclepius.cluster import QUIET

    if not (QUIET["on"] and TERMINAL["stream"] is not None):
        return None
    return _Bar(stage, total, TERMINAL["stream"])


def setup_console(run_dir: str | None, verbose: bool = False) -> Console:
    """Logging for a command: quiet console (or everything with `verbose`), and the full log in <run>/logs/."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    from asclepius import progress

    progress.set_display(_live_bar)  # teacher stages report progress to it, without importing the console
    console = logging.StreamHandler(sys.stderr)
    if verbose:
        console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        console.setFormatter(logging.Formatter("%(message)s"))
        console.addFilter(_Quiet())
    root.addHandler(console)
    log_file = None
    if run_dir:
        import hashlib

        from asclepius.storage import cache_root, is_remote, make_private_dir

        if is_remote(run_dir):  # a log file needs appends: written locally (one per driver), uploaded at every stage's end
            logs = make_private_dir(os.path.join(cache_root(), "logs", hashlib.sha256(run_dir.encode()).hexdigest()[:16]))
            name = f"asclepius-{time.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname()}-{os.getpid()}.log"
        else:
            root_dir = os.path.abspath(os.path.expanduser(run_dir))
            os.makedirs(root_dir, mode=0o700, exist_ok=True)
            logs = make_private_dir(os.path.join(root_dir, "logs"))
            name = "asclepius.log"
        log_file = os.path.join(logs, name)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file_handler)
    from asclepius.cluster import QUIET, WORKER_LOGS

    QUIET["on"] = not verbose
    WORKER_LOGS["route"] = route_worker_logs
    LOG["file"] = log_file
    if not verbose:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        # Ray Data sets up its loggers (a console handler of its own) when first imported: import it now, so that
        # what it set up is what is undone here, not re-added by a later import in the middle of a stage.
        import ray.data  # noqa: F401

        for name in ("ray", "ray.data", "ray.serve", "ray.train", "ray.tune"):
            lg = logging.getLogger(name)
            for handler in list(lg.handlers):
                if "File" not in type(handler).__name__:  # Ray's own log files (ray-data.log, ...) stay
                    lg.removeHandler(handler)
            lg.propagate = True  # to our log file; the quiet console filter keeps them off the screen
        if os.environ.get("ASCLEPIUS_QUIET_NATIVE", "1") == "1":
            _route_native_stderr(log_file)
    if log_file:
        shown(log, "logs: %s", log_file)
    return Console(run_dir, verbose, log_file)
