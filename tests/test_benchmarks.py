"""The GLUE benchmark's margin arithmetic (the line RESULTS.md judges the quality targets by), on made-up runs."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from glue import margins  # noqa: E402


def runs(task: str, method: str, scores: list[float]) -> list[dict]:
    return [{"task": task, "method": method, "metrics": {"validation": {"main": s}}} for s in scores]


SCORES = {  # task -> method -> per-seed main metric
    "cola": {"dynamic": [0.2, 0.2], "lora": [0.1, 0.1], "lora-lr1e-3": [0.15, 0.15], "peft-adalora": [0.1, 0.1]},
    "stsb": {"dynamic": [0.7, 0.7], "lora": [0.05, 0.05], "lora-lr1e-3": [0.7, 0.6], "peft-adalora": [0.6, 0.6]},
}


def results(scores=SCORES) -> list[dict]:
    return [r for task, per in scores.items() for method, s in per.items() for r in runs(task, method, s)]


def test_margin_is_taken_against_the_better_static_lora_lr():
    text = margins(results(), ["cola", "stsb"], n_seeds=2)
    # averages: dynamic 45.0, lora 7.5, lora-lr1e-3 40.0, adalora 35.0 (over cola and stsb)
    assert "better static LoRA (lora-lr1e-3) 40.00 → **+5.00**" in text
    assert "peft-adalora 35.00 → **+10.00**" in text
    # without the tuning task: dynamic 70, lora-lr1e-3 65, adalora 60
    assert "without cola (stsb): dynamic 70.00; better static LoRA (lora-lr1e-3) 65.00 → **+5.00**" in text


def test_tasks_with_unfinished_seeds_are_left_out():
    partial = {t: dict(per) for t, per in SCORES.items()}
    partial["stsb"]["peft-adalora"] = [0.6]  # one seed of two
    text = margins(results(partial), ["cola", "stsb"], n_seeds=2)
    assert "- all (cola):" in text
    assert "- without cola: —" in text


def test_contrasts_pair_runs_by_seed_and_average_only_complete_rows():
    from glue import contrast_table, paired_differences

    rows = [
        {"task": t, "method": m, "seed": seed, "metrics": {"validation": {"main": s}}}
        for t, m, seed, s in [
            ("cola", "dynamic", 0, 0.30),
            ("cola", "dynamic", 1, 0.20),
            ("cola", "dynamic-nogate", 1, 0.25),
            ("cola", "dynamic-nogate", 0, 0.10),
            ("stsb", "dynamic", 0, 0.80),
        ]
    ]
    assert paired_differences(rows, "cola", "dynamic", "dynamic-nogate") == pytest.approx([20.0, -5.0])
    assert paired_differences(rows, "stsb", "dynamic", "dynamic-nogate") == []
    gate = next(line for line in contrast_table(rows, ["cola", "stsb"]).splitlines() if "input-feature gate" in line)
    assert gate.endswith("| +7.50 ± 17.68 (n=2) | — | — |")  # no stsb pair yet: no average


def test_v2_per_task_differences_list_only_baselines_with_every_seed_finished():
    from glue_v2 import per_task_lines

    score = {("cola", "dynamic", s): v for s, v in enumerate([30.0, 26.0, 28.0])}
    score |= {("cola", "lora", s): v for s, v in enumerate([28.0, 27.0, 25.0])}
    score |= {("cola", "peft-adalora", s): 15.0 for s in (0, 1)}  # seed 2 still running
    (line,) = per_task_lines(score, ["cola", "stsb"], [0, 1, 2], lambda diffs, a, b: (-1.0, 2.0))
    assert line == "- cola: dynamic − lora +1.33 [-1.00, +2.00]"  # (2 - 1 + 3) / 3
    assert "adalora" not in line


def _predictions(root, task, method, seed, predictions, gold):
    import json

    run = root / task / method / f"seed{seed}"
    run.mkdir(parents=True)
    lines = [json.dumps({"label": g, "prediction": p}) for p, g in zip(predictions, gold, strict=True)]
    (run / "predictions.jsonl").write_text("\n".join(lines) + "\n")


def test_a_one_seed_table_takes_its_interval_over_the_same_resampled_dev_examples(tmp_path):
    from glue_v2 import Resampled

    gold = [1, 0] * 50
    runs = {"dynamic": list(gold), "lora": list(gold), "peft-adalora": [1 - g for g in gold[:20]] + gold[20:]}
    for method, predictions in runs.items():
        _predictions(tmp_path, "sst2", method, 0, predictions, gold)
    score = {("sst2", "dynamic", 0): 100.0, ("sst2", "lora", 0): 100.0, ("sst2", "peft-adalora", 0): 80.0}
    interval = Resampled(tmp_path, {"seeds": [0], "base": {}}, score, rounds=500)
    assert interval({"sst2": [0.0]}, "dynamic", "lora") == (0.0, 0.0)  # the same answers on every resample
    low, high = interval({"sst2": [20.0]}, "dynamic", "peft-adalora")
    assert 10 < low < 20 < high < 30  # 20 examples of 100 differ: ~ ±2·sqrt(0.2·0.8/100)
    score[("sst2", "lora", 0)] = 90.0  # predictions that do not give the recorded score are refused
    with pytest.raises(SystemExit, match="does not reproduce the run's recorded score"):
        Resampled(tmp_path, {"seeds": [0], "base": {}}, score, rounds=500)({"sst2": [10.0]}, "dynamic", "lora")


def test_a_several_seed_interval_counts_the_seeds_spread_as_well_as_the_examples(tmp_path):
    from glue_v2 import Resampled

    gold = [1, 0] * 50

    def interval(root, misses):
        """dynamic right on every example; lora misses misses[seed] of the 100 examples on each seed."""
        score = {}
        for seed, k in enumerate(misses):
            _predictions(root, "sst2", "dynamic", seed, gold, gold)
            _predictions(root, "sst2", "lora", seed, [1 - g for g in gold[:k]] + gold[k:], gold)
            score |= {("sst2", "dynamic", seed): 100.0, ("sst2", "lora", seed): 100.0 - k}
        plan = {"seeds": list(range(len(misses))), "base": {}}
        return Resampled(root, plan, score, rounds=1000)({"sst2": list(misses)}, "dynamic", "lora")

    steady_low, steady_high = interval(tmp_path / "steady", (10, 10, 10))
    spread_low, spread_high = interval(tmp_path / "spread", (0, 10, 20))
    assert steady_low < 10 < steady_high and spread_low < 10 < spread_high
    # the same mean difference, but seeds that disagree widen the interval beyond the examples' own sampling error
    assert spread_high - spread_low > 1.5 * (steady_high - steady_low)


def test_a_screening_row_with_every_seed_is_summarised_against_each_reference():
    from glue_v2 import best_of_tricks, screening, screening_means

    methods = ["dynamic", "lora", "peft-rslora", "peft-eva"]
    plan = {"tasks": ["cola"], "methods": methods, "seeds": [0, 1], "per_method": {"cand": {}, "other": {}}}
    values = {("dynamic", 0): 20, ("dynamic", 1): 24, ("lora", 0): 25, ("peft-rslora", 0): 21, ("peft-rslora", 1): 22}
    score = {("cola", m, s): v for (m, s), v in values.items()}
    score |= {("cola", "cand", 0): 23.0, ("cola", "cand", 1): 26.0, ("cola", "other", 0): 30.0}
    assert best_of_tricks(score, ["cola"], methods, [0, 1]) is None  # EVA has not finished
    score |= {("cola", "peft-eva", 0): 10.0, ("cola", "peft-eva", 1): 12.0}
    best = best_of_tricks(score, ["cola"], methods, [0, 1])
    assert best == "peft-rslora"
    refs = ("dynamic", "lora", best)
    lines = screening_means(score, plan, lambda diffs, a, b: (-9.0, 9.0), refs)
    # lora lacks seed 1; "other" lacks seed 1
    assert lines == ["- cola: cand − dynamic +2.50 [-9.00, +9.00]; − peft-rslora +3.00 [-9.00, +9.00]"]
    assert (
        screening(score, plan, refs)[0]
        == "| cola | cand | 0 | 23.00 | +3.00 vs dynamic; -2.00 vs lora; +2.00 vs peft-rslora |"
    )


@pytest.mark.parametrize(
    "name", ["glue_v2_plan.yaml", "glue_v2_qv_plan.yaml", "decoder_plan.yaml", "glue_plan.yaml", "design_plan.yaml"]
)
def test_every_row_of_a_shipped_plan_builds_its_settings(name):
    """A typo in a screening row would otherwise fail hours into a benchmark."""
    import yaml

    from dynlora.training.compare import plan_from

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "benchmarks" / name).read_text())
    rows = sorted({*data.get("methods", []), *(data.get("per_method") or {})})
    plan = plan_from(data, name, {}, methods=",".join(rows))
    plan.check()


def test_a_target_line_is_met_only_when_its_whole_interval_clears_the_target_and_says_why_a_line_is_open():
    from glue_v2 import margin_lines

    score = {("sst2", "dynamic", 0): 90.0, ("sst2", "lora", 0): 88.5}
    methods = ["dynamic", "lora", "peft-adalora"]
    lines, chart = margin_lines(score, ["sst2"], methods, [0], lambda d, a, b: (1.0, 2.5))
    assert (
        lines[0]
        == "- Dynamic LoRA ≥ lora + 1.0: +1.50 [+1.00, +2.50] → **met** (the whole interval is at or above +1.0)"
    )
    assert lines[1].endswith("(not every run has finished)")  # AdaLoRA is in the plan, not finished
    assert lines[2].endswith("(none of them is in this plan yet)")  # no EVA / rsLoRA / LoRA+ row in the plan
    assert chart == {"lora": (1.5, 1.0, 2.5)}
    # The same mean with an interval that reaches below the target is not shown.
    lines, _ = margin_lines(score, ["sst2"], methods, [0], lambda d, a, b: (0.5, 2.5))
    assert "**not met**: the mean is at or above +1.0, but the interval reaches below it" in lines[0]
    score[("sst2", "lora", 0)] = 89.5
    lines, _ = margin_lines(score, ["sst2"], methods, [0], lambda d, a, b: (-0.5, 1.5))
    assert lines[0].endswith("**not met** (the mean is below +1.0)")


def test_the_fused_adapter_paths_compute_what_separate_adapters_do():
    import torch
    from fused_adapters import fused, make_group, separate

    group = make_group((48, 16, 16), 10, torch.Generator().manual_seed(0))
    x = torch.randn(10, 576, generator=torch.Generator().manual_seed(1))
    reference = separate(x, group)
    for stored in (False, True):
        torch.testing.assert_close(fused(x, group, stored), reference)
