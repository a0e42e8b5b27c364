import math

import pytest

from dynlora.training.metrics import glue_metrics, main_score


def test_accuracy_f1_and_main_score():
    m = glue_metrics("mrpc", [1, 1, 0, 0], [1, 0, 0, 0])
    assert m["accuracy"] == 0.75
    assert math.isclose(m["f1"], 2 / 3)  # precision 1/2, recall 1
    assert math.isclose(m["main"], (0.75 + 2 / 3) / 2)


def test_matthews_correlation_for_cola():
    assert glue_metrics("cola", [1, 0, 1, 0], [1, 0, 1, 0])["mcc"] == 1.0
    assert glue_metrics("cola", [1, 1, 1, 1], [1, 0, 1, 0])["mcc"] == 0.0  # all one class: MCC 0, as GLUE reports
    # tp=2, tn=1, fp=1, fn=0: (2*1 - 1*0) / sqrt(3*2*1*2)
    assert math.isclose(glue_metrics("cola", [1, 1, 1, 0], [1, 1, 0, 0])["mcc"], 2 / math.sqrt(12))


def test_correlations_for_stsb():
    m = glue_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.5])
    assert m["spearman"] == pytest.approx(1.0) and 0.99 < m["pearson"] < 1.0
    assert glue_metrics("stsb", [3.0, 3.0, 3.0], [1.0, 2.0, 3.0])["pearson"] == 0.0  # constant prediction


def test_errors_and_main_score_per_task():
    with pytest.raises(ValueError, match="unknown GLUE task"):
        glue_metrics("imagenet", [1], [1])
    with pytest.raises(ValueError, match="as many predictions"):
        glue_metrics("sst2", [1, 0], [1])
    assert main_score("stsb", {"pearson": 0.8, "spearman": 0.6}) == pytest.approx(0.7)
    assert glue_metrics("rte", [0, 1], [0, 0])["main"] == 0.5
