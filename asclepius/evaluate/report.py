"""The evaluation report: `report.md` a person can read, and two PNG charts (matplotlib) it links to.

Numbers only — no note, question or answer text is written to the report.
"""

from __future__ import annotations

import math

import pandas as pd

from asclepius.evaluate import aggregate

GPT4_CLASS = ("gpt-4", "gpt-4o", "gpt-4.1", "gpt-5", "o1", "o3", "o4", "claude-3-opus", "claude-3-5", "claude-3-7", "claude-sonnet-4",
              "claude-opus-4", "gemini-1.5-pro", "gemini-2", "llama-3.1-405b", "qwen2.5-72b", "deepseek-v3", "deepseek-r1")  # fmt: skip


def is_gpt4_class(model: str) -> bool:
    """The recipe's judge was GPT-4: weaker judges make noisier, more biased scores; the report says so."""
    name = model.lower()
    return any(name.startswith(p) or f"/{p}" in name for p in GPT4_CLASS) and "mini" not in name and "nano" not in name


def _fmt(x, digits=2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def summary_line(models: pd.DataFrame) -> str:
    parts = [f"{r.model} {_fmt(r.mean)} [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]" for r in models.itertuples()]
    return "evaluate: mean judge score (95% CI): " + "; ".join(parts)


def plot_tasks(tasks: pd.DataFrame, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(dict.fromkeys(tasks.task))
    models = list(dict.fromkeys(tasks.model))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names) + 2), 4))
    x = np.arange(len(names))
    for k, model in enumerate(models):
        sub = tasks[tasks.model == model].set_index("task").reindex(names)
        means = sub["mean"].to_numpy(dtype=float)
        err = np.vstack([means - sub.ci_low.to_numpy(dtype=float), sub.ci_high.to_numpy(dtype=float) - means])
        ax.bar(x + (k - (len(models) - 1) / 2) * width, np.nan_to_num(means), width, yerr=np.nan_to_num(err), capsize=3, label=model)
    ax.set_xticks(x, [n.replace(" ", "\n") for n in names], fontsize=8)
    ax.set_ylim(0, 4.2)
    ax.set_ylabel("mean judge score (1-4)")
    ax.set_title("per task, with 95% bootstrap CI")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_histogram(dist: pd.DataFrame, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(1, len(dist.index))
    for k, model in enumerate(dist.index):
        counts = dist.loc[model].to_numpy(dtype=float)
        share = counts / counts.sum() if counts.sum() else counts
        ax.bar(np.arange(1, 5) + (k - (len(dist.index) - 1) / 2) * width, share, width, label=model)
    ax.set_xticks([1, 2, 3, 4], ["1 unacceptable", "2 poor", "3 satisfactory", "4 excellent"], fontsize=8)
    ax.set_ylabel("share of judgements")
    ax.set_title("score distribution")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def signal_lines(signal: dict, bias: dict, lengths: dict) -> list[str]:
    """What the judgements say whatever the judge: its score sets, its position preference, the two orders'
    agreement, and the answers' lengths — the honest part of a weak judge's report."""
    if not signal.get("judgements"):
        return ["no judgement compared two answers"]
    first = (f"{signal['distinct']} different score set(s) over {signal['judgements']} judgements, \"{signal['most_common']}\" in "
             f"{signal['most_common_share']:.0%} of them" + (": the same every time, saying nothing about the models" if signal["distinct"] == 1 else ""))
    second = f"the answer shown first scored higher {signal['first_higher']} times, the one shown second {signal['second_higher']}, ties {signal['ties']}"
    if bias.get("share") is not None:
        second += f"; both orders agree on {1 - bias['share']:.0%} of {bias['items_judged_twice']} items"
    known = {m: v for m, v in lengths.items() if v is not None}
    if known:
        second += "; answers average " + ", ".join(f"{m} {v:.0f}" for m, v in known.items()) + " tokens"
    return [first, second]


def markdown(*, models: pd.DataFrame, tasks: pd.DataFrame, dist: pd.DataFrame, pairs: pd.DataFrame, bias: dict,
             lengths: dict, counts: dict, costs: dict, judge: str, dataset: str, reverse: bool, signal: dict | None = None,
             departures: list[str] | None = None) -> str:  # fmt: skip
    lines = ["# Evaluation report", ""]
    lines.append(f"Judge: **{judge}**, the recipe's prompt, temperature 0. Evaluation set: {dataset}, "
                 f"{counts['items']} items.")  # fmt: skip
    if departures:
        lines += ["", "Settings of this run that depart from the recipe's: " + "; ".join(f"`{d}`" for d in departures) + "."]
    if not is_gpt4_class(judge):
        lines += ["", f"> **Warning:** the judge `{judge}` is not a GPT-4-class model. The recipe's judge was GPT-4; a weaker "
                      "judge's scores are noisy and biased (towards long answers, towards the first position). Read these "
                      "numbers as a check that the machinery works, not as a measure of the models."]  # fmt: skip
    if signal is not None:
        lines += ["", "## What the judgements say", ""] + [f"- {line}" for line in signal_lines(signal, bias, lengths)]
    lines += ["", "## Per model", "", "| model | mean score | 95% CI | scored items | answers missing | unscored | mean answer length (tokens) |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in models.itertuples():
        lines.append(f"| {r.model} | {_fmt(r.mean)} | [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}] | {r.scored_items} / {r.items} | "
                     f"{counts['missing_answers'].get(r.model, 0)} | {counts['unscored_by_model'].get(r.model, 0)} | "
                     f"{_fmt(lengths.get(r.model), 1)} |")  # fmt: skip
    lines += ["", "CI: percentile bootstrap over items. An item's score is the mean of its judgements"
              + (" (two: the answers in one order, then reversed)." if reverse else ".")
              + " Unscored judgements and missing answers are left out of the means, never counted as 0.", ""]  # fmt: skip
    lines += ["## Per task", "", "![per-task means](per_task.png)", ""]
    task_names = list(dict.fromkeys(tasks.task))
    model_names = list(models.model)
    lines.append("| task | " + " | ".join(model_names) + " |")
    lines.append("|---|" + "---|" * len(model_names))
    for task in task_names:
        sub = tasks[tasks.task == task].set_index("model")
        cells = [f"{_fmt(sub.loc[m, 'mean'])} (n={int(sub.loc[m, 'n'])})" if m in sub.index else "–" for m in model_names]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "## Score distribution", "", "![score distribution](scores.png)", "", "| model | 1 | 2 | 3 | 4 |", "|---|---|---|---|---|"]
    for model in dist.index:
        lines.append(f"| {model} | " + " | ".join(str(int(dist.loc[model, k])) for k in (1, 2, 3, 4)) + " |")
    lines += ["", "## Pairwise", "", "| model | vs | wins | ties | losses | items |", "|---|---|---|---|---|---|"]
    for r in pairs.itertuples():
        lines.append(f"| {r.model} | {r.other} | {r.wins} | {r.ties} | {r.losses} | {r.items} |")
    lines += ["", "## Position bias", ""]
    if bias.get("share") is None:
        lines.append("Each item was judged once (`evaluate.reverse_order: false`): position bias was not measured.")
    else:
        lines.append(f"{bias['disagreeing_items']} of {bias['items_judged_twice']} items ({bias['share']:.0%}) got scores that differ by "
                     f"one point or more when the answers were shown in reverse order. Mean score difference (forward − "
                     f"reversed) per model: " + ", ".join(f"{m} {d:+.2f}" for m, d in bias["per_model_mean_difference"].items()) + ".")  # fmt: skip
    lines += ["", "## Counts and cost", ""]
    lines.append(f"- items: {counts['items']}; judgements asked: {counts['judgements']}; unscored after re-asking: "
                 f"{counts['unscored']}; re-asked: {counts['reasked']}")  # fmt: skip
    for name, n in counts.get("dropped", {}).items():
        lines.append(f"- evaluation set rows dropped ({name}): {n}")
    for who, c in costs.items():
        lines.append(f"- {who}: {c.get('requests', 0)} requests, {c.get('prompt_tokens', 0):,} prompt + {c.get('completion_tokens', 0):,} "
                     f"completion tokens, ${c.get('cost_usd', 0):.4f}")  # fmt: skip
    return "\n".join(lines) + "\n"


def build(scores: pd.DataFrame, lengths: dict, counts: dict, costs: dict, judge: str, dataset: str, reverse: bool,
          samples: int, seed: int, models: list[str] | None = None) -> dict:  # fmt: skip
    """All the report's numbers from the scores table (and what the stage counted): a dict of frames and values.
    `models`: the order to show them in (the config's), else first seen."""
    if models:
        scores = scores.assign(model=pd.Categorical(scores.model, categories=models)).sort_values(["model", "item_id"], kind="stable")
        scores = scores.assign(model=scores.model.astype(str))
    items = aggregate.item_scores(scores)
    return {
        "models": aggregate.per_model(items, samples, seed),
        "tasks": aggregate.per_task(items, samples, seed),
        "dist": aggregate.distribution(scores),
        "pairs": aggregate.pairwise(items),
        "bias": aggregate.position_bias(scores), "signal": aggregate.judge_signal(scores),
        "lengths": lengths, "counts": counts, "costs": costs, "judge": judge, "dataset": dataset, "reverse": reverse,
    }  # fmt: skip
