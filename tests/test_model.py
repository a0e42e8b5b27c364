import json

import pytest
import torch
from conftest import EXPECTED_TARGETS, batch, build, randomize_adapters, tiny_bert, tiny_gpt2

from dynlora import DynamicLoRAConfig, DynamicLoRALinear, DynamicLoRAModel, get_dynlora_model


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_injects_default_targets_and_freezes_base(arch):
    model = get_dynlora_model(build(arch), DynamicLoRAConfig(rank=4))
    names = list(model.lora_layers())
    assert len(names) == 2 * len(EXPECTED_TARGETS[arch])  # 2 transformer blocks
    assert all(n.rsplit(".", 1)[-1] in EXPECTED_TARGETS[arch] for n in names)
    for name, p in model.named_parameters():
        is_adapter = ".lora_A" in name or ".lora_B" in name
        is_head = ".classifier." in name or ".pooler." in name  # only the BERT model is a classifier (its pooler
        # is a random one that no checkpoint trained, so it is trained with the head)
        assert p.requires_grad == (is_adapter or is_head), name


def test_forward_backward_trains_only_adapters_and_head(arch):
    model = get_dynlora_model(build(arch), DynamicLoRAConfig(rank=4))
    inputs = batch()
    labels = torch.tensor([0, 1, 0]) if arch == "bert" else inputs["input_ids"]
    out = model(**inputs, labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n or ".classifier." in n or ".pooler." in n for n in grads)
    # At init B = 0, so only B receives gradient (dL/dA = B^T ... = 0): the adapter starts as a no-op.
    assert all(g.abs().sum() == 0 for n, g in grads.items() if ".lora_A" in n)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".lora_B" in n)


@pytest.mark.parametrize("arch_name", ["gpt2", "llama", "qwen2"])
def test_generate_still_works_on_decoders(arch_name):
    model = get_dynlora_model(build(arch_name), DynamicLoRAConfig(rank=4))
    randomize_adapters(model)
    ids = batch(n=1)["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)


def test_merge_and_unload_is_exact_and_plain(arch):
    inputs = batch()
    model = get_dynlora_model(build(arch), DynamicLoRAConfig(rank=4, max_rank=6))
    randomize_adapters(model)
    model.set_ranks({next(iter(model.lora_layers())): 2})
    expected = logits(model, inputs)
    assert (expected - logits(build(arch), inputs)).abs().max() > 1e-3  # the adapter really changes something
    plain = model.merge_and_unload()
    assert not any(isinstance(m, DynamicLoRALinear) for m in plain.modules())
    assert type(plain).__name__ == type(build(arch)).__name__
    assert (logits(plain, inputs) - expected).abs().max() < 1e-5
    with pytest.raises(RuntimeError, match="already"):
        model.merge_and_unload()


def test_merge_adapter_round_trip():
    inputs = batch()
    model = get_dynlora_model(build("bert"))
    randomize_adapters(model)
    expected = logits(model, inputs)
    model.merge_adapter()
    assert (logits(model, inputs) - expected).abs().max() < 1e-5
    model.unmerge_adapter()
    assert (logits(model, inputs) - expected).abs().max() < 1e-5


def test_rank_and_alpha_patterns_and_counts():
    cfg = DynamicLoRAConfig(
        rank=4, alpha=8, max_rank=8, rank_pattern={r"layer\.1\..*query": 2}, alpha_pattern={"value": 32}, start_ratio=1
    )
    model = get_dynlora_model(build("bert"), cfg)
    layers = model.lora_layers()
    q1 = "bert.encoder.layer.1.attention.self.query"
    v0 = "bert.encoder.layer.0.attention.self.value"
    assert layers[q1].rank == 2 and layers[q1].scaling == 4.0
    assert layers[v0].rank == 4 and layers[v0].scaling == 8.0
    ranks = model.rank_pattern()
    assert ranks[q1] == 2 and sum(ranks.values()) == 2 + 3 * 4
    head = sum(p.numel() for p in [*model.model.classifier.parameters(), *model.model.bert.pooler.parameters()])
    assert model.trainable_parameters() == sum(ranks.values()) * (32 + 32) + head  # a random pooler is trained
    model.set_ranks({q1: 8})
    assert model.trainable_parameters() == (sum(ranks.values()) + 6) * 64 + head


def test_regex_targets_and_explicit_modules_to_save():
    cfg = DynamicLoRAConfig(target_modules=r".*\.attention\.self\.(query|key)", modules_to_save=[])
    model = get_dynlora_model(build("bert"), cfg)
    assert len(model.lora_layers()) == 4
    assert not any(p.requires_grad for p in model.model.classifier.parameters())


def test_gpt2_classifier_head_kept_trainable():
    torch.manual_seed(0)
    model = get_dynlora_model(tiny_gpt2(head="cls"))
    assert model.saved_module_names == ["score"]
    assert model.model.score.weight.requires_grad


def test_hf_api_forwarded():
    model = get_dynlora_model(build("bert"))
    assert model.config.model_type == "bert"
    assert model.dynlora_config.rank == 8
    assert model.num_parameters() > 0


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (DynamicLoRAConfig(target_modules=["nope"]), "matched no module.*Candidates: query, key, value"),
        (DynamicLoRAConfig(target_modules=["embeddings"]), "cannot be adapted"),
        (DynamicLoRAConfig(rank=33), "larger than layer"),
        (DynamicLoRAConfig(rank=4, max_rank=40), "larger than layer"),
        (DynamicLoRAConfig(modules_to_save=["head_that_is_not_there"]), "matches no module"),
    ],
)
def test_bad_configs_are_clear_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        get_dynlora_model(tiny_bert(), cfg)


def test_bad_config_values():
    with pytest.raises(ValueError, match="rank"):
        DynamicLoRAConfig(rank=0)
    with pytest.raises(ValueError, match="max_rank"):
        DynamicLoRAConfig(rank=8, max_rank=4)
    with pytest.raises(ValueError, match="unknown"):
        DynamicLoRAConfig.from_dict({"rank": 4, "rnak": 3})
    with pytest.raises(ValueError, match="already has"):
        get_dynlora_model(get_dynlora_model(tiny_bert()).model)


# --- save / load --------------------------------------------------------------------------------------------------


def test_save_load_round_trip_with_changed_ranks(arch, tmp_path):
    inputs = batch()
    model = get_dynlora_model(build(arch), DynamicLoRAConfig(rank=4, max_rank=8, alpha=12))
    randomize_adapters(model)
    names = list(model.lora_layers())
    model.set_ranks({names[0]: 0, names[1]: 7})
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "dynlora_config.json").read_text())
    assert meta["layers"][names[0]]["rank"] == 0 and meta["layers"][names[1]]["rank"] == 7

    loaded = DynamicLoRAModel.from_pretrained(build(arch), tmp_path)
    assert loaded.rank_pattern() == model.rank_pattern()
    assert (logits(loaded, inputs) - expected).abs().max() < 1e-6
    # Capacity survives: a reloaded layer can still grow to its max rank.
    loaded.set_ranks({names[0]: 8})
    assert (logits(loaded, inputs) - expected).abs().max() < 1e-6


# Per layer: A, B and, with the input normalisation, its average, its flag and the block not yet folded in (sum,
# tokens); then the head and the pooler.
@pytest.mark.parametrize(("input_adaptive", "per_layer"), [(None, 2), ("mergeable", 2 + 2 + 2)])
def test_saved_files_hold_only_adapter_and_head(tmp_path, input_adaptive, per_layer):
    from safetensors.torch import load_file

    model = get_dynlora_model(build("bert"), DynamicLoRAConfig(rank=4, input_adaptive=input_adaptive))
    model.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "dynlora_model.safetensors")).keys()
    head = ("classifier.", "bert.pooler.")  # the random model's pooler was never trained, so it trains with the head
    assert all(".lora_" in k or ".input_norm." in k or k.startswith(head) for k in keys)
    assert len(keys) == 4 * per_layer + 2 + 2


def test_an_adapter_saved_with_settings_of_the_input_normalisation_while_it_was_off_loads(tmp_path):
    model = get_dynlora_model(build("bert"), DynamicLoRAConfig(rank=4))
    model.save_pretrained(tmp_path)
    path = tmp_path / "dynlora_config.json"
    meta = json.loads(path.read_text())
    meta["config"] |= {"input_norm_every": 5, "input_norm_strength": 0.5}  # accepted, and idle, before the check
    path.write_text(json.dumps(meta))
    loaded = DynamicLoRAModel.from_pretrained(build("bert"), tmp_path)
    assert (loaded.dynlora_config.input_norm_every, loaded.dynlora_config.input_norm_strength) == (10, 1.0)


def test_load_errors(tmp_path):
    model = get_dynlora_model(build("bert"), DynamicLoRAConfig(rank=4))
    model.save_pretrained(tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="dynlora_config.json is missing"):
        DynamicLoRAModel.from_pretrained(build("bert"), tmp_path / "empty")
    with pytest.raises(ValueError, match="trained on a 'bert' model"):
        DynamicLoRAModel.from_pretrained(build("gpt2"), tmp_path / "ok")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "dynlora_config.json").write_text((tmp_path / "ok" / "dynlora_config.json").read_text())
    data = (tmp_path / "ok" / "dynlora_model.safetensors").read_bytes()
    (corrupt / "dynlora_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        DynamicLoRAModel.from_pretrained(build("bert"), corrupt)

    (corrupt / "dynlora_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DynamicLoRAModel.from_pretrained(build("bert"), corrupt)

    # A rank that disagrees with the saved tensors is an error, never a silently disabled adapter.
    meta = json.loads((tmp_path / "ok" / "dynlora_config.json").read_text())
    first = next(iter(meta["layers"]))
    meta["layers"][first]["rank"] = 2
    (corrupt / "dynlora_config.json").write_text(json.dumps(meta))
    (corrupt / "dynlora_model.safetensors").write_bytes(data)
    with pytest.raises(ValueError, match="saved shape"):
        DynamicLoRAModel.from_pretrained(build("bert"), corrupt)


def test_load_into_model_missing_layers(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    get_dynlora_model(build("bert")).save_pretrained(tmp_path)
    torch.manual_seed(0)
    one_layer = BertForSequenceClassification(
        BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    )
    with pytest.raises(ValueError, match="does not have"):
        DynamicLoRAModel.from_pretrained(one_layer, tmp_path)


@pytest.mark.parametrize(
    ("family", "expected"),
    [("roberta", {"query", "value"}), ("deberta-v2", {"query_proj", "value_proj"}), ("mistral", {"q_proj", "v_proj"})],
)
def test_default_targets_of_other_families(family, expected):
    from transformers import AutoConfig, AutoModel

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=97)
    torch.manual_seed(0)
    model = get_dynlora_model(AutoModel.from_config(AutoConfig.for_model(family, **small)))
    assert {n.rsplit(".", 1)[-1] for n in model.lora_layers()} == expected
    assert len(model.lora_layers()) == 2 * len(expected)
