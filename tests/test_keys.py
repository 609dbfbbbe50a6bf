"""Key files checked before the first stage (asclepius/keys.py): where they are read, as the user that reads them."""

import os
import subprocess
import sys

import pytest

from asclepius.config import config_from_dict
from asclepius.keys import KeyFileProblem, check_keys, key_files, problem_with
from asclepius.stages import STAGE_ORDER

BASE = {"notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]}}


def cfg_with(tmp_path, **sections):
    return config_from_dict({"run_dir": str(tmp_path / "run"), **BASE, **sections})


def test_which_key_files_which_stages_read_and_where(tmp_path):
    cfg = cfg_with(
        tmp_path,
        teacher={"provider": "azure", "azure_endpoint": "https://x.openai.azure.com", "azure_deployment": "d", "api_key_file": "/k/teacher",
                 "actor_resources": {"teacher_node": 1}},
        serve={"models": [{"name": "m", "source": "tiny"}], "api_key_file": "/k/serve"},
        evaluate={"candidates": [{"name": "gpt", "endpoint": {"provider": "openai", "api_key_file": "/k/openai"}}],
                  "judge": {"endpoint": {"provider": "openai", "api_key_file": "/k/judge"}}},
    )  # fmt: skip
    keys = {k.field: k for k in key_files(cfg, STAGE_ORDER)}
    assert set(keys) == {"teacher.api_key_file", "serve.api_key_file", "evaluate.judge.endpoint.api_key_file",
                         "evaluate.candidates.0.endpoint.api_key_file"}  # fmt: skip
    assert keys["teacher.api_key_file"].shapes() == [{"CPU": 0.1, "teacher_node": 1}]  # the teacher's actors read it there
    assert keys["serve.api_key_file"].shapes() == []  # the driver builds the app (no teacher_from_serve)
    assert {k.field for k in key_files(cfg, ["notes", "pretrain"])} == set()  # stages that read no key
    assert {k.field for k in key_files(cfg, ["serve"])} == {"serve.api_key_file"}
    served_teacher = cfg_with(tmp_path, teacher_from_serve="m", serve={"models": [{"name": "m", "source": "tiny"}], "api_key_file": "/k/serve"})
    (key,) = key_files(served_teacher, ["synthesize"])
    assert key.field == "serve.api_key_file" and key.shapes() == [{"CPU": 0.1}]  # the actors send the app's own key


def test_what_is_wrong_with_a_key_file_never_what_it_holds(tmp_path):
    good, empty = tmp_path / "good", tmp_path / "empty"
    good.write_text("sk-secret-value\n")
    empty.write_text("  \n")
    assert problem_with(str(good)) is None
    assert problem_with(str(empty)) == "empty"
    assert problem_with(str(tmp_path / "missing")) == "no such file"
    assert problem_with(str(tmp_path)) == "a directory, not a file"


UNREADABLE = """
import os, sys
from asclepius.keys import problem_with   # imported first: this Python's own files may be closed to uid 1000
os.setgroups([]); os.setgid(100); os.setuid(1000)   # the Ray images' user: uid 1000, group users (100)
print(problem_with(sys.argv[1]))
"""


def test_a_key_only_root_can_read_is_refused_for_the_ray_user():
    import shutil
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="keys", dir="/tmp"))  # reachable by every user, like /home/ray/.asclepius
    folder.chmod(0o755)
    key = folder / "teacher_key"
    key.write_text("sk-secret-value")
    key.chmod(0o600)  # root's own file, as a root-run `kubectl cp` or a secret volume with defaultMode 0400 leaves it
    try:
        _refused_for_the_ray_user(key)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _refused_for_the_ray_user(key) -> None:
    if os.getuid() == 0:  # as the container's user, not as the test's root
        out = subprocess.run([sys.executable, "-c", UNREADABLE, str(key)], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().startswith("not readable by uid 1000 (mode 0o600, owner uid 0"), out.stdout
        assert "sk-secret" not in out.stdout + out.stderr
    else:  # the suite runs as a user: a file only another user could read is the same case
        key.chmod(0o000)
        assert problem_with(str(key)).startswith(f"not readable by uid {os.getuid()} (mode 0o0")


@pytest.mark.ray
def test_the_check_runs_where_the_readers_run_and_names_what_is_wrong(ray_local, tmp_path):
    key = tmp_path / "teacher_key"
    key.write_text("sk-test")
    teacher = {"provider": "openai_compatible", "base_url": "http://127.0.0.1:9/v1", "api_key_file": str(key)}
    cfg = cfg_with(tmp_path, teacher=teacher)
    assert [k.field for k in check_keys(cfg, ["synthesize"])] == ["teacher.api_key_file"]
    key.write_text("")
    with pytest.raises(KeyFileProblem, match=r"teacher\.api_key_file: \S+teacher_key on the driver: empty"):
        check_keys(cfg, ["synthesize"])
    # readers on a node type the cluster never has: the check says so within its timeout instead of failing hours later
    key.write_text("sk-test")
    placed = cfg_with(tmp_path, teacher={**teacher, "actor_resources": {"no_such_node": 1}}, ray={"preflight_timeout_s": 3})
    with pytest.raises(KeyFileProblem, match=r"no node for the actors that read teacher\.api_key_file \(\{CPU: 0\.1, no_such_node: 1\}\)"):
        check_keys(placed, ["synthesize"])
