"""The readers and the cleaning of each source, without Ray, on the bundled samples and adversarial files."""

import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asclepius.config import NotesConfig
from asclepius.notes.readers import NotesInputError, read_source_locally, resolve_source

HEADER = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CHARTTIME", "STORETIME", "CATEGORY", "DESCRIPTION", "CGID", "ISERROR", "TEXT"]


def notes_cfg(*sources, **kw) -> NotesConfig:
    return NotesConfig(sources=list(sources), **kw)


def run(source: dict, **kw):
    cfg = notes_cfg(source, **kw)
    return read_source_locally(cfg.sources[0], cfg)


def assert_balanced(counts):
    dropped = sum(v for k, v in counts.items() if k.startswith("dropped:"))
    assert counts["read"] == counts["kept"] + dropped


def mimic3_row(row_id, text, category="Discharge summary", iserror=""):
    return [row_id, 1, 2, "2150-01-01", "", "", category, "Report", "", iserror, text]


def write_csv(path, rows, header=HEADER):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------- bundled samples
def test_mimic3_sample():
    kept, counts, rejected, unknown = run({"kind": "mimic3", "path": "sample:mimic3"})
    assert kept.column("note_id").to_pylist() == [
        "mimic3-90001", "mimic3-90004", "mimic3-90006", "mimic3-90009", "mimic3-90010", "mimic3-90012",
    ]  # fmt: skip
    assert counts["dropped:category"] == 4  # nursing x2, radiology, ECG
    assert counts["dropped:is_error"] == 1  # ROW_ID 90007
    assert counts["dropped:eval_set"] == 1  # ROW_ID 917067 is one of the recipe's 517
    assert counts["read"] == 12 and counts["kept"] == 6
    assert_balanced(counts)
    texts = kept.column("text").to_pylist()
    assert not any("[**" in t for t in texts)
    first = texts[0]
    assert first.startswith("Admission Date:   2150-3-9               Discharge Date:    2150-3-14 \n")
    assert "presented to  [Company]  ED" in first and "Attending: [Name] " in first
    assert "\n\nHistory of Present Illness:\n" in first  # quoted newlines survive
    assert unknown == {"Ward Secretary Code #": 1} and counts["deid_unknown"] == 1
    row = kept.slice(0, 1).to_pylist()[0]
    assert (row["source"], row["subject_id"], row["hadm_id"], row["category"], row["chart_time"]) == (
        "mimic3", "70011", "180001", "Discharge summary", "2150-03-14",
    )  # fmt: skip
    assert len(row["text_sha1"]) == 40 and row["utf8_repaired"] is False


def test_mimic4_sample():
    kept, counts, _, _ = run({"kind": "mimic4", "path": "sample:mimic4"})
    assert kept.column("note_id").to_pylist() == ["10000032-DS-21", "10000084-DS-17"]
    assert counts["dropped:category"] == 1  # the radiology report (RR)
    text = kept.column("text")[0].as_py()
    assert "___" not in text and text.startswith("Name:  [DEID]                     Unit No:   [DEID]")
    assert kept.column("category").to_pylist() == ["DS", "DS"]


def test_pmc_sample_and_json_format(tmp_path):
    kept, counts, _, _ = run({"kind": "pmc", "path": "sample:pmc"})
    assert kept.num_rows == 12 and counts["read"] == 12
    assert kept.column("note_id")[0].as_py() == "pmc-9000001-1"
    assert kept.column("title")[0].as_py().startswith("Spontaneous coronary artery dissection")
    assert kept.column("age")[0].as_py() == "[[36.0, 'year']]" and kept.column("gender")[0].as_py() == "F"
    # PMC-Patients' JSON release: a list of objects, `age` a nested list
    rows = kept.select(["title", "text", "gender"]).to_pylist()
    data = [
        {"patient_uid": f"1-{i}", "title": r["title"], "patient": r["text"], "age": [[40.0, "year"]], "gender": r["gender"]}
        for i, r in enumerate(rows)
    ]
    (tmp_path / "PMC-Patients.json").write_text(json.dumps(data))
    kept2, counts2, _, _ = run({"kind": "pmc", "path": str(tmp_path / "PMC-Patients.json")})
    assert kept2.column("text").to_pylist() == kept.column("text").to_pylist()
    assert kept2.column("age")[0].as_py() == '[[40.0, "year"]]'


# ---------------------------------------------------------------------------------------------- adversarial input
def test_quoted_newlines_commas_and_quotes(tmp_path):
    text = 'Line 1, with "quotes"\n\nLine 3\r\nLine 4 [**First Name 1**]'
    path = write_csv(tmp_path / "n.csv", [mimic3_row(1, text), mimic3_row(2, "short note")])
    kept, counts, _, _ = run({"kind": "mimic3", "path": str(path)})
    assert kept.column("text").to_pylist() == ['Line 1, with "quotes"\n\nLine 3\r\nLine 4  [Name]', "short note"]


def test_malformed_row_is_skipped_counted_and_located(tmp_path):
    path = tmp_path / "n.csv"
    write_csv(path, [mimic3_row(1, "first"), mimic3_row(3, "third")])
    header, row1, row3 = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text(header + row1 + '2,1,2,"2150-01-01","Discharge summary","fields missing"\n' + row3)
    kept, counts, rejected, _ = run({"kind": "mimic3", "path": str(path)})
    assert kept.column("note_id").to_pylist() == ["mimic3-1", "mimic3-3"]
    assert counts["dropped:malformed_row"] == 1 and counts["read"] == 3
    assert rejected.first[0]["file"] == str(path) and rejected.first[0]["actual_columns"] == 6
    assert "text" not in json.dumps(rejected.first)  # a location, never the row's content
    assert_balanced(counts)


def test_bad_bytes_are_repaired_and_flagged_or_dropped(tmp_path):
    path = tmp_path / "n.csv"
    write_csv(path, [mimic3_row(1, "fine note"), mimic3_row(2, "BADBYTE here")])
    path.write_bytes(path.read_bytes().replace(b"BADBYTE", b"caf\xe9 \xff"))
    kept, counts, _, _ = run({"kind": "mimic3", "path": str(path)})
    assert kept.column("text").to_pylist() == ["fine note", "caf\ufffd \ufffd here"]
    assert kept.column("utf8_repaired").to_pylist() == [False, True] and counts["utf8_repaired"] == 1
    kept, counts, _, _ = run({"kind": "mimic3", "path": str(path)}, on_bad_utf8="drop")
    assert kept.column("note_id").to_pylist() == ["mimic3-1"] and counts["dropped:bad_utf8"] == 1


def test_empty_notes_and_bad_ids_are_dropped_by_reason(tmp_path):
    rows = [
        mimic3_row(1, "a real note"),
        mimic3_row(2, ""),
        mimic3_row(3, "   \n\t "),
        mimic3_row("x4", "id is not an integer"),
        mimic3_row("", "no id at all"),
        mimic3_row(6, "nursing", category="Nursing"),
        mimic3_row(7, "marked in error", iserror="1"),
    ]
    kept, counts, _, _ = run({"kind": "mimic3", "path": str(write_csv(tmp_path / "n.csv", rows))})
    assert kept.column("note_id").to_pylist() == ["mimic3-1"]
    assert {k: v for k, v in counts.items() if k.startswith("dropped:") and v} == {
        "dropped:empty_text": 2, "dropped:missing_id": 2, "dropped:category": 1, "dropped:is_error": 1,
    }  # fmt: skip
    assert_balanced(counts)


def test_first_reason_wins_so_a_row_is_counted_once(tmp_path):
    rows = [mimic3_row(917067, "", category="Nursing", iserror="1")]  # eval id + empty + category + error
    _, counts, _, _ = run({"kind": "mimic3", "path": str(write_csv(tmp_path / "n.csv", rows))})
    assert counts["dropped:category"] == 1 and counts["read"] == 1
    assert_balanced(counts)


def test_custom_exclusion_list_and_gzip(tmp_path):
    rows = [mimic3_row(i, f"note {i}") for i in (1, 2, 3)]
    plain = write_csv(tmp_path / "n.csv", rows)
    gz = tmp_path / "NOTEEVENTS.csv.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    (tmp_path / "ids.txt").write_text("2\n")
    kept, counts, _, _ = run({"kind": "mimic3", "path": str(gz), "exclude_row_ids_file": str(tmp_path / "ids.txt")})
    assert kept.column("note_id").to_pylist() == ["mimic3-1", "mimic3-3"] and counts["dropped:eval_set"] == 1


def test_missing_required_column_names_file_and_column(tmp_path):
    path = write_csv(tmp_path / "n.csv", [[1, "Discharge summary", "x"]], header=["ROW_ID", "CATEGORY", "TXT"])
    with pytest.raises(NotesInputError) as err:
        run({"kind": "mimic3", "path": str(path)})
    assert "notes.sources.0" in str(err.value) and str(path) in str(err.value)
    assert "'TEXT'" in str(err.value) and "'ISERROR'" in str(err.value)


def test_missing_file_names_the_config_field(tmp_path):
    cfg = notes_cfg({"kind": "mimic3", "path": "sample:mimic3"}, {"kind": "pmc", "path": str(tmp_path / "nope.csv")})
    with pytest.raises(NotesInputError, match=r"notes\.sources\.1\.path: no such file.*nope\.csv"):
        resolve_source(cfg.sources[1], 1)


def test_empty_file_and_unknown_format(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(NotesInputError, match="empty"):
        run({"kind": "pmc", "path": str(tmp_path / "empty.csv")})
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NotesInputError, match=r"notes\.sources\.0\.format"):
        run({"kind": "generic", "path": str(tmp_path / "notes.txt"), "text_column": "t"})


# ---------------------------------------------------------------------------------------------- generic sources
def test_generic_csv_jsonl_parquet_and_directory(tmp_path):
    rows = [{"doc": "d1", "body": "first note", "ward": "A"}, {"doc": "d2", "body": " ", "ward": "B"}, {"doc": "d3", "body": "third", "ward": None}]
    (tmp_path / "src").mkdir()
    write_csv(tmp_path / "src" / "a.csv", [[r["doc"], r["body"], r["ward"]] for r in rows[:2]], header=["doc", "body", "ward"])
    (tmp_path / "src" / "b.jsonl").write_text(json.dumps(rows[2]) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "src" / "c.parquet")
    src = {"kind": "generic", "name": "wardnotes", "path": str(tmp_path / "src"), "text_column": "body", "id_column": "doc", "keep_columns": ["ward"]}
    kept, counts, _, _ = run(src)
    # c.parquet repeats d1 and d3: each note id is kept once, the repeats are counted
    assert kept.column("note_id").to_pylist() == ["wardnotes-d1", "wardnotes-d3"]
    assert kept.column("source").to_pylist() == ["wardnotes"] * 2 and kept.column("credentialed").to_pylist() == [False] * 2
    assert [json.loads(e) for e in kept.column("extra").to_pylist()] == [{"ward": "A"}, {"ward": None}]
    assert counts["read"] == 6 and counts["dropped:empty_text"] == 2 and counts["dropped:duplicate"] == 2 and counts["kept"] == 2
    # without an id column, the note's hash is its id: stable across runs
    kept2, _, _, _ = run({"kind": "generic", "path": str(tmp_path / "src" / "a.csv"), "text_column": "body"})
    assert kept2.column("note_id").to_pylist()[0] == "generic-" + kept2.column("text_sha1")[0].as_py()[:16]


def test_generic_needs_text_column():
    with pytest.raises(ValueError, match="text_column"):
        notes_cfg({"kind": "generic", "path": "x.csv"})
