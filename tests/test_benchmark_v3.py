"""Protocol v3's report arithmetic (benchmarks/v3_report.py) on made-up committed files: the lr each method is
scored at, the scores of answers and of documents, and the paired intervals its target lines are decided by."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from v3_report import Table, frontier, units  # noqa: E402

PLAN = {
    "lr_grid": [1e-4, 1e-3],
    "selection_seed": 0,
    "seeds": [0, 1],
    "methods": ["dynamic", "lora"],
    "base": {"adapter": {"rank": 8}},
    "tables": {"sst2": {"train": {"objective": "instruct"}}, "stdlib": {"train": {"objective": "lm"}}},
}


def write(root: Path, table: str, runs: list[dict], predictions: dict) -> None:
    (root / table).mkdir(parents=True)
    (root / table / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    for (name, seed), rows in predictions.items():
        (root / table / name).mkdir(exist_ok=True)
        (root / table / name / f"seed{seed}.predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(method: str, lr: float, seed: int, held_out: float | None) -> dict:
    record = {"variant": f"{method}-lr{lr:.1e}", "method": method, "lr": lr, "rank": 8, "seed": seed, "curve": []}
    record["trainable_parameters"] = 5
    return record | ({"best": {"score": held_out, "step": 50}} if held_out is not None else {"diverged": "x"})


def answers(right: int, n: int = 100) -> list[dict]:
    return [{"label": 1, "prediction": int(i < right)} for i in range(n)]


GRID = [
    run("dynamic", 1e-4, 0, 0.7),
    run("dynamic", 1e-3, 0, 0.8),
    run("lora", 1e-4, 0, 0.9),
    run("lora", 1e-3, 0, None),
]


def test_each_method_is_scored_at_the_lr_of_its_best_held_out_run(tmp_path):
    write(tmp_path, "sst2", GRID, {})
    table = Table("sst2", PLAN, tmp_path)
    assert table.chosen("dynamic") == "dynamic-lr1.0e-03" and table.chosen("lora") == "lora-lr1.0e-04"  # diverged: out
    write(tmp_path / "b", "sst2", GRID[:3], {})
    assert Table("sst2", PLAN, tmp_path / "b").chosen("lora") is None  # not before its whole grid has run


def test_identical_answers_differ_by_exactly_zero_and_flipped_ones_by_their_share(tmp_path):
    same = {(n, s): answers(80) for n in ("dynamic-lr1.0e-03", "lora-lr1.0e-04") for s in (0, 1)}
    write(tmp_path, "sst2", GRID, same)
    table = Table("sst2", PLAN, tmp_path)
    assert table.interval("dynamic-lr1.0e-03", "lora-lr1.0e-04") == (0.0, 0.0, 0.0, 2)
    worse = {**same, ("lora-lr1.0e-04", 0): answers(60), ("lora-lr1.0e-04", 1): answers(60)}
    write(tmp_path / "b", "sst2", GRID, worse)
    mean, low, high, n = Table("sst2", PLAN, tmp_path / "b").interval("dynamic-lr1.0e-03", "lora-lr1.0e-04")
    assert mean == pytest.approx(20.0) and low < 20 < high and low > 10 and n == 2  # 20 answers in 100 flipped


def test_seeds_that_disagree_widen_the_interval_beyond_the_examples_own(tmp_path):
    steady = {("a", s): answers(70) for s in (0, 1)} | {("b", s): answers(60) for s in (0, 1)}
    swinging = {("a", 0): answers(90), ("a", 1): answers(50)} | {("b", s): answers(60) for s in (0, 1)}
    write(tmp_path / "steady", "sst2", [], steady)
    write(tmp_path / "swinging", "sst2", [], swinging)
    narrow = Table("sst2", PLAN, tmp_path / "steady").interval("a", "b")
    wide = Table("sst2", PLAN, tmp_path / "swinging").interval("a", "b")
    assert narrow[0] == wide[0] == pytest.approx(10.0) and wide[2] - wide[1] > narrow[2] - narrow[1]


def test_the_frontier_has_no_verdict_until_a_pair_of_budgets_is_scored(tmp_path):
    plan = PLAN | {"frontier": {"ranks": [4], "methods": ["dynamic", "lora"]}}
    write(tmp_path, "sst2", GRID, {})  # both lrs chosen, no frontier run scored yet
    lines, _figure = frontier(plan, Table("sst2", plan, tmp_path))
    assert not any("Verdict" in line for line in lines)
    small = run("dynamic", 1e-3, 0, 0.8) | {"variant": "dynamic-lr1.0e-03-r4", "rank": 4}
    runs = [r | {"trainable_parameters": 100 * r["rank"]} for r in [*GRID, small]]
    scored = {("dynamic-lr1.0e-03-r4", s): answers(80) for s in (0, 1)}
    write(tmp_path / "b", "sst2", runs, scored | {("lora-lr1.0e-04", s): answers(70) for s in (0, 1)})
    lines, _figure = frontier(plan, Table("sst2", plan, tmp_path / "b"))
    assert lines[0] == "- Verdict: **met** at rank 4"  # rank 4 at +10 points over rank 8
    fewer = plan | {"seeds": [0, 1, 2]}  # a third seed planned, not run
    assert frontier(fewer, Table("sst2", fewer, tmp_path / "b"))[0][0] == (
        "- Verdict: **met** at rank 4, **partial**: 2 of 3 seeds"
    )
    assert not any("same budget" in line for line in lines)  # static LoRA at rank 4 is not scored yet
    more = run("lora", 1e-4, 0, 0.7) | {"variant": "lora-lr1.0e-04-r4", "rank": 4, "trainable_parameters": 400}
    (tmp_path / "b" / "sst2" / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*runs, more]))
    for s in (0, 1):
        (tmp_path / "b" / "sst2" / "lora-lr1.0e-04-r4").mkdir(exist_ok=True)
        rows = "".join(json.dumps(r) + "\n" for r in answers(60))
        (tmp_path / "b" / "sst2" / "lora-lr1.0e-04-r4" / f"seed{s}.predictions.jsonl").write_text(rows)
    lines, _figure = frontier(plan, Table("sst2", plan, tmp_path / "b"))
    same = [line for line in lines if line.startswith("- Dynamic LoRA − static LoRA at rank")]
    assert len(same) == 1  # rank 8: Dynamic LoRA's own run is not scored here
    assert lines[-1].startswith("- static LoRA at rank 8 − at rank 4: +10.00 [")  # 70 against 60 answers right
    assert same[0].startswith("- Dynamic LoRA − static LoRA at rank 4: +20.00 [")  # 80 against 60 answers right


def test_the_frontier_says_not_met_for_good_only_once_every_pair_and_seed_is_scored(tmp_path):
    plan = PLAN | {"frontier": {"ranks": [2, 4], "methods": ["dynamic", "lora"]}}
    small = run("dynamic", 1e-3, 0, 0.8) | {"variant": "dynamic-lr1.0e-03-r4", "rank": 4}
    scored = {("dynamic-lr1.0e-03-r4", s): answers(60) for s in (0, 1)}
    write(tmp_path, "sst2", [*GRID, small], scored | {("lora-lr1.0e-04", s): answers(70) for s in (0, 1)})
    verdict = frontier(plan, Table("sst2", plan, tmp_path))[0][0]
    assert verdict == "- Verdict: **not met** at any rank run so far"  # rank 2 against rank 4: not run yet
    whole = plan | {"frontier": {"ranks": [4], "methods": ["dynamic", "lora"]}}
    assert frontier(whole, Table("sst2", whole, tmp_path))[0][0] == "- Verdict: **not met** at any rank"
    fewer = whole | {"seeds": [0, 1, 2]}
    assert frontier(fewer, Table("sst2", fewer, tmp_path))[0][0] == (
        "- Verdict: **not met** at any rank run so far, **partial**: 2 of 3 seeds"
    )


def test_the_frontier_waits_for_a_method_whose_lr_is_not_chosen_yet(tmp_path):
    plan = PLAN | {"frontier": {"ranks": [4], "methods": ["dynamic", "lora"]}}
    dynamic = [r for r in GRID if r["method"] == "dynamic"]
    write(tmp_path, "sst2", dynamic, {("dynamic-lr1.0e-03", s): answers(80) for s in (0, 1)})  # static LoRA: no run
    lines, _figure = frontier(plan, Table("sst2", plan, tmp_path))
    assert all(line.endswith(": —") for line in lines if line.startswith("- Dynamic LoRA at rank"))
    assert not any("same budget" in line for line in lines)


def test_a_code_document_scores_by_its_tokens_not_by_its_blocks():
    rows = [
        {"document": 3, "loss_sum": 10.0, "tokens": 4},
        {"document": 3, "loss_sum": 2.0, "tokens": 4},
        {"document": 7, "loss_sum": 3.0, "tokens": 1},
    ]
    num, den = units("loss", rows)
    assert list(num) == [-12.0, -3.0] and list(den) == [8, 1]  # per document: summed loss and tokens
    assert num.sum() / den.sum() == pytest.approx(-15 / 9)  # minus the mean loss per token


def test_a_candidate_screened_on_another_adds_its_settings_to_that_ones():
    import v3

    candidates = {
        "a": {"adapter": {"input_adaptive": None, "rslora": True}},
        "b": {"on_top_of": "a", "adapter": {"rslora": False}},
    }
    assert v3.candidate_change(candidates, "b") == {"input_adaptive": None, "rslora": False}
    with pytest.raises(ValueError, match="on 'c', which is not a candidate"):
        v3.candidate_change({"b": {"on_top_of": "c"}}, "b")


def test_a_screened_candidate_runs_in_its_own_directory_with_its_adapter_change():
    import v3

    plan = v3.load_plan(Path(__file__).resolve().parents[1] / "benchmarks" / "v3_plan.yaml")
    plain = v3.run_settings(plan, "stdlib", "dynamic", 4.6e-4, 0, Path("out"), None)
    changed = v3.run_settings(plan, "stdlib", "dynamic", 4.6e-4, 0, Path("out"), None, ("ga", {"init": "lora-ga"}))
    assert plain["output_dir"] != changed["output_dir"] == str(Path("out/stdlib/screen-ga-lr4.6e-04/seed0"))
    assert changed["adapter"] == {**plain["adapter"], "init": "lora-ga"}
    assert "default" in plan["screen"]["candidates"]  # what every candidate is judged against


def test_a_tables_run_limited_to_one_method_trains_that_methods_row_alone(tmp_path, monkeypatch):
    import v3

    plan = v3.load_plan(Path(__file__).resolve().parents[1] / "benchmarks" / "v3_plan.yaml")
    plan["results_dir"] = tmp_path
    trained = []
    monkeypatch.setattr(v3, "train_once", lambda settings, results, name: trained.append(name) or {})
    monkeypatch.setattr(v3, "score_chosen", lambda *args: None)
    v3.run_table(plan, "sst2", tmp_path / "out", only="peft-rslora")
    assert trained == [v3.variant("peft-rslora", lr) for lr in plan["lr_grid"]]  # its grid; seeds wait for the choice
    with pytest.raises(SystemExit, match="--only full: not a method of table sst2"):
        v3.run_table(plan, "sst2", tmp_path / "out", only="full")


def test_a_run_another_process_is_training_is_skipped_not_trained_twice(tmp_path):
    import fcntl

    import v3

    plan = v3.load_plan(Path(__file__).resolve().parents[1] / "benchmarks" / "v3_plan.yaml")
    settings = v3.run_settings(plan, "stdlib", "dynamic", 4.6e-4, 1, tmp_path / "out", None)
    run_dir = Path(settings["output_dir"])
    run_dir.parent.mkdir(parents=True)
    with open(run_dir.parent / f"{run_dir.name}.lock", "w") as held:  # as the other process holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        assert v3.train_once(settings, tmp_path / "runs.jsonl", "dynamic-lr4.6e-04") == {}
    assert not run_dir.exists() and not (tmp_path / "runs.jsonl").exists()
    done = {"variant": "dynamic-lr4.6e-04", "seed": 1, "best": {"score": -2.7}}
    (tmp_path / "runs.jsonl").write_text(json.dumps(done) + "\n")
    assert v3.train_once(settings, tmp_path / "runs.jsonl", "dynamic-lr4.6e-04") == done  # finished: not run again


def lost_run(tmp_path: Path) -> tuple[dict, dict, dict, Path]:
    """The plan, the settings and the record of a chosen run whose directory is gone before it was scored."""
    import v3

    plan = v3.load_plan(Path(__file__).resolve().parents[1] / "benchmarks" / "v3_plan.yaml")
    plan["results_dir"] = tmp_path / "results"
    settings = v3.run_settings(plan, "sst2", "peft-rslora", 1e-4, 0, tmp_path / "out", None)
    record = {"variant": "peft-rslora-lr1.0e-04", "seed": 0, "curve": [[50, 0.8], [100, 0.9]], "best": {"score": 0.9}}
    results = plan["results_dir"] / "sst2" / "runs.jsonl"
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps(record) + "\n")
    return plan, settings, record, results


def test_a_chosen_run_whose_directory_was_lost_unscored_is_trained_again_then_scored(tmp_path, monkeypatch, capsys):
    import subprocess

    import v3

    plan, settings, record, results = lost_run(tmp_path)

    def train(settings, results, name, run_dir):
        (run_dir / "best").mkdir(parents=True)
        again = {**record, "curve": [(50, 0.8), (100, 0.9)]}  # as train() returns it: tuples, not yet JSON
        v3.append_result(results, again)
        return again

    def dynlora_eval(command, **kwargs):
        assert command[command.index("--adapter") + 1] == str(Path(settings["output_dir"]) / "best")
        Path(command[command.index("--predictions") + 1]).write_text('{"label": 1, "prediction": 1}\n')
        return subprocess.CompletedProcess(command, 0, "validation: accuracy 1.0", "")

    monkeypatch.setattr(v3, "train", train)
    monkeypatch.setattr(v3.subprocess, "run", dynlora_eval)
    v3.score(plan, "sst2", record, settings, results)
    assert (results.parent / "peft-rslora-lr1.0e-04" / "seed0.predictions.jsonl").is_file()
    assert len(results.read_text().splitlines()) == 2  # the new record is appended, the old one kept
    printed = capsys.readouterr().out
    assert "its adapter is gone unscored; training it again" in printed and "held-out curve reproduced" in printed


def test_a_run_another_process_is_training_is_not_scored_from_its_unfinished_best(tmp_path, monkeypatch):
    import fcntl

    import v3

    plan, settings, record, results = lost_run(tmp_path)
    run_dir = Path(settings["output_dir"])
    (run_dir / "best").mkdir(parents=True)  # saved at an early evaluation of the run the other process trains
    monkeypatch.setattr(v3.subprocess, "run", lambda *args, **kwargs: pytest.fail("scored an unfinished run"))
    with open(run_dir.parent / f"{run_dir.name}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        v3.score(plan, "sst2", record, settings, results)
    assert not (results.parent / "peft-rslora-lr1.0e-04").exists()


def test_a_failed_scoring_stops_with_the_evaluations_own_error_line(tmp_path, monkeypatch):
    import subprocess

    import v3

    plan, settings, record, results = lost_run(tmp_path)
    (Path(settings["output_dir"]) / "best").mkdir(parents=True)
    message = "Error: best is not a Dynamic LoRA adapter directory: dynlora_config.json is missing"
    failed = subprocess.CompletedProcess([], 2, "", f"Loading weights\n{message}\n")
    monkeypatch.setattr(v3.subprocess, "run", lambda command, **kwargs: failed)
    with pytest.raises(SystemExit, match=f"scoring peft-rslora-lr1.0e-04 seed 0 failed: {message}"):
        v3.score(plan, "sst2", record, settings, results)
    assert not (results.parent / "peft-rslora-lr1.0e-04" / "seed0.predictions.jsonl").exists()


def test_a_run_trained_again_is_read_by_its_last_record(tmp_path):
    again = run("lora", 1e-4, 0, 0.6)  # now below its 1e-3 run's 0.7: 1e-3 is chosen
    write(tmp_path, "sst2", [*GRID[:2], run("lora", 1e-4, 0, 0.9), run("lora", 1e-3, 0, 0.7), again], {})
    table = Table("sst2", PLAN, tmp_path)
    assert len(table.runs) == 4 and table.chosen("lora") == "lora-lr1.0e-03"


def test_the_screen_reports_each_candidate_against_what_it_is_screened_on_at_its_lr(tmp_path):
    from v3_report import screen_lines

    (tmp_path / "stdlib").mkdir()
    rows = [
        {"variant": "screen-default-lr4.6e-04", "lr": 4.6e-4, "best": {"score": -2.80, "step": 200}},
        {"variant": "screen-lora-ga-lr4.6e-04", "lr": 4.6e-4, "best": {"score": -2.75, "step": 150}},
        {"variant": "screen-rslora-lr1.0e-04", "lr": 1e-4, "best": {"score": -2.70, "step": 200}},
        {"variant": "screen-start-ratio-1.5-lr4.6e-04", "lr": 4.6e-4, "diverged": "x"},
        {"variant": "screen-gate-lr4.6e-04", "lr": 4.6e-4, "best": {"score": -2.74, "step": 200}},
    ]
    rows = [r | {"seed": 0} for r in rows]
    for row in rows:
        row["trainable_parameters"] = 100
    rows[1]["peak_trainable_parameters"] = 150
    (tmp_path / "stdlib" / "screen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    candidates = {
        "lora-ga": {"adapter": {"init": "lora-ga", "start_ratio": 1.5}},
        "gate": {"on_top_of": "lora-ga", "adapter": {"input_adaptive": "per_example"}},
    }
    lines = screen_lines(Table("stdlib", {**PLAN, "screen": {"candidates": candidates}}, tmp_path))
    assert "| lora-ga | init=lora-ga, start_ratio=1.5 | 4.6e-04 | 100 (150) | -2.7500 @150 | +0.0500 |" in lines
    assert "| gate | input_adaptive=per_example (on lora-ga) | 4.6e-04 | 100 | -2.7400 @200 | +0.0100 |" in lines
    assert any(line.startswith("| rslora |") and line.endswith("| — |") for line in lines)  # no default at 1e-4
    assert any("start-ratio-1.5" in line and "diverged" in line for line in lines)


def test_a_confirmed_candidate_is_compared_on_the_reported_set_with_dynamic_lora_and_every_baseline(tmp_path):
    from v3_report import screen_lines

    candidate = "screen-x-lr1.0e-03"
    scored = {("dynamic-lr1.0e-03", s): answers(80) for s in (0, 1)}
    scored |= {("lora-lr1.0e-04", s): answers(70) for s in (0, 1)} | {(candidate, s): answers(90) for s in (0, 1)}
    scored |= {("peft-rslora-lr1.0e-04", s): answers(85) for s in (0, 1)}
    write(tmp_path, "sst2", [*GRID, run("peft-rslora", 1e-4, 0, 0.9), run("peft-rslora", 1e-3, 0, 0.8)], scored)
    screen = [{"variant": candidate, "lr": 1e-3, "seed": s, "best": {"score": 0.9, "step": 50}} for s in (0, 1)]
    (tmp_path / "sst2" / "screen.jsonl").write_text(
        "".join(json.dumps(r | {"trainable_parameters": 1}) + "\n" for r in screen)
    )
    lines = screen_lines(Table("sst2", {**PLAN, "methods": ["dynamic", "lora", "peft-rslora"]}, tmp_path))
    assert sum(line.startswith("| x |") for line in lines) == 1  # the screen row is seed 0's
    assert any(line.startswith("- x-lr1.0e-03 − Dynamic LoRA: +10.00 [") and "(n=2)" in line for line in lines)
    assert any(line.startswith("- x-lr1.0e-03 − static LoRA: +20.00 [") and "(n=2)" in line for line in lines)
    assert any(line.startswith("- x-lr1.0e-03 − PEFT rsLoRA: +5.00 [") and "(n=2)" in line for line in lines)


def test_the_verdicts_take_the_adopted_default_once_it_is_scored_on_the_table_and_say_which_they_took(tmp_path):
    from v3_report import score_table, target_lines

    candidate = "screen-x-lr1.0e-03"
    scored = {("dynamic-lr1.0e-03", s): answers(80) for s in (0, 1)} | {
        ("lora-lr1.0e-04", s): answers(70) for s in (0, 1)
    }
    scored[("untrained", 0)] = answers(50)  # the floor's predictions: a directory whose name is no run's
    scored[("screen-x-lr1.0e-03-r2", 0)] = answers(60)  # the candidate on the frontier: not its rank-8 row
    write(tmp_path, "sst2", GRID, scored)
    plan = {**PLAN, "methods": ["dynamic", "lora"], "screen": {"adopted": "x", "candidates": {"x": {}}}}
    before = target_lines(Table("sst2", plan, tmp_path))
    assert "x, is not scored on this table yet" in before[0] and "+10.00 [" in before[2]  # the old default's row
    for s in (0, 1):
        (tmp_path / "sst2" / candidate).mkdir(exist_ok=True)
        (tmp_path / "sst2" / candidate / f"seed{s}.predictions.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in answers(90))
        )
    (tmp_path / "sst2" / "screen.jsonl").write_text(
        json.dumps({"variant": candidate, "lr": 1e-3, "seed": 0, "best": {"score": 0.9}, "trainable_parameters": 7})
    )
    table = Table("sst2", plan, tmp_path)
    after = target_lines(table)
    assert "its default since issue 34: x" in after[0] and after[2].startswith(
        "- **Target: Dynamic LoRA ≥ static LoRA**: +20.00 ["
    )
    assert "| Dynamic LoRA, its default since issue 34 (x) | 1.0e-03 | 7 | 90.00 ± 0.00 (n=2) |" in score_table(table)


def test_a_dynamic_row_begun_before_the_adoption_runs_its_grid_alone_once_the_adopted_default_is_confirmed(
    tmp_path, monkeypatch
):
    import v3

    plan = v3.load_plan(Path(__file__).resolve().parents[1] / "benchmarks" / "v3_plan.yaml")
    plan["results_dir"] = tmp_path
    grid = [v3.variant("dynamic", lr) for lr in plan["lr_grid"]]
    records = [run("dynamic", lr, 0, 0.8 + lr) for lr in plan["lr_grid"]]
    write(tmp_path, "sst2", records, {})
    trained = []
    monkeypatch.setattr(v3, "train_once", lambda settings, results, name: trained.append(name) or {})
    monkeypatch.setattr(v3, "score_chosen", lambda *args: None)
    v3.run_table(plan, "sst2", tmp_path / "out", only="dynamic")
    assert trained == grid  # no other seed: the adopted default's confirmation is the row judged
    assert Table("sst2", plan, tmp_path).progress() == (4, 4 + 3 * (4 + 2))  # the baselines' grids and seeds to go
    plan["screen"]["confirm"] = []  # not confirmed (yet): the row runs every seed
    trained.clear()
    v3.run_table(plan, "sst2", tmp_path / "out", only="dynamic")
    assert trained == grid + [grid[-1]] * 2


def test_an_interval_is_the_same_whichever_intervals_were_drawn_before_it(tmp_path):
    rights = {"dynamic-lr1.0e-03": (80, 88, 75), "lora-lr1.0e-04": (70, 71, 78)}  # seeds that differ
    write(tmp_path, "sst2", GRID, {(run, s): answers(rights[run][s]) for run in rights for s in (0, 1, 2)})
    first = Table("sst2", PLAN, tmp_path).interval("dynamic-lr1.0e-03", "lora-lr1.0e-04")
    table = Table("sst2", PLAN, tmp_path)
    table.interval("lora-lr1.0e-04", "dynamic-lr1.0e-03")
    assert table.interval("dynamic-lr1.0e-03", "lora-lr1.0e-04") == first


@pytest.mark.parametrize(
    "stem", ["lora", "peft-adalora", "screen-no-input-norm-start-ratio-1.5", "screen-rank-moves-2"]
)
@pytest.mark.parametrize("lr", [1e-4, 4.6e-4, 2.2e-3, 1e-2])
@pytest.mark.parametrize("rank", [None, 1, 4])
def test_a_run_name_parses_back_into_what_named_it_and_moves_to_another_rank(stem, lr, rank):
    from v3 import at_rank, name_parts, variant

    name = variant(stem, lr, rank)
    assert name_parts(name) == (stem, f"{lr:.1e}", rank)
    assert name_parts(at_rank(name, 2)) == (stem, f"{lr:.1e}", 2)
    with pytest.raises(ValueError, match="not a v3 run name"):
        name_parts(stem)


def test_a_table_of_its_own_methods_seeds_and_target_judges_over_its_baseline_by_the_margin(tmp_path):
    from v3_report import selection_lines, target_lines

    plan = PLAN | {"lr_grids": {"full": [1e-5, 1e-4]}}
    plan["tables"] = plan["tables"] | {
        "enc": {
            "train": {"objective": "classify"},
            "methods": ["dynamic", "lora", "full"],
            "seeds": [0, 1, 2],
            "dynamic": "x",
            "target": {"over": "lora", "margin": 1.0},
        }
    }
    plan["screen"] = {"adopted": "x", "candidates": {"x": {}}}
    runs = [*GRID, run("full", 1e-5, 0, 0.95), run("full", 1e-4, 0, None)]
    rights = {"dynamic-lr1.0e-03": 850, "lora-lr1.0e-04": 840, "full-lr1.0e-05": 900}
    write(tmp_path, "enc", runs, {(r, s): answers(n, 1000) for r, n in rights.items() for s in (0, 1, 2)})
    table = Table("enc", plan, tmp_path)
    lines = target_lines(table)
    assert lines[0] == "Dynamic LoRA here is its default since issue 34: x (its own row)."
    # +1.00 exactly: 10 of 1000 answers, at the margin's edge but below it on part of the resampled rounds
    assert lines[2].startswith("- **Target: Dynamic LoRA ≥ static LoRA + 1**: +1.00 [")
    assert lines[2].endswith("→ **not met**")
    assert any(
        line.startswith("- full fine-tuning (every weight: the ceiling) − Dynamic LoRA: +5.00 [") for line in lines
    )
    assert not any("− full fine-tuning" in line for line in lines)  # the ceiling is no baseline
    full_row = next(line for line in selection_lines(table) if line.startswith("| full fine-tuning"))
    assert "95.00 @50 (lr 1.0e-05) | diverged (lr 1.0e-04) | 1.0e-05 |" in full_row  # its own grid, chosen on it
    wider = {**rights, "dynamic-lr1.0e-03": 900}
    write(tmp_path / "b", "enc", runs, {(r, s): answers(n, 1000) for r, n in wider.items() for s in (0, 1, 2)})
    assert target_lines(Table("enc", plan, tmp_path / "b"))[2].endswith("→ **met**")  # +6 points, all above 1


def test_a_table_whose_row_ran_as_an_earlier_default_is_judged_by_the_later_default_once_it_is_scored(tmp_path):
    from v3_report import score_table, target_lines

    plan = {**PLAN, "screen": {"adopted": "new", "confirm": ["new"], "candidates": {"old": {}, "new": {}}}}
    plan["tables"] = {**PLAN["tables"], "sst2": {**PLAN["tables"]["sst2"], "dynamic": "old"}}
    write(tmp_path, "sst2", GRID, {("dynamic-lr1.0e-03", s): answers(80) for s in (0, 1)})
    assert target_lines(Table("sst2", plan, tmp_path))[0] == (
        "Dynamic LoRA here is the table's Dynamic LoRA row (old): its default since issue 34, new, is not scored on "
        "this table yet."
    )
    for s in (0, 1):
        (tmp_path / "sst2" / "screen-new-lr1.0e-03").mkdir(exist_ok=True)
        (tmp_path / "sst2" / "screen-new-lr1.0e-03" / f"seed{s}.predictions.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in answers(90))
        )
    table = Table("sst2", plan, tmp_path)
    assert target_lines(table)[0] == "Dynamic LoRA here is its default since issue 34: new (the screen below)."
    assert any(line.startswith("| Dynamic LoRA (old) | 1.0e-03 |") for line in score_table(table))


def test_a_table_begun_after_an_adoption_runs_dynamic_lora_as_the_candidate_it_names_and_full_on_its_own_grid():
    import v3

    plan = v3.load_plan(Path(__file__).resolve().parents[1] / "benchmarks" / "v3_plan.yaml")
    encoder = v3.run_settings(plan, "sst2-encoder", "dynamic", 4.6e-4, 0, Path("out"), None)
    ran_as = v3.candidate_change(plan["screen"]["candidates"], plan["tables"]["sst2-encoder"]["dynamic"])
    assert encoder["adapter"] == {**encoder["adapter"], **ran_as} and encoder["model"] == "minilm"
    assert v3.run_settings(plan, "stdlib", "dynamic", 4.6e-4, 0, Path("out"), None)["adapter"] != encoder["adapter"]
    assert v3.lr_grid(plan, "full") != v3.lr_grid(plan, "lora") == plan["lr_grid"]
    grid = v3.lr_grid(plan, "full")
    records = [{"method": "full", "lr": lr, "seed": 0, "rank": 8, "best": {"score": -abs(lr - grid[1])}} for lr in grid]
    assert v3.chosen_lr(plan, records, "full") == grid[1]
    assert v3.chosen_lr(plan, records[:-1], "full") is None  # not before its whole grid has run


def test_a_candidate_at_a_frontier_rank_is_judged_against_the_frontier_run_it_is_on(tmp_path):
    import v3
    from v3_report import screen_lines

    plan = v3.load_plan(Path(__file__).resolve().parents[1] / "benchmarks" / "v3_plan.yaml")
    change = ("r1-x", {"min_rank": 0})
    settings = v3.run_settings(plan, "stdlib", "dynamic", 4.6e-4, 0, Path("out"), 1, change)
    assert settings["output_dir"] == str(Path("out/stdlib/screen-r1-x-lr4.6e-04-r1/seed0"))
    assert (settings["adapter"]["rank"], settings["adapter"]["alpha"], settings["adapter"]["min_rank"]) == (1, 2.0, 0)
    (tmp_path / "stdlib").mkdir()
    frontier = {"variant": "screen-a-lr4.6e-04-r1", "method": "dynamic", "lr": 4.6e-4, "rank": 1, "seed": 0}
    frontier["best"] = {"score": -2.80, "step": 200}
    rank_8 = {"variant": "screen-a-lr4.6e-04", "lr": 4.6e-4, "seed": 0, "best": {"score": -2.70, "step": 200}}
    mine = {"variant": "screen-r1-x-lr4.6e-04-r1", "lr": 4.6e-4, "seed": 0, "best": {"score": -2.78, "step": 200}}
    rows = [r | {"trainable_parameters": 10} for r in (rank_8, mine)]
    (tmp_path / "stdlib" / "screen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "stdlib" / "runs.jsonl").write_text(json.dumps(frontier | {"trainable_parameters": 10}) + "\n")
    candidates = {"a": {}, "r1-x": {"on_top_of": "a", "rank": 1, "adapter": {"min_rank": 0}}}
    lines = screen_lines(Table("stdlib", {**PLAN, "screen": {"candidates": candidates}}, tmp_path))
    assert "| r1-x | rank=1, min_rank=0 (on a) | 4.6e-04 | 10 | -2.7800 @200 | +0.0200 |" in lines  # not −0.08
