"""From the judge's scores to the numbers of the report: means with bootstrap confidence intervals, per task,
score distributions, pairwise wins, position bias, answer lengths. Plain pandas/numpy.

The scores table has one row per (item, model, order): `score` is the judge's 1-4, or null when that judgement
was unscored (the reply could not be read after re-asking) or the model has no answer for the item. An item's
score for a model is the mean over the orders that scored it; means are over items, never counting a missing or
unscored judgement as 0 (the recipe's choice, which drags every model's mean down).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def item_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per (item, task, model): the mean of the orders that scored it (null if none did)."""
    scored = scores.dropna(subset=["score"])
    means = scored.groupby(["item_id", "task", "model"], as_index=False)["score"].mean()
    keys = scores[["item_id", "task", "model"]].drop_duplicates()
    return keys.merge(means, on=["item_id", "task", "model"], how="left")


def bootstrap_ci(values, samples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (resampling items with replacement). (nan, nan) for no values."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)
    tail = (1 - level) / 2
    return (float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)))


def per_model(items: pd.DataFrame, samples: int = 2000, seed: int = 0) -> pd.DataFrame:
    rows = []
    for model, g in items.groupby("model", sort=False):
        values = g.score.dropna().to_numpy()
        lo, hi = bootstrap_ci(values, samples, seed)
        rows.append({"model": model, "mean": float(values.mean()) if values.size else float("nan"), "ci_low": lo, "ci_high": hi,
                     "scored_items": int(values.size), "items": int(len(g))})  # fmt: skip
    return pd.DataFrame(rows)


def per_task(items: pd.DataFrame, samples: int = 1000, seed: int = 0) -> pd.DataFrame:
    rows = []
    for (task, model), g in items.groupby(["task", "model"], sort=True):
        values = g.score.dropna().to_numpy()
        lo, hi = bootstrap_ci(values, samples, seed)
        rows.append({"task": task, "model": model, "mean": float(values.mean()) if values.size else float("nan"),
                     "ci_low": lo, "ci_high": hi, "n": int(values.size)})  # fmt: skip
    return pd.DataFrame(rows, columns=["task", "model", "mean", "ci_low", "ci_high", "n"])


def distribution(scores: pd.DataFrame) -> pd.DataFrame:
    """How often each model got 1, 2, 3, 4 (every scored judgement, both orders)."""
    scored = scores.dropna(subset=["score"])
    table = pd.crosstab(scored.model, scored.score.astype(int)).reindex(columns=[1, 2, 3, 4], fill_value=0)
    return table.reindex(scores.model.drop_duplicates(), fill_value=0)


def pairwise(items: pd.DataFrame) -> pd.DataFrame:
    """Win / tie / loss of each model against each other one, over the items both have a score for."""
    wide = items.pivot_table(index="item_id", columns="model", values="score")
    models = list(items.model.drop_duplicates())
    rows = []
    for i, a in enumerate(models):
        for b in models[i + 1 :]:
            if a not in wide or b not in wide:
                continue
            both = wide[[a, b]].dropna()
            rows.append({"model": a, "other": b, "wins": int((both[a] > both[b]).sum()), "ties": int((both[a] == both[b]).sum()),
                         "losses": int((both[a] < both[b]).sum()), "items": int(len(both))})  # fmt: skip
    return pd.DataFrame(rows, columns=["model", "other", "wins", "ties", "losses", "items"])


def position_bias(scores: pd.DataFrame) -> dict:
    """Over the items judged in both orders: the share where some model's two scores differ by one point or more,
    and each model's mean difference (forward − reversed)."""
    judged = scores[scores.order.isin(["forward", "reversed"])]
    wide = judged.pivot_table(index=["item_id", "model"], columns="order", values="score")
    if wide.empty or not {"forward", "reversed"} <= set(wide.columns):
        return {"items_judged_twice": 0, "disagreeing_items": 0, "share": None, "per_model_mean_difference": {}}
    wide = wide[["forward", "reversed"]].dropna()
    diff = (wide["forward"] - wide["reversed"]).rename("diff").reset_index()
    per_item = diff.groupby("item_id")["diff"].apply(lambda d: bool((d.abs() >= 1).any()))
    return {
        "items_judged_twice": int(len(per_item)),
        "disagreeing_items": int(per_item.sum()),
        "share": round(float(per_item.mean()), 4),
        "per_model_mean_difference": {m: round(float(g["diff"].mean()), 4) for m, g in diff.groupby("model", sort=False)},
    }


def judge_signal(scores: pd.DataFrame) -> dict:
    """What the judgements can say however weak the judge: how many different score sets it gave, its most common
    one, and how often the answer shown first scored higher than the one shown second (and the reverse, and ties).
    A judge that gives every judgement the same scores, or always prefers one position, says nothing about the models."""
    empty = {"judgements": 0, "distinct": 0, "most_common": None, "most_common_share": None, "first_higher": 0, "second_higher": 0, "ties": 0}
    if "agent" not in scores:  # scores without the positions they were shown in (a dataset's own)
        return empty
    judged = scores[(scores.order != "no answer") & scores.score.notna() & scores.agent.notna()]
    # one judgement: an item's answers in one order, its scores by the position they were shown in (agent A, B, ...)
    sets = judged.sort_values("agent").groupby(["item_id", "order"], sort=False)["score"].apply(lambda s: tuple(int(x) for x in s))
    sets = sets[sets.map(len) >= 2]
    if sets.empty:
        return empty
    counts = sets.value_counts()
    return {
        "judgements": int(len(sets)), "distinct": int(len(counts)),
        "most_common": " ".join(str(x) for x in counts.index[0]), "most_common_share": round(float(counts.iloc[0] / len(sets)), 4),
        "first_higher": int(sum(s[0] > s[1] for s in sets)), "second_higher": int(sum(s[0] < s[1] for s in sets)),
        "ties": int(sum(s[0] == s[1] for s in sets)),
    }  # fmt: skip
