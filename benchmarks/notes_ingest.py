"""Notes ingestion: our Ray Data stage vs the recipe's way (pandas read_csv of the whole file + filter + de-id).

    python benchmarks/notes_ingest.py                # 2.08M rows, the real NOTEEVENTS' size (~3.6 GB CSV)
    python benchmarks/notes_ingest.py --rows 200000  # a smaller run

Generates a NOTEEVENTS-shaped CSV (cached under benchmarks/_data/): 2.9 % discharge summaries of ~10 KB, other
notes of ~1–2 KB, multi-line quoted TEXT with `[**...**]` placeholders. Then runs each contender in its own
process and samples the memory of that process and all its children (the Ray instance it starts included), as
PSS, every 0.2 s. Prints rows/s and peak memory of each and the ratios, and appends a row to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from record import record  # noqa: E402

DISCHARGE_SHARE = 0.029
CATEGORIES = ["Nursing/other", "Radiology", "Nursing", "ECG", "Physician ", "Echo", "Respiratory "]

_DS_SECTION = (
    "History of Present Illness:\n{age} yo [**Known firstname {n}**] w/ h/o CAD, HTN, DM2 who presented to "
    "[**Hospital1 18**] on [**2150-3-{d}**] with {cc}. In ED VS T 99.{d} HR 9{d} BP 14{d}/8{d} RR 2{d} O2 9{d}% RA.\n\n"
    "Hospital Course:\n# {cc}: treated w/ IV abx and nebs, weaned to RA by HD{d}. Seen by Dr. [**Last Name (STitle) {n}**].\n"
    "# HTN: continued home lisinopril 20 mg daily, metoprolol 25 mg BID.\n# DM2: ISS + glargine, A1c 7.{d}%.\n\n"
)
_OTHER = (
    "Pt A&Ox3, resp even and unlabored on {d}L NC. Lungs w/ coarse BS bilat. HR 8{d} SR, BP 13{d}/7{d}. "
    "Tolerating PO diet, voiding qs. Family [**Known lastname {n}**] in to visit, updated re: plan of care.\n"
    "Plan: cont to monitor resp status, pain control, OOB to chair, f/u AM labs.\n"
)


def _note(rng: random.Random, discharge: bool, n: int) -> str:
    d = n % 10
    if discharge:
        cc = rng.choice(["SOB", "chest pain", "fever and cough", "abd pain", "syncope"])
        head = f"Admission Date:  [**2150-3-{d}**]   Discharge Date:  [**2150-3-{d + 5}**]\n\nService: MEDICINE\n\n"
        body = "".join(_DS_SECTION.format(age=40 + d, n=n, d=d, cc=cc) for _ in range(rng.randint(14, 20)))
        return head + body + f"Followup Instructions:\nPCP Dr. [**First Name4 (NamePattern1) {n}**] in 1 wk.\n"
    return "".join(_OTHER.format(n=n, d=d) for _ in range(rng.randint(3, 6)))


def generate(path: Path, rows: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    header = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CHARTTIME", "STORETIME", "CATEGORY", "DESCRIPTION", "CGID", "ISERROR", "TEXT"]
    schema = pa.schema([(h, pa.int64() if h in ("ROW_ID", "SUBJECT_ID") else pa.string()) for h in header])
    chunk = 50_000
    with pacsv.CSVWriter(str(tmp), schema) as writer:
        for start in range(1, rows + 1, chunk):
            ids = list(range(start, min(start + chunk, rows + 1)))
            ds = [rng.random() < DISCHARGE_SHARE for _ in ids]
            writer.write_table(
                pa.table(
                    {
                        "ROW_ID": ids,
                        "SUBJECT_ID": [10_000 + i // 40 for i in ids],
                        "HADM_ID": [str(100_000 + i // 20) for i in ids],
                        "CHARTDATE": ["2150-03-14"] * len(ids),
                        "CHARTTIME": [None] * len(ids),
                        "STORETIME": [None] * len(ids),
                        "CATEGORY": ["Discharge summary" if x else rng.choice(CATEGORIES) for x in ds],
                        "DESCRIPTION": ["Report"] * len(ids),
                        "CGID": [None] * len(ids),
                        "ISERROR": [None] * len(ids),
                        "TEXT": [_note(rng, x, i) for x, i in zip(ds, ids)],
                    },
                    schema=schema,
                )
            )
    tmp.rename(path)


# ----------------------------------------------------------------------------------------------- contenders
def run_pandas(csv_path: str, out_dir: str) -> dict:
    """The recipe's preprocessing (preprocessing/mimiciii_preproc.py), with our identical de-id function."""
    import pandas as pd

    from asclepius.notes.deid import replace_mimic3_placeholders
    from asclepius.recipe import load_recipe, mimic3_eval_row_ids

    tags = load_recipe().deid_tag_map
    started = time.time()
    notes = pd.read_csv(csv_path)
    kept = notes[(~notes["ROW_ID"].isin(list(mimic3_eval_row_ids()))) & (notes["CATEGORY"] == "Discharge summary")].copy()
    kept["TEXT"] = kept["TEXT"].map(lambda t: replace_mimic3_placeholders(t, tags, "[DEID]").text)
    kept.to_csv(os.path.join(out_dir, "pandas_notes.csv"), index=False)
    return {"rows": len(notes), "kept": len(kept), "seconds": time.time() - started}


def run_ours(csv_path: str, out_dir: str) -> dict:
    import ray

    from asclepius.cluster import init_ray
    from asclepius.config import config_from_dict
    from asclepius.notes.stage import run_notes_stage
    from asclepius.run import RunDir

    cfg = config_from_dict({"run_dir": os.path.join(out_dir, "ray_run"), "ray": {"num_cpus": 2}, "notes": {"sources": [{"kind": "mimic3", "path": csv_path}]}})
    t0 = time.time()
    init_ray(cfg.ray)
    ray_start = time.time() - t0
    print("READY", flush=True)  # the parent records Ray's idle footprint here
    time.sleep(2.0)
    started = time.time()
    entry = run_notes_stage(cfg, RunDir.open(cfg.run_dir), force=True)
    seconds = time.time() - started
    ray.shutdown()
    return {"rows": entry["totals"]["read"], "kept": entry["totals"]["kept"], "seconds": seconds, "ray_start_seconds": ray_start}


# ----------------------------------------------------------------------------------------------- measuring
def _tree_pss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def measure(which: str, csv_path: Path, out_dir: Path) -> dict:
    cmd = [sys.executable, sys.argv[0], "--child", which, "--csv", str(csv_path), "--out-dir", str(out_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    ps = psutil.Process(proc.pid)
    peak = {"all": 0, "idle": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak["all"] = max(peak["all"], _tree_pss(ps))
            time.sleep(0.2)

    lines: list[str] = []

    def read_stdout():
        for line in proc.stdout:
            if line.startswith("READY"):
                peak["idle"] = _tree_pss(ps)
                peak["all"] = 0  # from here on: the stage's run only
            lines.append(line)

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read_stdout, daemon=True)]
    for t in threads:
        t.start()
    proc.wait()
    done.set()
    for t in threads:
        t.join(timeout=5)
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed (exit {proc.returncode})")
    result = json.loads([ln for ln in lines if ln.startswith("{")][-1])
    result.update(peak_bytes=peak["all"], idle_bytes=peak["idle"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_080_000)
    ap.add_argument("--data-dir", default=str(ROOT / "benchmarks" / "_data"))
    ap.add_argument("--child", choices=["pandas", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--csv", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args()

    if args.child:
        fn = run_pandas if args.child == "pandas" else run_ours
        print(json.dumps(fn(args.csv, args.out_dir)), flush=True)
        return

    data = Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    csv_path = data / f"NOTEEVENTS_{args.rows}.csv"
    if not csv_path.exists():
        t = time.time()
        generate(csv_path, args.rows)
        print(f"generated {csv_path} ({csv_path.stat().st_size / 1e9:.2f} GB) in {time.time() - t:.0f} s")
    size_gb = csv_path.stat().st_size / 1e9
    out = data / "out"
    out.mkdir(exist_ok=True)

    pandas = measure("pandas", csv_path, out)
    ours = measure("ours", csv_path, out)
    assert pandas["kept"] == ours["kept"], (pandas["kept"], ours["kept"])

    def rps(r):
        return r["rows"] / r["seconds"]

    gib = 1 << 30
    print(f"\nNOTEEVENTS-shaped CSV: {args.rows:,} rows, {size_gb:.2f} GB, {ours['kept']:,} discharge summaries kept")
    print(f"{'':28}{'rows/s':>12}{'seconds':>10}{'peak GiB':>10}")
    print(f"{'pandas (recipe)':28}{rps(pandas):>12,.0f}{pandas['seconds']:>10.1f}{pandas['peak_bytes'] / gib:>10.2f}")
    print(f"{'ours (Ray Data, 2 CPUs)':28}{rps(ours):>12,.0f}{ours['seconds']:>10.1f}{ours['peak_bytes'] / gib:>10.2f}")
    print(f"  Ray idle footprint before the stage: {ours['idle_bytes'] / gib:.2f} GiB (included in the peak); Ray start {ours['ray_start_seconds']:.1f} s (not included)")
    speed = rps(ours) / rps(pandas)
    mem = ours["peak_bytes"] / pandas["peak_bytes"]
    print(f"throughput ratio ours/pandas: {speed:.2f}x   peak memory ratio ours/pandas: {mem:.3f}")

    if not args.no_record:
        record(
            "notes_ingest", f"python benchmarks/notes_ingest.py --rows {args.rows}", f"{args.rows:,} rows, {size_gb:.2f} GB",
            f"pandas {rps(pandas):,.0f} rows/s, {pandas['peak_bytes'] / gib:.2f} GiB; ours {rps(ours):,.0f} rows/s, "
            f"{ours['peak_bytes'] / gib:.2f} GiB (Ray idle {ours['idle_bytes'] / gib:.2f})",
            f"speed {speed:.2f}x, memory {mem:.3f}x", f"{os.cpu_count()} CPU, {psutil.virtual_memory().total / gib:.0f} GiB",
        )  # fmt: skip


if __name__ == "__main__":
    main()
