"""The stage contract (asclepius/run.py) on toy stages, without Ray: skip, rerun, resume, publish, read errors."""

import json
import os
import stat

import pandas as pd
import pytest

from asclepius.config import config_from_dict
from asclepius.run import RunDir, Stage, StageInputError, open_private, run_stage, stage_status

BASE = {"notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]}}


def cfg_for(tmp_path, *overrides):
    return config_from_dict({"run_dir": str(tmp_path / "run"), **BASE}, list(overrides))


class Work:
    """A stage's work that writes one table and counts its calls; it can be told to crash after writing."""

    def __init__(self, output, crash=False):
        self.output, self.crash, self.calls, self.seen = output, crash, [], []

    def __call__(self, ctx):
        self.calls.append((ctx.attempt, ctx.resumed))
        self.seen.append(ctx.run.listing(self.output))  # what readers see while the stage works
        ctx.run.write_frame(ctx.output(self.output), pd.DataFrame({"x": [len(self.calls)]}), "t.parquet")
        if self.crash:
            raise RuntimeError("killed mid-way")
        return {"counts": {"kept": 1}}


def published(run, name):
    """What a reader sees of an output: the version the manifest points to."""
    return pd.read_parquet(run.output_path(name))


def stages(up_work, down_work):
    up = Stage("up", up_work, sections=("split",), outputs=("up_out",))
    down = Stage("down", down_work, sections=("questions",), upstream=("up",), outputs=("down_out",))
    return up, down


def test_skip_rerun_and_the_reasons(tmp_path):
    up, down = stages(Work("up_out"), Work("down_out"))
    cfg = cfg_for(tmp_path)
    run = RunDir.open(cfg.run_dir)
    assert not run_stage(up, cfg, run).get("skipped") and not run_stage(down, cfg, run).get("skipped")
    assert run_stage(up, cfg, run)["skipped"] and run_stage(down, cfg, run)["skipped"]
    assert published(run, "up_out").x.tolist() == [1]

    # a change in the downstream stage's section reruns it alone
    cfg2 = cfg_for(tmp_path, "questions.temperature=0.2")
    assert stage_status(up, cfg2, run).up_to_date
    status = stage_status(down, cfg2, run)
    assert status.state == "stale" and status.reasons == ["config changed (questions)"]
    # a change upstream reruns the upstream stage, and then (its output is new) the downstream one
    cfg3 = cfg_for(tmp_path, "split.eval_fraction=0.5")
    assert stage_status(up, cfg3, run).reasons == ["config changed (split)"]
    assert stage_status(down, cfg3, run).up_to_date  # nothing upstream has changed yet
    run_stage(up, cfg3, run)
    assert stage_status(down, cfg3, run).reasons == ["upstream up changed"]
    assert published(run, "up_out").x.tolist() == [2]  # replaced, never appended
    assert len(os.listdir(tmp_path / "run" / "up_out")) == 1  # the old version is gone


def test_force_reruns_in_a_new_attempt(tmp_path):
    work = Work("up_out")
    up, _ = stages(work, Work("down_out"))
    cfg = cfg_for(tmp_path)
    run = RunDir.open(cfg.run_dir)
    run_stage(up, cfg, run)
    entry = run_stage(up, cfg, run, force=True)
    assert len(work.calls) == 2 and work.calls[0][0] != work.calls[1][0] and not entry["resumed"]


def test_a_crash_between_running_and_complete_is_redone_and_old_outputs_stay_readable(tmp_path):
    work = Work("up_out")
    up, _ = stages(work, Work("down_out"))
    cfg = cfg_for(tmp_path)
    run = RunDir.open(cfg.run_dir)
    run_stage(up, cfg, run)
    listing = run.listing("up_out")

    # the config changes and the stage is killed mid-way: the manifest says running; the old output is intact
    changed = cfg_for(tmp_path, "split.seed=3")
    crashing = Stage("up", Work("up_out", crash=True), sections=("split",), outputs=("up_out",))
    with pytest.raises(RuntimeError):
        run_stage(crashing, changed, run)
    assert run.stage_entry("up")["status"] == "running"
    assert run.listing("up_out") == listing and published(run, "up_out").x.tolist() == [1]

    # reverting the config must not trust the old `complete`: the stage ran (and was cut off) since
    status = stage_status(up, cfg, run)
    assert status.state == "running" and "interrupted" in status.reasons[0]
    run_stage(up, cfg, run)
    assert len(work.calls) == 2 and run.stage_entry("up")["status"] == "complete"


def test_a_cut_off_attempt_resumes_with_the_same_config_only(tmp_path):
    cfg = cfg_for(tmp_path)
    run = RunDir.open(cfg.run_dir)
    crashing = Work("up_out", crash=True)
    up = Stage("up", crashing, sections=("split",), outputs=("up_out",))
    with pytest.raises(RuntimeError):
        run_stage(up, cfg, run)
    first_attempt = crashing.calls[0][0]
    with pytest.raises(RuntimeError):
        run_stage(up, cfg, run)
    assert crashing.calls[1] == (first_attempt, True)  # same config and inputs: the same attempt, resumed
    with pytest.raises(RuntimeError):
        run_stage(up, cfg_for(tmp_path, "split.seed=9"), run)
    assert crashing.calls[2][0] != first_attempt and crashing.calls[2][1] is False  # another config: a new attempt
    with pytest.raises(RuntimeError):
        run_stage(up, cfg_for(tmp_path, "split.seed=9"), run, force=True)
    assert crashing.calls[3][1] is False  # --force never resumes


def test_outputs_that_changed_since_complete_are_not_trusted(tmp_path):
    up, _ = stages(Work("up_out"), Work("down_out"))
    cfg = cfg_for(tmp_path)
    run = RunDir.open(cfg.run_dir)
    run_stage(up, cfg, run)
    os.remove(os.path.join(run.output_path("up_out"), "t.parquet"))
    assert stage_status(up, cfg, run).reasons == ["output up_out/ differs from what was recorded"]
    assert not run_stage(up, cfg, run).get("skipped")


def test_publish_is_by_pointer_readers_never_see_a_mix(tmp_path):
    """A reader that resolved the output before the stage completes reads the old version whole; the switch is the
    manifest's one write; nothing of the new version is visible before it, nothing of the old one after."""
    cfg = cfg_for(tmp_path)
    run = RunDir.open(cfg.run_dir)
    seen_during = {}

    def writes_two_files(ctx):
        ctx.run.write_frame(ctx.output("up_out"), pd.DataFrame({"x": [ctx.attempt]}), "a.parquet")
        seen_during[ctx.attempt] = (ctx.run.output_path("up_out"), ctx.run.listing("up_out"))  # between the two writes
        ctx.run.write_frame(ctx.output("up_out"), pd.DataFrame({"x": [ctx.attempt]}), "b.parquet")
        return {}

    up = Stage("up", writes_two_files, sections=("split",), outputs=("up_out",))
    first = run_stage(up, cfg, run)
    old_path = run.output_path("up_out")
    assert set(published(run, "up_out").x) == {first["attempt"]}
    second = run_stage(up, cfg, run, force=True)
    during_path, during_listing = seen_during[second["attempt"]]
    assert during_path == old_path and set(during_listing) == {"a.parquet", "b.parquet"}  # the old version, whole
    assert set(published(run, "up_out").x) == {second["attempt"]}  # after the switch: only the new one
    assert not os.path.exists(old_path)  # old versions are deleted after the switch
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["published"] == {"up_out": "v-" + second["attempt"]}
    # a version left by a cut-off attempt is never read, and the next attempt clears it
    crashing = Stage("up", Work("up_out", crash=True), sections=("split",), outputs=("up_out",))
    with pytest.raises(RuntimeError):
        run_stage(crashing, cfg_for(tmp_path, "split.seed=4"), run)
    assert len(os.listdir(tmp_path / "run" / "up_out")) == 2 and set(published(run, "up_out").x) == {second["attempt"]}
    run_stage(up, cfg_for(tmp_path, "split.seed=5"), run)
    assert len(os.listdir(tmp_path / "run" / "up_out")) == 1


def test_a_corrupt_table_stops_the_reader_naming_the_file(tmp_path):
    run = RunDir.open(str(tmp_path / "run"))
    (tmp_path / "run" / "notes").mkdir()
    pd.DataFrame({"note_id": ["a"]}).to_parquet(tmp_path / "run" / "notes" / "good.parquet")
    (tmp_path / "run" / "notes" / "bad.parquet").write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(StageInputError, match=r"notes/bad\.parquet"):
        run.read_frame("notes")
    # only "not there" means empty
    assert run.read_frame("synthetic_notes", ["note_id"]).empty
    (tmp_path / "run" / "notes" / "bad.parquet").unlink()
    (tmp_path / "run" / "notes" / "cut.parquet").write_bytes((tmp_path / "run" / "notes" / "good.parquet").read_bytes()[:40])
    with pytest.raises(StageInputError, match="cut.parquet"):
        run.read_frame("notes")


def test_run_directory_and_private_files_are_owner_only(tmp_path):
    os.umask(0o022)
    run = RunDir.open(str(tmp_path / "run"))
    assert stat.S_IMODE(os.stat(run.root).st_mode) == 0o700
    with open_private(str(tmp_path / "run" / "j.jsonl")) as f:
        f.write("{}\n")
    assert stat.S_IMODE(os.stat(tmp_path / "run" / "j.jsonl").st_mode) == 0o600


def test_manifest_entry_records_what_the_contract_needs(tmp_path):
    up, down = stages(Work("up_out"), Work("down_out"))
    cfg = cfg_for(tmp_path)
    run = RunDir.open(cfg.run_dir)
    run_stage(up, cfg, run)
    run_stage(down, cfg, run)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    assert manifest["up"]["outputs"] == {"up_out": {"t.parquet": os.path.getsize(os.path.join(run.output_path("up_out"), "t.parquet"))}}
    assert manifest["down"]["inputs"] == {"up": manifest["up"]["output_id"]}
    assert {"config_hash", "config_parts", "attempt", "started_at", "counts"} <= set(manifest["up"])


def test_declared_dependencies_of_the_pipeline_stages():
    from asclepius.pipeline import pipeline_stages

    def hashes(*overrides):
        cfg = config_from_dict({"run_dir": "/tmp/x", **BASE, "model": {"base": "tiny"},
                                "teacher": {"provider": "openai_compatible", "base_url": "http://h/v1"}}, list(overrides))  # fmt: skip
        return {s.name: s.config_hash(cfg) for s in pipeline_stages(cfg)}

    base = hashes()
    changed = lambda *o: {k for k, v in hashes(*o).items() if base[k] != v}  # noqa: E731
    assert changed("seed=1") == {"synthesize", "questions", "answers"}
    assert changed("questions.similarity_threshold=0.5") == {"questions"}
    assert changed("questions.temperature=0.2") == {"questions"}
    assert changed("split.eval_fraction=0.2") == {"split"}
    assert changed("synthesize.case_report_sources=[x]") == {"synthesize", "split", "questions", "pretrain"}
    assert changed("finetune.lr=1e-4") == {"finetune"}
    assert changed("teacher.model=other") == {"synthesize", "questions", "answers"}
    assert changed("teacher.requests_per_minute=10") == set()  # how fast is not what
    by_name = {s.name: s for s in pipeline_stages(config_from_dict({"run_dir": "/tmp/x", **BASE, "model": {"base": "tiny"}}))}
    assert "questions" not in by_name["pretrain"].upstream and "split" in by_name["pretrain"].upstream
