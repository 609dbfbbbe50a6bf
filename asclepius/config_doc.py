"""The configuration reference, generated from the pydantic models (so it cannot drift from the code):

    python -m asclepius.config_doc > docs/configuration.md      # tests/test_config.py checks it is current
"""

from __future__ import annotations

import json
import sys
import typing

from pydantic import BaseModel

from asclepius import config as C

SECTIONS = [
    ("(top level)", C.Config), ("ray", C.RayConfig), ("ray.node_types.<name>", C.NodeTypeConfig), ("storage", C.StorageConfig),
    ("lease", C.LeaseConfig), ("notes", C.NotesConfig), ("notes.sources[]", C.NoteSourceConfig),
    ("teacher", C.TeacherConfig), ("split", C.SplitConfig), ("synthesize", C.SynthesizeConfig), ("questions", C.QuestionsConfig),
    ("answers", C.AnswersConfig), ("instructions_import", C.ImportConfig), ("model", C.ModelConfig),
    ("pretrain / finetune", C.TrainHyperparams), ("pretrain.lora / finetune.lora", C.LoraSettings), ("serve", C.ServeConfig), ("serve.models[]", C.ServedModelConfig),
    ("evaluate", C.EvaluateConfig), ("evaluate.dataset", C.EvalDatasetConfig), ("evaluate.candidates[]", C.CandidateConfig),
    ("evaluate.judge", C.JudgeConfig),
]  # fmt: skip


def _type(annotation) -> str:
    text = str(annotation).replace("typing.", "").replace("asclepius.config.", "").replace("<class '", "").replace("'>", "")
    return text.replace("NoneType", "None")


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section defaults)"
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else "(the recipe's; long)"


def reference() -> str:
    lines = ["# Configuration reference", "",
             "Generated from `asclepius/config.py` by `python -m asclepius.config_doc`; a test keeps it current. Every recipe value",
             "is a default read from `asclepius/recipe/asclepius_recipe.json`. Override any field on the command line with",
             "`key.sub=value` (list items by index: `notes.sources.0.path=...`). Training sections default to the recipe's",
             "pretraining and finetuning values respectively.", ""]  # fmt: skip
    for name, model in SECTIONS:
        lines += [f"## `{name}`", ""]
        doc = (model.__doc__ or "").strip().splitlines()
        if doc and not doc[0].startswith("!!!") and "Usage docs" not in doc[0] and "A base class" not in doc[0]:
            lines += [doc[0], ""]
        lines += ["| field | type | default | description |", "|---|---|---|---|"]
        hints = typing.get_type_hints(model)
        for field_name, field in model.model_fields.items():
            desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
            default = "(the recipe's)" if model is C.Config and field_name in ("pretrain", "finetune") else _default(field)
            kind = _type(hints.get(field_name, field.annotation)).replace("|", "\\|")
            lines.append(f"| `{field_name}` | `{kind}` | `{default.replace('|', chr(92) + '|')}` | {desc} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(reference())
