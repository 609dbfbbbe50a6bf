"""What reaches `ray job logs`: workers' warnings and errors and the autoscaler's node events on the console (the
driver's output is the job's log), everything else of theirs in the log file only."""

import logging

from asclepius.console import _Quiet, route_worker_logs


def test_worker_lines_warnings_on_the_console_the_rest_in_the_file(caplog):
    with caplog.at_level(logging.INFO):
        route_worker_logs({"pid": 4242, "ip": "10.0.1.7", "actor_name": "TeacherUDF", "is_err": True, "lines": [
            "INFO asclepius.teacher: 40 requests sent in 12.0 s",
            "WARNING asclepius.teacher: 429 from the provider: pausing every worker 12 s",
            "Traceback (most recent call last):",
        ]})  # fmt: skip
        route_worker_logs({"pid": "autoscaler", "ip": "10.0.1.2", "is_err": False, "lines": [
            ":event_summary:Adding 1 node(s) of type gpu_train_8xa100.", "======== Autoscaler status: 2026-12-01 ========",
        ]})  # fmt: skip
    quiet = _Quiet()
    shown = [r.getMessage() for r in caplog.records if quiet.filter(r)]
    in_file = [r.getMessage() for r in caplog.records]
    assert shown[:2] == [
        "(TeacherUDF, pid=4242, ip=10.0.1.7) WARNING asclepius.teacher: 429 from the provider: pausing every worker 12 s",
        "(TeacherUDF, pid=4242, ip=10.0.1.7) Traceback (most recent call last):",
    ]
    # the autoscaler's event, as Ray's own printer picks it (which adds a one-time tip about `ray status` with a GCS)
    assert "(autoscaler) Adding 1 node(s) of type gpu_train_8xa100." in shown[2:] and all(m.startswith("(autoscaler) ") for m in shown[2:])
    assert "(TeacherUDF, pid=4242, ip=10.0.1.7) INFO asclepius.teacher: 40 requests sent in 12.0 s" in in_file
    assert not any("Autoscaler status" in m for m in in_file)  # its periodic status dump is Ray's log file's, not ours


def test_workers_log_with_their_level_so_the_driver_can_tell():
    import subprocess
    import sys

    code = ("import logging; from asclepius.cluster import configure_worker_logging; configure_worker_logging(); "
            "logging.getLogger('asclepius.teacher').warning('429 from the provider')")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stderr.strip() == "WARNING asclepius.teacher: 429 from the provider"
