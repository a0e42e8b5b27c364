"""The comparison report's final-rank figure: layers laid out as blocks × module kinds."""

import json
import math

from hypothesis import given
from hypothesis import strategies as st

from dynlora.training.report import _unique_suffixes, rank_grid, write_report


def test_layers_of_numbered_blocks_go_to_their_block_and_module_cell():
    ranks = {
        "model.layers.10.self_attn.q_proj": 3,
        "model.layers.2.self_attn.q_proj": 5,
        "model.layers.2.mlp.up_proj": 7,
    }
    blocks, kinds, grid = rank_grid(ranks)
    assert blocks == [2, 10] and kinds == ["self_attn.q_proj", "mlp.up_proj"]  # blocks in numeric order
    assert grid[0] == [5, 7] and grid[1][0] == 3 and math.isnan(grid[1][1])


def test_names_without_a_block_or_sharing_a_cell_have_no_grid():
    assert rank_grid({"classifier": 4, "model.layers.0.q_proj": 2}) is None
    assert rank_grid({"enc.layer.0.q": 1, "dec.layer.0.q": 2}) is None  # two stacks: (0, "q") twice


@given(st.lists(st.lists(st.sampled_from(["a", "b", "out", "dense"]), min_size=1, max_size=4), unique_by=".".join))
def test_each_module_kind_is_labelled_by_its_shortest_ending_no_other_kind_has(parts):
    names = [".".join(p) for p in parts]
    labels = _unique_suffixes(names)
    for name, label in zip(names, labels, strict=True):
        assert name == label or name.endswith("." + label)
        shorter = ".".join(label.split(".")[1:])
        assert not shorter or sum(n == shorter or n.endswith("." + shorter) for n in names) > 1
    assert len(set(labels)) == len(labels)


def test_a_comparison_report_draws_the_final_ranks(tmp_path):
    rows = [
        {"task": "sst2", "method": "dynamic", "seed": s, "metrics": {"validation": {"main": 0.9}}, "ranks": ranks}
        for s, ranks in enumerate([{"m.layers.0.q": 2, "m.layers.1.q": 6}, {"m.layers.0.q": 4, "m.layers.1.q": 8}])
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(tmp_path)
    assert (tmp_path / "final_ranks.png").stat().st_size > 0
    assert "final ranks" in (tmp_path / "report.md").read_text()
