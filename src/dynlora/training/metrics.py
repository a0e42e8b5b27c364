"""The official GLUE metric of each task (scikit-learn / scipy), and the one number per task used for averages."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

# Which metrics make a task's "main" score (averaged when a task has two), as in the GLUE leaderboard.
MAIN_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("mcc",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "stsb": ("pearson", "spearman"),
    "qqp": ("f1", "accuracy"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}


def glue_metrics(task: str, predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Metrics of one evaluation split: class ids (or scores, for STS-B) against the gold labels."""
    if task not in MAIN_METRICS:
        raise ValueError(f"unknown GLUE task {task!r}; choose one of: {', '.join(MAIN_METRICS)}")
    preds, gold = np.asarray(predictions), np.asarray(labels)
    if len(preds) != len(gold) or len(gold) == 0:
        raise ValueError(f"need as many predictions as labels, and at least one: got {len(preds)} and {len(gold)}")
    if task == "stsb":
        # A constant prediction has no correlation; scipy warns and returns nan, which we report as 0.
        constant = np.ptp(preds) == 0 or np.ptp(gold) == 0
        pearson = 0.0 if constant else float(pearsonr(preds, gold)[0])
        spearman = 0.0 if constant else float(spearmanr(preds, gold)[0])
        out = {"pearson": pearson, "spearman": spearman}
    else:
        out = {"accuracy": float(accuracy_score(gold, preds))}
        if task == "cola":
            out["mcc"] = float(matthews_corrcoef(gold, preds))
        if task in ("mrpc", "qqp"):
            out["f1"] = float(f1_score(gold, preds))
    out["main"] = main_score(task, out)
    return out


def main_score(task: str, metrics: dict[str, float]) -> float:
    """The task's single number for averages: e.g. MCC for CoLA, mean of F1 and accuracy for MRPC."""
    return float(np.mean([metrics[m] for m in MAIN_METRICS[task]]))


def main_metric_name(task: str) -> str:
    """What :func:`main_score` is for ``task``, in words: ``accuracy``, ``mean of f1 and accuracy``, ..."""
    names = MAIN_METRICS[task]
    return names[0] if len(names) == 1 else f"mean of {' and '.join(names)}"


def run_score(metrics: dict[str, dict[str, float]]) -> float:
    """One number for an evaluation over several splits (MNLI matched/mismatched): the mean of their main scores."""
    return float(np.mean([split["main"] for split in metrics.values()]))


def format_metrics(values: dict[str, float]) -> str:
    """``accuracy 0.7993, f1 0.8123``: one split's metrics for people (the averaging-only ``main`` left out)."""
    return ", ".join(f"{k} {v:.4f}" for k, v in values.items() if k != "main")
