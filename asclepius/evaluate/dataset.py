"""The evaluation set: (note, question[, task][, reference]) items, from the run's held-out notes or a user's file.

Default: `<run>/eval_questions/` — one question per held-out note, made by the questions stage's own prompt and
task draw (the `eval_questions` stage). Or `evaluate.dataset.path`: CSV, JSONL, JSON (a list of objects, the
recipe's evaluation input) or Parquet with `note` and `question` columns (any capitalisation: Asclepius-R's files
say `Question`, `Answer`, `Task`), optional `task`, `reference` (or `answer`), `note_id`/`id`, and answers
produced elsewhere in `<model>_answer` columns (the recipe's gpt4_evaluate.py input). Rows without a note or
question are dropped and counted; a repeated (note, question) is kept once.
"""

from __future__ import annotations

import hashlib
import io
import json

import pandas as pd
import pyarrow.fs as pafs

from asclepius.run import RunDir

ITEM_COLUMNS = ["item_id", "note_id", "task", "note", "question", "reference", "note_sha1", "credentialed"]


class EvalDatasetError(ValueError):
    pass


def _read_any(path: str) -> pd.DataFrame:
    fs, inner = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    if fs.get_file_info(inner).type != pafs.FileType.File:
        raise EvalDatasetError(f"evaluate.dataset.path: no such file: {path}")
    lower = path.lower()
    if lower.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        with fs.open_input_file(inner) as f:
            return pq.read_table(f).to_pandas()
    with fs.open_input_stream(inner, compression="detect") as f:
        raw = f.read().decode("utf-8", errors="replace")
    try:
        if lower.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            return pd.DataFrame([json.loads(line) for line in raw.splitlines() if line.strip()])
        if lower.endswith((".json", ".json.gz")):
            data = json.loads(raw)
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise EvalDatasetError(f"evaluate.dataset.path: {path} must hold a JSON list of objects")
            return pd.DataFrame(data)
    except json.JSONDecodeError as err:
        raise EvalDatasetError(f"evaluate.dataset.path: {path} is not valid JSON (line {err.lineno})") from None
    return pd.read_csv(io.StringIO(raw), dtype=str, keep_default_na=False)


def _text_sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def items_from_file(path: str, credentialed: bool) -> tuple[pd.DataFrame, dict[str, str], dict]:
    """(items, {candidate name: answers column}, dropped counts) from a user's file."""
    df = _read_any(path)
    lower = {c.lower(): c for c in df.columns}
    missing = [c for c in ("note", "question") if c not in lower]
    if missing:
        raise EvalDatasetError(f"evaluate.dataset.path: {path} lacks column(s) {missing} (it has {list(df.columns)[:20]})")

    def col(*names, default=None):
        for n in names:
            if n in lower:
                return df[lower[n]]
        return pd.Series([default] * len(df), index=df.index)

    answer_columns = {c[: -len("_answer")]: c for c in df.columns if c.lower().endswith("_answer") and len(c) > len("_answer")}
    items = pd.DataFrame({
        "note": col("note").map(lambda v: v if isinstance(v, str) else ("" if v is None or pd.isna(v) else str(v))),
        "question": col("question").map(lambda v: v if isinstance(v, str) else ("" if v is None or pd.isna(v) else str(v))),
        "task": col("task", default="unknown").map(lambda v: str(v) if isinstance(v, str) and v.strip() else "unknown"),
        "reference": col("reference", "answer"),
        "note_id": col("note_id", "id", "row_id"),
    })  # fmt: skip
    for name, column in answer_columns.items():
        items[f"answer:{name}"] = df[column].map(lambda v: v if isinstance(v, str) and v.strip() else None)
    dropped = {}
    empty = (items.note.str.strip() == "") | (items.question.str.strip() == "")
    dropped["empty_note_or_question"] = int(empty.sum())
    items = items[~empty]
    repeated = items.duplicated(subset=["note", "question"])
    dropped["duplicate"] = int(repeated.sum())
    items = items[~repeated].reset_index(drop=True)
    items["note_sha1"] = items.note.map(_text_sha1)
    items["note_id"] = [str(n) if n is not None and not pd.isna(n) and str(n) else f"file-{h[:16]}" for n, h in zip(items.note_id, items.note_sha1)]
    items["item_id"] = [f"{n}:{_text_sha1(q)[:8]}" for n, q in zip(items.note_id, items.question)]
    items["credentialed"] = bool(credentialed)
    return items, answer_columns, dropped


def items_from_run(run: RunDir) -> pd.DataFrame:
    """The held-out notes' questions made by the eval_questions stage."""
    table = run.read_frame("eval_questions")
    if table.empty:
        return pd.DataFrame(columns=ITEM_COLUMNS)
    items = table.copy()
    items["reference"] = None
    items["item_id"] = items.note_id
    return items[ITEM_COLUMNS].reset_index(drop=True)
