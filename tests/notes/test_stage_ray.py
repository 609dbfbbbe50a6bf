"""The notes stage end to end on the session's local Ray instance."""

import csv
import json
import logging

import pyarrow.parquet as pq
import pytest

from asclepius.config import config_from_dict
from asclepius.notes.readers import NotesInputError
from asclepius.notes.stage import read_notes, run_notes_stage
from asclepius.run import RunDir
from asclepius.testing import published

pytestmark = pytest.mark.ray


def adversarial_csv(path):
    header = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CHARTTIME", "STORETIME", "CATEGORY", "DESCRIPTION", "CGID", "ISERROR", "TEXT"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerow([1, 1, 1, "", "", "", "Discharge summary", "", "", "", "SECRET-NOTE-TEXT-1 multi\nline [**First Name 9**]"])
        f.write('2,1,1,"","Discharge summary","too few fields"\n')
        w.writerow([3, 1, 1, "", "", "", "Discharge summary", "", "", "", "BADBYTE note"])
        w.writerow([4, 1, 1, "", "", "", "Discharge summary", "", "", "", ""])
    path.write_bytes(path.read_bytes().replace(b"BADBYTE", b"\xff\xfe"))
    return path


def test_notes_stage_end_to_end(ray_local, tmp_path, caplog):
    data = {
        "run_dir": str(tmp_path / "run"),
        "notes": {
            "sources": [
                {"kind": "mimic3", "path": "sample:mimic3"},
                {"kind": "mimic4", "path": "sample:mimic4"},
                {"kind": "pmc", "path": "sample:pmc"},
                {"kind": "mimic3", "name": "adversarial", "path": str(adversarial_csv(tmp_path / "adv.csv"))},
            ]
        },
    }
    cfg = config_from_dict(data)
    run = RunDir.open(cfg.run_dir)
    with caplog.at_level(logging.INFO):
        entry = run_notes_stage(cfg, run)

    notes = read_notes(run).to_pandas()
    assert sorted(notes.note_id) == sorted(
        ["mimic3-90001", "mimic3-90004", "mimic3-90006", "mimic3-90009", "mimic3-90010", "mimic3-90012"]
        + ["10000032-DS-21", "10000084-DS-17"]
        + [f"pmc-90000{i:02d}-1" for i in range(1, 13)]
        + ["adversarial-1", "adversarial-3"]
    )
    assert notes.note_id.is_unique
    adv = notes.set_index("note_id")
    assert adv.loc["adversarial-1", "text"] == "SECRET-NOTE-TEXT-1 multi\nline  [Name]"
    assert adv.loc["adversarial-3", "text"] == "\ufffd\ufffd note" and bool(adv.loc["adversarial-3", "utf8_repaired"])
    assert set(notes.source) == {"mimic3", "mimic4", "pmc", "adversarial"}

    # counts: per source and in total, every row accounted for
    assert entry["sources"]["0:mimic3"]["kept"] == 6 and entry["sources"]["0:mimic3"]["dropped:eval_set"] == 1
    adv_counts = entry["sources"]["3:adversarial"]
    assert (adv_counts["read"], adv_counts["kept"], adv_counts["dropped:malformed_row"], adv_counts["dropped:empty_text"]) == (4, 2, 1, 1)
    assert entry["totals"]["read"] == 12 + 3 + 12 + 4 and entry["totals"]["kept"] == 22
    assert entry["malformed_rows"]["count"] == 1 and entry["malformed_rows"]["first"][0]["file"].endswith("adv.csv")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["notes"]["totals"] == entry["totals"] and manifest["stages"]["notes"]["status"] == "complete"
    assert not (tmp_path / "run" / "notes" / "_tasks").exists()
    # placeholder labels come from the notes: in the private run directory, never in the manifest or a log
    assert manifest["stages"]["notes"]["deid"]["unknown_types"] == 1
    assert json.loads(published(tmp_path / "run", "notes", "_deid_unknown_types.json").read_text())
    assert "Ward Secretary" not in json.dumps(manifest) and "Ward Secretary" not in caplog.text

    # no note text in any log line
    assert "SECRET-NOTE-TEXT" not in caplog.text and "fields missing" not in caplog.text

    # rerun: skipped; changed config: runs again and replaces the output (no duplicates)
    assert run_notes_stage(cfg, run)["skipped"] is True
    cfg2 = config_from_dict(data, ["notes.sources.3.keep_categories=[Nursing]"])
    entry2 = run_notes_stage(cfg2, run)
    assert "skipped" not in entry2 and entry2["sources"]["3:adversarial"]["kept"] == 0
    assert len(read_notes(run)) == 20
    files = list(published(tmp_path / "run", "notes").glob("*.parquet"))
    assert sum(pq.read_metadata(f).num_rows for f in files) == 20


def test_bad_input_fails_before_any_work(ray_local, tmp_path):
    cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "notes": {"sources": [{"kind": "pmc", "path": str(tmp_path / "none.csv")}]}})
    with pytest.raises(NotesInputError, match=r"notes\.sources\.0\.path"):
        run_notes_stage(cfg, RunDir.open(cfg.run_dir))
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_a_large_source_is_written_and_split_in_bounded_pieces(ray_local, tmp_path, monkeypatch):
    """Later stages read the notes a row group at a time, so a notes file is written in row groups of
    ROW_GROUP_ROWS (Parquet's default is one group of up to 1M rows); the split writes its held-out notes in parts,
    each in note id order, together exactly the notes its rule holds out."""
    from asclepius.generate import split as split_module
    from asclepius.notes.stage import ROW_GROUP_ROWS
    from asclepius.run import run_stage

    path = tmp_path / "many.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "body"])
        for i in range(2500):
            w.writerow([f"n{(i * 7919) % 2500:05d}", f"Admission {i}. Pt w/ CHF, diuresed w/ IV lasix, weaned to RA."])  # ids out of order
    cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "split": {"eval_fraction": 0.3},
                            "notes": {"sources": [{"kind": "generic", "name": "clinic", "path": str(path), "text_column": "body", "id_column": "id"}]}})  # fmt: skip
    run = RunDir.open(cfg.run_dir)
    run_notes_stage(cfg, run)
    groups = [meta.row_group(g).num_rows for f in published(tmp_path / "run", "notes").glob("*.parquet")
              for meta in [pq.read_metadata(f)] for g in range(meta.num_row_groups)]  # fmt: skip
    assert sum(groups) == 2500 and max(groups) <= ROW_GROUP_ROWS and len(groups) >= 3

    monkeypatch.setattr(split_module, "PART_ROWS", 200)
    entry = run_stage(split_module.STAGE, cfg, run)
    parts = sorted(published(tmp_path / "run", "eval_notes").glob("*.parquet"))
    tables = [pq.read_table(p).to_pandas() for p in parts]
    notes = read_notes(run).to_pandas()
    expected = set(notes.note_id[split_module.held_out_mask(notes.note_id, cfg)])
    assert len(parts) >= 3 and all(t.note_id.is_monotonic_increasing for t in tables)
    assert set().union(*(set(t.note_id) for t in tables)) == expected and sum(map(len, tables)) == len(expected)
    assert entry["counts"] == {"read": 2500, "held_out_for_eval": len(expected), "kept": 2500 - len(expected)}
