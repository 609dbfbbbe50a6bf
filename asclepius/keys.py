"""Every key file a config names, checked before the first stage, where it will be read.

A key file the teacher's actors cannot read fails the first teacher stage; a serving key the driver cannot read fails
the serve stage — after hours of training. So before any stage, every key file the selected stages will read
(teacher, serving, judge, evaluated endpoints) is opened by the driver and by a Ray task placed exactly as the
actors that read it are (`teacher.actor_resources`), running as the Ray worker user of that node (uid 1000 in Ray's
images): it must exist, be a file, be readable, and not be empty. On a cluster that scales from zero the task waits
for a node of that type (`ray.preflight_timeout_s`); the first teacher stage would start the same node anyway.
A key's content never leaves the process that reads it: the check returns what is wrong, never what is there.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from asclepius.config import Config, TeacherConfig
from asclepius.stages import TEACHER_STAGES

log = logging.getLogger("asclepius")
DRIVER = "the driver"
ACTOR_CPUS = 0.1  # what a request-sending actor asks for (asclepius.teacher.ray_data)


class KeyFileProblem(RuntimeError):
    """A key file the run needs cannot be read where it will be read."""


@dataclass(frozen=True)
class KeyFile:
    field: str  # e.g. "teacher.api_key_file"
    path: str
    readers: tuple[tuple[str, ...], ...] = field(default=())  # resource shapes of the actors reading it (sorted items)

    def shapes(self) -> list[dict[str, float]]:
        return [dict(s) for s in self.readers]


def _actor_shape(tc: TeacherConfig) -> tuple:
    return tuple(sorted({"CPU": ACTOR_CPUS, **tc.actor_resources}.items()))


def key_files(cfg: Config, stages: list[str]) -> list[KeyFile]:
    """The key files the selected stages will read, and the actor shapes that read them (the driver reads them all)."""
    found: dict[tuple[str, str], set] = {}

    def add(where: str, tc_or_path, shape: tuple | None) -> None:
        path = tc_or_path if isinstance(tc_or_path, str) else tc_or_path.api_key_file
        if path:
            found.setdefault((where, path), set()).update([shape] if shape else [])

    calls_teacher = any(s in TEACHER_STAGES for s in stages)
    if calls_teacher and cfg.teacher is not None and not cfg.teacher_from_serve:
        add("teacher.api_key_file", cfg.teacher, _actor_shape(cfg.teacher) if cfg.teacher.mode == "online" else None)
    if cfg.serve is not None and cfg.serve.api_key_file:
        # the driver builds the Serve app with it; actors send it when they call the app: the teacher's (teacher_from_serve)
        # and the evaluation's for `served` candidates (asclepius.evaluate.stage.served_endpoint: no actor_resources)
        if calls_teacher and cfg.teacher_from_serve:
            add("serve.api_key_file", cfg.serve.api_key_file, _actor_shape(cfg.teacher or TeacherConfig(provider="openai_compatible", base_url="http://x")))
        if "evaluate" in stages and cfg.evaluate is not None and any(c.served for c in cfg.evaluate.candidates):
            add("serve.api_key_file", cfg.serve.api_key_file, (("CPU", ACTOR_CPUS),))
        if "serve" in stages or "evaluate" in stages:
            add("serve.api_key_file", cfg.serve.api_key_file, None)
    if "evaluate" in stages and cfg.evaluate is not None:
        if cfg.evaluate.judge.endpoint is not None:
            add("evaluate.judge.endpoint.api_key_file", cfg.evaluate.judge.endpoint, _actor_shape(cfg.evaluate.judge.endpoint))
        for i, c in enumerate(cfg.evaluate.candidates):
            if c.endpoint is not None:
                add(f"evaluate.candidates.{i}.endpoint.api_key_file", c.endpoint, _actor_shape(c.endpoint))
    return [KeyFile(where, path, tuple(sorted(shapes))) for (where, path), shapes in found.items()]


def problem_with(path: str) -> str | None:
    """What is wrong with reading a key file here (as this process's user), or None. Never its content."""
    path = os.path.expanduser(path)
    try:
        with open(path, "rb") as f:
            empty = not f.read().strip()
    except FileNotFoundError:
        return "no such file"
    except IsADirectoryError:
        return "a directory, not a file"
    except PermissionError:
        try:
            st = os.stat(path)
        except PermissionError:
            return f"not readable by uid {os.getuid()} (a folder on its path is closed to this user)"
        return f"not readable by uid {os.getuid()} (mode {oct(st.st_mode & 0o777)}, owner uid {st.st_uid} gid {st.st_gid})"
    except OSError as err:
        return f"{type(err).__name__}"
    return "empty" if empty else None


def _check_on_node(paths: list[str]) -> dict:
    import socket

    return {"node": socket.gethostname(), "problems": {p: problem_with(p) for p in paths}}


def check_keys(cfg: Config, stages: list[str]) -> list[KeyFile]:
    """Raise KeyFileProblem naming each key file that the driver, or a node where its readers will run, cannot read."""
    keys = key_files(cfg, stages)
    report = [f"  {k.field}: {k.path} on {DRIVER}: {p}" for k in keys if (p := problem_with(k.path))]
    by_shape: dict[tuple, list[KeyFile]] = {}
    for k in keys:
        for shape in k.readers:
            by_shape.setdefault(shape, []).append(k)
    if by_shape and not report:
        import ray

        refs = {}
        for shape, ks in by_shape.items():
            resources = dict(shape)
            task = ray.remote(_check_on_node).options(num_cpus=resources.pop("CPU", 0), resources=resources or None)
            refs[shape] = task.remote(sorted({k.path for k in ks}))
        for shape, ref in refs.items():
            readers = _fmt(dict(shape))
            try:
                result = ray.get(ref, timeout=cfg.ray.preflight_timeout_s)
            except ray.exceptions.GetTimeoutError:
                ray.cancel(ref, force=True)
                report.append(f"  no node for the actors that read {', '.join(k.field for k in by_shape[shape])} ({readers}) came "
                              f"up within ray.preflight_timeout_s ({cfg.ray.preflight_timeout_s:.0f} s) to check them")  # fmt: skip
                continue
            for k in by_shape[shape]:
                if result["problems"].get(k.path):
                    report.append(f"  {k.field}: {k.path} on node {result['node']} (where actors {readers} run): {result['problems'][k.path]}")
    if report:
        raise KeyFileProblem(
            "key files the run needs cannot be read where they will be read, so a later stage would fail:\n" + "\n".join(report)
            + "\n  every node that reads a key needs the file, readable by the Ray user (uid 1000 in Ray's images): cluster.yaml's "
            "file_mounts, or the KubeRay pods' secret volume (defaultMode 0440 with securityContext.fsGroup 100)"
        )
    if keys:
        log.info("keys: %s readable where they are read", ", ".join(sorted({k.field for k in keys})))
    return keys


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {int(v) if float(v).is_integer() else v}" for k, v in sorted(resources.items())) + "}"
