"""The comparison plan: settings layering, method variants, resumable results (no training: a recording train_fn)."""

from dynlora.training.compare import ComparePlan, read_results, run_comparison, summary_table


def plan(tmp_path) -> ComparePlan:
    return ComparePlan(
        tasks=["cola", "rte"],
        methods=["dynamic", "dynamic-noinput"],
        seeds=[0, 1],
        output_dir=str(tmp_path),
        base={"lr": 1e-3, "adapter": {"rank": 8}},
        per_task={"rte": {"epochs": 2, "adapter": {"rank": 4}}},
        per_method={"dynamic-noinput": {"method": "dynamic", "adapter": {"input_adaptive": None}}},
    )


def test_settings_layer_and_variants_run_their_method(tmp_path):
    p = plan(tmp_path)
    s = p.settings("rte", "dynamic-noinput", 1)
    assert s["method"] == "dynamic" and s["epochs"] == 2 and s["lr"] == 1e-3
    assert s["adapter"] == {"rank": 4, "input_adaptive": None}  # adapter dicts merge key by key
    assert s["output_dir"].endswith("rte/dynamic-noinput/seed1")
    assert p.settings("cola", "dynamic", 0)["adapter"] == {"rank": 8}


def test_results_keep_the_variant_name_and_resume(tmp_path):
    calls = []

    def train(settings):
        calls.append((settings["task"], settings["method"], settings["seed"], settings["resume"]))
        peak = 10 if "input_adaptive" in settings["adapter"] else 15  # dynamic-noinput's / dynamic's start
        metrics = {"validation": {"main": 0.1 * len(calls)}}
        return {"metrics": metrics, "trainable_parameters": 10, "peak_trainable_parameters": peak}

    results = run_comparison(plan(tmp_path), train, log=lambda _m: None)
    assert len(results) == 8 and len(calls) == 8
    assert {r["method"] for r in results} == {"dynamic", "dynamic-noinput"}
    assert all(r["runs"] == "dynamic" for r in results)
    assert all(c[1] == "dynamic" for c in calls)

    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:5]) + "\n")
    calls.clear()
    run_comparison(plan(tmp_path), train, log=lambda _m: None)
    assert len(calls) == 3  # only the runs missing from results.jsonl
    assert len(read_results(tmp_path / "results.jsonl")) == 8

    table = summary_table(read_results(tmp_path / "results.jsonl"), ["cola", "rte"], ["dynamic", "dynamic-noinput"])
    assert "| dynamic-noinput | 10 |" in table and "| dynamic | 10 (peak 15) |" in table and "(n=2)" in table


def _fake_train(settings):  # module level: sent to worker processes
    import os

    return {"metrics": {"validation": {"main": settings["seed"] / 10}}, "pid": os.getpid()}


def test_jobs_run_in_worker_processes_and_record_every_run(tmp_path):
    import os

    messages = []
    results = run_comparison(plan(tmp_path), _fake_train, log=messages.append, jobs=2)
    assert len(results) == 8 and len(messages) == 8 and all("done:" in m for m in messages)
    assert os.getpid() not in {r["pid"] for r in results}
    assert sorted((r["task"], r["method"], r["seed"]) for r in results) == sorted(
        (t, m, s) for t in ("cola", "rte") for m in ("dynamic", "dynamic-noinput") for s in (0, 1)
    )


def _failing_train(settings):
    if settings["seed"] == 1:
        raise ValueError("bad run")
    return {"metrics": {"validation": {"main": 0.5}}}


def test_a_failing_job_stops_the_comparison_and_keeps_finished_runs(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="bad run"):
        run_comparison(plan(tmp_path), _failing_train, log=lambda _m: None, jobs=2)
    kept = read_results(tmp_path / "results.jsonl")
    assert all(r["seed"] == 0 for r in kept)  # whatever finished before the failure is recorded, nothing else
