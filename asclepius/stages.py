"""The stage table as data: names in order, which call the teacher, which train. A low module: the pipeline, the
fits check, the key check, the estimate and the status all read it; none of them imports the others for it."""

STAGE_ORDER = ["notes", "synthesize", "split", "questions", "answers", "eval_questions", "pretrain", "finetune", "serve", "evaluate"]
TEACHER_STAGES = frozenset({"synthesize", "questions", "answers", "eval_questions", "evaluate"})
TRAINING = frozenset({"pretrain", "finetune"})
