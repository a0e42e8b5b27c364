"""GLUE readers on the real shared data and on fixtures in the exact GLUE layout; custom data; padding."""

from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import GLUE, needs_glue

from dynlora.training.data import (
    DataError,
    Example,
    load_custom,
    load_glue,
    read_tsv,
    resolve_glue_dir,
    task_spec,
)
from dynlora.training.data.glue import from_hub
from dynlora.training.data.loader import collate, epoch_order, eval_batch_starts, tokenize
from dynlora.training.data.splits import command_glue_dir


@needs_glue
@pytest.mark.parametrize(
    ("task", "train", "dev", "dev_labels"),
    [
        ("cola", 8551, 1043, {1: 721, 0: 322}),
        ("sst2", 67349, 872, {1: 444, 0: 428}),
        ("mrpc", 3668, 408, None),
        ("stsb", 5749, 1500, None),
        ("rte", 2490, 277, {0: 146, 1: 131}),  # entailment = 0
    ],
)
def test_shared_glue_tasks_read_completely(task, train, dev, dev_labels):
    splits = load_glue(task, GLUE)
    assert (len(splits["train"]), len(splits["validation"])) == (train, dev)
    if dev_labels:
        assert Counter(e.label for e in splits["validation"]) == dev_labels
    first = splits["train"][0]
    assert first.text and not first.text.startswith("\ufeff")
    assert (first.text_pair is not None) == (task in ("mrpc", "stsb", "rte"))


@needs_glue
def test_specific_rows_are_parsed_right():
    mrpc = load_glue("mrpc", GLUE)["validation"][0]
    assert mrpc.text.startswith("He said the foodservice pie business")
    assert mrpc.text_pair.startswith('"The foodservice pie business')  # a bare quote stays as it is
    assert mrpc.label == 1
    stsb = load_glue("stsb", GLUE)["validation"][0]
    assert stsb.label == 5.0 and stsb.text == "A man with a hard hat is dancing."
    cola = read_tsv(task_spec("cola"), GLUE / "CoLA" / "dev.tsv")  # no header, no final newline
    assert cola[0].text == "The sailors rode the breeze clear of the rocks." and len(cola) == 1043
    qnli = read_tsv(task_spec("qnli"), GLUE / "QNLI" / "dev.tsv")
    assert len(qnli) == 5463 and Counter(e.label for e in qnli) == {1: 2761, 0: 2702}


def write(path: Path, lines: list[str], encoding="utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


MNLI_TRAIN = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
)
MNLI_DEV = MNLI_TRAIN.replace("label1\tgold_label", "label1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")


def test_readers_of_tasks_not_in_shared_on_glue_layout_fixtures(tmp_path):
    write(
        tmp_path / "QQP" / "train.tsv",
        ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "0\t1\t2\tHow old is he?\tWhat is his age?\t1"],
    )
    write(
        tmp_path / "QQP" / "dev.tsv",
        ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", '5\t9\t8\tWhy "so"?\tHow come?\t0'],
    )
    mnli_row = "0\t31193\t31193n\tgovernment\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tPremise.\tHypothesis.\tneutral"
    write(tmp_path / "MNLI" / "train.tsv", [MNLI_TRAIN, mnli_row + "\tneutral"])
    dev_row = mnli_row + "\tneutral\tcontradiction\tneutral\tneutral\tneutral"
    write(tmp_path / "MNLI" / "dev_matched.tsv", [MNLI_DEV, dev_row])
    write(tmp_path / "MNLI" / "dev_mismatched.tsv", [MNLI_DEV, dev_row.replace("neutral", "contradiction", 99)])
    write(tmp_path / "WNLI" / "train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\tA.\tB.\t1"])
    write(tmp_path / "WNLI" / "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\tC.\tD.\t0"])
    write(tmp_path / "QNLI" / "train.tsv", ["index\tquestion\tsentence\tlabel", "0\tWho?\tHim.\tnot_entailment"])
    write(tmp_path / "QNLI" / "dev.tsv", ["index\tquestion\tsentence\tlabel", "0\tWhat?\tThat.\tentailment"])

    qqp = load_glue("qqp", tmp_path)
    assert qqp["train"][0].text_pair == "What is his age?" and qqp["validation"][0].text == 'Why "so"?'
    mnli = load_glue("MNLI", tmp_path)
    assert set(mnli) == {"train", "validation_matched", "validation_mismatched"}
    assert mnli["train"][0].label == 1 and mnli["validation_mismatched"][0].label == 2
    assert load_glue("wnli", tmp_path)["train"][0].label == 1
    assert load_glue("qnli", tmp_path)["train"][0].label == 1


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["sentnce\tlabel", "good\t1"], "header has no column 'sentence'"),
        (["sentence\tlabel", "good\t1\textra"], r"train.tsv:2: 3 columns where the header has 2"),
        (["sentence\tlabel", "good\t7"], r"train.tsv:2: label '7' is not one of sst2's labels"),
        (["sentence\tlabel"], "has no examples"),
    ],
)
def test_malformed_glue_files_are_one_line_errors(tmp_path, lines, message):
    write(tmp_path / "SST-2" / "train.tsv", lines)
    write(tmp_path / "SST-2" / "dev.tsv", ["sentence\tlabel", "fine\t0"])
    with pytest.raises(DataError, match=message):
        load_glue("sst2", tmp_path)


def test_more_malformed_inputs(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_bytes(b"sentence\tlabel\ncaf\xe9\t1\n")
    with pytest.raises(DataError, match=r"train.tsv:2: not UTF-8"):
        load_glue("sst2", tmp_path)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    write(tmp_path / "STS-B" / "train.tsv", [header, "0\tg\tf\t2012\t1\tn\tn\tA.\tB.\tfive"])
    with pytest.raises(DataError, match="'five' is not a finite number"):
        load_glue("stsb", tmp_path)
    with pytest.raises(DataError, match="unknown GLUE task 'glue9'"):
        load_glue("glue9", tmp_path)
    with pytest.raises(DataError, match="no RTE/ folder"):
        load_glue("rte", tmp_path)
    with pytest.raises(DataError, match="CoLA"):
        load_glue("cola", tmp_path / "nowhere")


def test_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNLORA_GLUE_DIR", str(tmp_path / "env"))
    assert resolve_glue_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_glue_dir() == tmp_path / "env"
    assert command_glue_dir(None) is None  # the library reads $DYNLORA_GLUE_DIR itself
    monkeypatch.delenv("DYNLORA_GLUE_DIR")
    monkeypatch.chdir(tmp_path)
    assert resolve_glue_dir() is None and command_glue_dir(None) is None  # nothing given: the datasets hub
    (tmp_path / "repo").mkdir()
    (tmp_path / "shared" / "data" / "glue").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo")
    assert resolve_glue_dir() is None  # the library never looks beside the current directory by itself
    assert command_glue_dir(None) == str(Path("..") / "shared" / "data" / "glue")  # the command does (checkout)
    assert command_glue_dir("mine") == "mine"


def test_custom_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text('text,other,y\n"good, really",x,pos\nbad,y,neg\n')
    examples, labels = load_custom(csv_path, "text", label_col="y")
    assert labels == ("neg", "pos") and examples[0].text == "good, really" and examples[0].label == 1
    jsonl = tmp_path / "dev.jsonl"
    jsonl.write_text('{"a": "q1", "b": "p1", "score": 2.5}\n\n{"a": "q2", "b": "p2", "score": "3"}\n')
    regression, none = load_custom(jsonl, "a", "b", "score", regression=True)
    assert none is None and [e.label for e in regression] == [2.5, 3.0] and regression[1].text_pair == "p2"
    with pytest.raises(DataError, match="no column 'txt'"):
        load_custom(csv_path, "txt", label_col="y")
    with pytest.raises(DataError, match="not one of the train labels"):
        load_custom(csv_path, "text", label_col="y", labels=("pos",))
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        load_custom(tmp_path / "bad.jsonl", "a")


def test_dynamic_padding_and_deterministic_order():
    from transformers import AutoTokenizer

    from dynlora import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    examples = [Example("short", None, 0), Example("a much longer sentence than the first one", None, 1)] * 3
    features = tokenize(examples, tok, max_length=128)
    assert features[1]["labels"] == 1 and "token_type_ids" in features[0]
    first, second = (collate([features[i] for i in pair], tok.pad_token_id) for pair in ([0, 2], [1, 4]))
    assert first["input_ids"].shape == (2, 3)  # "[CLS] short [SEP]": padded to the batch, not to 128
    assert second["input_ids"].shape[1] == len(features[1]["input_ids"]) < 128  # long + short: to the long one
    assert second["attention_mask"][1].sum() == 3 and second["input_ids"][1, 3:].eq(tok.pad_token_id).all()
    assert first["labels"].tolist() == [0, 0] and second["labels"].tolist() == [1, 0]
    pairs = tokenize([Example("q", "p", 0.5)], tok, max_length=128)
    assert pairs[0]["token_type_ids"][-2:] == [1, 1] and isinstance(pairs[0]["labels"], float)
    assert epoch_order(10, seed=1, epoch=2) == epoch_order(10, seed=1, epoch=2) != epoch_order(10, seed=1, epoch=3)
    assert list(eval_batch_starts(6, 4)) == [0, 4]  # the batches of an evaluation: rows 0-3, then 4-5


def test_each_process_gets_its_rows_of_the_one_process_batch_padded_alike():
    from dynlora.training.data.loader import BatchStream

    lengths = [3, 9, 4, 5, 7, 2, 6, 8, 3, 4, 5, 6]
    features = [{"input_ids": [1] * n, "attention_mask": [1] * n, "labels": i % 2} for i, n in enumerate(lengths)]
    alone = BatchStream(features, 4, seed=0, pad_token_id=0)
    shards = [BatchStream(features, 2, seed=0, pad_token_id=0, process_index=p, world=2) for p in (0, 1)]
    for k in range(2 * alone.per_epoch):  # two epochs
        whole, parts = alone[k], [shard[k] for shard in shards]
        for key, tensor in whole.items():
            assert torch.equal(tensor[0::2], parts[0][key]) and torch.equal(tensor[1::2], parts[1][key]), (k, key)


def test_no_data_anywhere_is_a_clear_error(tmp_path, monkeypatch):
    """No --data-dir and no $DYNLORA_GLUE_DIR: the hub fallback, which fails offline (or is not installed), ends
    in one line that says where data was looked for and what to do."""
    monkeypatch.delenv("DYNLORA_GLUE_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"no GLUE data given \(--data-dir, \$DYNLORA_GLUE_DIR\).*--data-dir DIR"):
        load_glue("rte")


def test_the_hub_fallback_maps_each_tasks_columns_and_label_ids():
    """The `datasets` GLUE builder's rows (as it names their columns) become the same examples as the TSV release."""
    rows = {
        "sst2": {"sentence": "a fine film", "label": 1, "idx": 0},
        "mrpc": {"sentence1": "s1", "sentence2": "s2", "label": 0, "idx": 0},
        "stsb": {"sentence1": "s1", "sentence2": "s2", "label": 3.25, "idx": 0},
        "mnli": {"premise": "p", "hypothesis": "h", "label": 2, "idx": 0},
        "qnli": {"question": "q", "sentence": "s", "label": 1, "idx": 0},
        "rte": {"sentence1": "s1", "sentence2": "s2", "label": 0, "idx": 0},
        "cola": {"sentence": "a sentence", "label": 0, "idx": 0},
        "qqp": {"question1": "q1", "question2": "q2", "label": 1, "idx": 0},
        "wnli": {"sentence1": "s1", "sentence2": "s2", "label": 1, "idx": 0},
    }
    for task, row in rows.items():
        spec = task_spec(task)
        dataset = {split: [row] for split in ["train"] + [name for name, _ in spec.dev_files]}
        splits = from_hub(spec, dataset)
        assert set(splits) == set(dataset)
        example = splits["train"][0]
        texts = [v for k, v in row.items() if k not in ("label", "idx")]
        assert [example.text, example.text_pair] == texts + [None] * (2 - len(texts))
        assert example.label == row["label"] and isinstance(example.label, float if task == "stsb" else int)
