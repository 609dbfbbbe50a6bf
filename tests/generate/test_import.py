"""Importing released instruction data (Asclepius-R's MIMIC-III file, the public synthetic set) — no teacher."""

import json

import pandas as pd
import pytest

from asclepius.config import config_from_dict
from asclepius.decontamination import ContaminationError, check_decontamination
from asclepius.generate.importing import STAGE as IMPORT
from asclepius.generate.split import STAGE as SPLIT
from asclepius.notes.readers import read_source_locally
from asclepius.run import RunDir, run_stage
from asclepius.testing import published


def run_with_notes(tmp_path, **extra):
    cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "notes": {"sources": [{"kind": "mimic3", "path": "sample:mimic3"}]}, **extra})
    run = RunDir.open(cfg.run_dir)
    kept, *_ = read_source_locally(cfg.notes.sources[0], cfg.notes)
    (tmp_path / "run" / "notes").mkdir(parents=True, exist_ok=True)
    kept.to_pandas().to_parquet(tmp_path / "run" / "notes" / "part.parquet")
    run.record_stage("notes", {"status": "complete"})
    run_stage(SPLIT, cfg, run)  # the held-out notes must be known before any instruction data is published
    return cfg, run


def test_asclepius_r_joined_with_noteevents_by_row_id(tmp_path):
    # PhysioNet Asclepius-R's mimiciii_discharge.csv columns: ROW_ID, Question, Answer, Task
    pd.DataFrame(
        {
            "ROW_ID": [90001, 90004, 90004, 555555, 917067],  # 555555: no such note; 917067: an evaluation note
            "Question": ["What antibiotic was given?", "Which vessels were grafted?", "Summarize the course.", "Q?", "Q2?"],
            "Answer": ["Levofloxacin 750 mg daily.", "LIMA-LAD, SVG-OM, SVG-PDA.", "CABG x3, then AF.", "A.", "B."],
            "Task": ["Question Answering", "Named Entity Recognition", "Summarization", "Summarization", "Paraphrasing"],
        }
    ).to_csv(tmp_path / "mimiciii_discharge.csv", index=False)
    cfg, run = run_with_notes(tmp_path, instructions_import={"kind": "asclepius_r", "path": str(tmp_path / "mimiciii_discharge.csv")})
    entry = run_stage(IMPORT, cfg, run)
    ins = pd.read_parquet(tmp_path / "run" / "instructions")
    assert list(ins.note_id) == ["mimic3-90001", "mimic3-90004", "mimic3-90004"]
    assert ins.note.iloc[0].startswith("Admission Date:   2150-3-9") and "[**" not in ins.note.iloc[0]  # de-id tags as the notes stage
    assert list(ins.task) == ["Question Answering", "Named Entity Recognition", "Summarization"]
    assert entry["counts"] == {"read": 5, "dropped:no_note_for_row_id": 2, "kept": 3}  # counted, not silently lost
    assert json.loads(published(tmp_path / "run", "export", "instructions.json").read_text())[1]["answer"] == "LIMA-LAD, SVG-OM, SVG-PDA."


def test_public_synthetic_set(tmp_path):
    pd.DataFrame(
        {
            "patient_id": [1, 2, 3],
            "note": ["Discharge summary one.", "Discharge summary two.", "  "],
            "question": ["What was done?", "Any meds?", "Empty note?"],
            "answer": ["Surgery.", "Aspirin.", "Nothing."],
            "task": ["Summarization", "Named Entity Recognition", "Question Answering"],
        }
    ).to_parquet(tmp_path / "synthetic.parquet")
    cfg, run = run_with_notes(tmp_path, instructions_import={"kind": "synthetic", "path": str(tmp_path / "synthetic.parquet")})
    entry = run_stage(IMPORT, cfg, run)
    ins = pd.read_parquet(tmp_path / "run" / "instructions")
    assert list(ins.note_id) == ["synthetic-1", "synthetic-2"] and entry["counts"]["dropped:empty_field"] == 1
    assert list(ins.columns[:6]) == ["note", "question", "answer", "task", "note_id", "source"]


def test_missing_columns_are_named(tmp_path):
    pd.DataFrame({"ROW_ID": [1], "Question": ["q"]}).to_csv(tmp_path / "bad.csv", index=False)
    cfg, run = run_with_notes(tmp_path, instructions_import={"kind": "asclepius_r", "path": str(tmp_path / "bad.csv")})
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['Answer', 'Task'\]"):
        run_stage(IMPORT, cfg, run)


def test_decontamination_catches_ids_and_texts(tmp_path):
    cfg, run = run_with_notes(tmp_path)
    for part in published(tmp_path / "run", "eval_notes").glob("*.parquet"):  # the split's parts
        part.unlink()
    pd.DataFrame({"note_id": ["e1"], "source": ["mimic3"], "text": ["held out"], "text_sha1": ["abc"], "credentialed": [True]}).to_parquet(published(tmp_path / "run", "eval_notes", "e.parquet"))
    clean = pd.DataFrame({"note_id": ["n1"], "note_sha1": ["def"]})
    assert check_decontamination(run, clean)["clean"]
    with pytest.raises(ContaminationError, match="1 held-out note ids"):
        check_decontamination(run, pd.DataFrame({"note_id": ["e1"], "note_sha1": ["zzz"]}))
    with pytest.raises(ContaminationError, match="1 held-out note texts"):  # the same text under another id
        check_decontamination(run, pd.DataFrame({"note_id": ["copy"], "note_sha1": ["abc"]}))
