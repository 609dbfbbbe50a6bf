from pathlib import Path

import pytest

from asclepius.config import ConfigError, apply_override, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"run_dir": "/tmp/run", "notes": {"sources": [{"kind": "mimic3", "path": "sample:mimic3"}]}}


def error_of(data=MINIMAL, overrides=()):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, overrides)
    return str(err.value)


def test_presets_load():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert [s.kind for s in demo.notes.sources] == ["mimic3", "mimic4", "pmc"]
    assert demo.ray.num_cpus == 2 and demo.ray.address is None
    r7b = load_config(ROOT / "configs" / "asclepius-r-7b.yaml")
    assert r7b.model.base == "huggyllama/llama-7b" and r7b.model.use_fast_tokenizer is False
    assert r7b.notes.sources[0].path.endswith("NOTEEVENTS.csv.gz") and r7b.teacher.provider == "azure"
    # the preset sets only the cluster's shape; the recipe's hyper-parameters stay
    assert (r7b.pretrain.micro_batch, r7b.pretrain.num_workers, r7b.pretrain.lr, r7b.finetune.epochs) == (4, 8, 2e-5, 3)


def test_overrides_nested_list_and_types():
    cfg = config_from_dict(
        MINIMAL,
        ["ray.num_cpus=4", "notes.sources.0.path=/data/NOTEEVENTS.csv", "pretrain.lr=1e-4", "notes.sources.0.keep_categories=[A, B]", "ray.address=null"],
    )
    assert cfg.ray.num_cpus == 4 and cfg.ray.address is None
    assert cfg.notes.sources[0].path == "/data/NOTEEVENTS.csv"
    assert cfg.pretrain.lr == 1e-4 and cfg.pretrain.epochs == 1  # the rest of the section keeps the recipe's values
    assert cfg.notes.sources[0].keep_categories == ["A", "B"]


def test_errors_name_the_field():
    assert "ray.num_cpus" in error_of(overrides=["ray.num_cpus=many"]) and "'many'" in error_of(overrides=["ray.num_cpus=many"])
    msg = error_of(overrides=["notes.sources.0.kind=mimic5"])
    assert "notes.sources.0.kind" in msg and "'mimic5'" in msg
    assert "notes.sorces: unknown field" in error_of({**MINIMAL, "notes": {**MINIMAL["notes"], "sorces": []}})
    assert "run_dir: Field required" in error_of({"notes": MINIMAL["notes"]})
    assert "pretrain.warmup_ratio" in error_of(overrides=["pretrain.warmup_ratio=2"])
    assert "notes.sources: List should have at least 1 item" in error_of({"run_dir": "x", "notes": {"sources": []}})
    # an object storage endpoint is a URL; credentials have no field at all (they come from the AWS chain)
    assert "storage.endpoint_url" in error_of(overrides=["storage.endpoint_url=minio:9000"])
    assert "storage.access_key: unknown field" in error_of(overrides=["storage.access_key=AKIA..."])


def test_bad_overrides():
    with pytest.raises(ConfigError, match="key.sub=value"):
        config_from_dict(MINIMAL, ["ray.num_cpus"])
    with pytest.raises(ConfigError, match="not an index"):
        config_from_dict(MINIMAL, ["notes.sources.3.path=x"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_override({"run_dir": "x"}, "run_dir.sub=1")


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("run_dir: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_stage_hash_tracks_only_its_section():
    base = config_from_dict(MINIMAL)
    assert base.stage_hash("notes") == config_from_dict(MINIMAL, ["pretrain.lr=1e-3"]).stage_hash("notes")
    assert base.stage_hash("notes") != config_from_dict(MINIMAL, ["notes.min_chars=50"]).stage_hash("notes")


def test_the_configuration_reference_is_current():
    from asclepius.config_doc import reference

    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert doc == reference(), "docs/configuration.md is stale: python -m asclepius.config_doc > docs/configuration.md"
    for field in ("rate_accounting", "batch_zero_retention_agreement", "global_batch_unit", "guided_choice", "credentialed"):
        assert f"`{field}`" in doc


def test_every_departure_from_the_recipe_is_listed():
    from asclepius.config import recipe_departures

    ROOT = Path(__file__).resolve().parents[1]
    demo = recipe_departures(load_config(ROOT / "configs" / "demo.yaml"))
    assert "model.base=smollm2 (recipe: LLaMA-7B)" in demo and "finetune.lr=0.0002 (recipe: 2e-05)" in demo
    assert "finetune.max_steps=12 (recipe: None)" in demo and any(d.startswith("evaluate.teacher: generation greedy") for d in demo)
    changed = recipe_departures(load_config(ROOT / "configs" / "demo.yaml", ["questions.similarity_threshold=0.5"]))
    assert set(changed) - set(demo) == {"questions.similarity_threshold=0.5 (recipe: 0.7)"}
    # the recipe's own preset holds out 1 % (the recipe's 5 % of 60k notes is more than a judge needs)
    assert recipe_departures(load_config(ROOT / "configs" / "asclepius-7b.yaml")) == ["split.eval_fraction=0.01 (recipe: 0.05)"]
