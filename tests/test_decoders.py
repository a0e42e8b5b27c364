"""Decoder LLMs (and T5) through the Python API: generation after merge and PEFT export, transformers.Trainer and
TRL's SFTTrainer with the callback, adapter-only checkpoints, gradient starts everywhere, PEFT-shaped conveniences."""

import copy
import os
import warnings

import pytest
import torch
from conftest import LM_BUILDERS, VOCAB, randomize_adapters
from transformers import Trainer, TrainingArguments

from dynlora import DynamicLoRACallback, DynamicLoRAConfig, DynamicLoRAModel, get_dynlora_model

TIED = ["gpt2", "t5", "gemma"]  # input and output embeddings share one tensor


def lm(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return LM_BUILDERS[arch]().eval()


def prompt(n: int = 2, length: int = 6, seed: int = 3) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def greedy(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("arch", sorted(LM_BUILDERS))
def test_dynlora_merged_and_peft_loaded_export_generate_the_same_tokens(arch, tmp_path):
    from peft import PeftModel

    model = get_dynlora_model(lm(arch), DynamicLoRAConfig(rank=4, target_modules="all-linear", init="lora"))
    randomize_adapters(model, scale=0.5)
    model.eval()
    inputs = prompt()
    ours = greedy(model, inputs)
    assert not torch.equal(ours, greedy(lm(arch), inputs))  # the adapter changes what is generated
    model.export_peft(tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(lm(arch), tmp_path / "peft").eval()
    merged = copy.deepcopy(model).merge_and_unload().eval()
    assert torch.equal(greedy(merged, inputs), ours)
    assert torch.equal(greedy(peft_model, inputs), ours)


def test_all_linear_adapts_every_linear_layer_but_the_output_layer():
    model = get_dynlora_model(lm("llama"), DynamicLoRAConfig(rank=2, target_modules="all-linear"))
    assert len(model.lora_layers()) == 2 * 7 and not any("lm_head" in n for n in model.lora_layers())
    t5 = get_dynlora_model(lm("t5"), DynamicLoRAConfig(rank=2, target_modules="all-linear"))
    assert not any("lm_head" in n for n in t5.lora_layers()) and any("decoder" in n for n in t5.lora_layers())


class Rows(torch.utils.data.Dataset):
    """Causal-LM rows (labels = inputs; Trainer shifts): for T5 a target sequence of its own."""

    def __init__(self, arch: str, n: int = 64):
        g = torch.Generator().manual_seed(0)
        self.rows = []
        for _ in range(n):
            ids = torch.randint(1, VOCAB, (10,), generator=g)
            labels = torch.randint(1, VOCAB, (6,), generator=g) if arch == "t5" else ids.clone()
            self.rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def run_trainer(model, arch, out, max_steps=12, resume=None, **kw) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        save_steps=6,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **kw,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows(arch), callbacks=[DynamicLoRACallback()])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def engine_config(**overrides) -> DynamicLoRAConfig:
    return DynamicLoRAConfig(rank=4, target_modules="all-linear", warmup=3, interval=3, final=9, **overrides)


@pytest.mark.parametrize("arch", TIED)
def test_trainer_checkpoints_hold_the_adapter_not_the_base_and_resume_exactly(arch, tmp_path):
    straight = get_dynlora_model(lm(arch), engine_config())
    run_trainer(straight, arch, tmp_path / "a")

    first = get_dynlora_model(lm(arch), engine_config())
    run_trainer(first, arch, tmp_path / "b", max_steps=12, save_only_model=False)
    checkpoint = tmp_path / "b" / "checkpoint-6"
    from safetensors.torch import load_file

    saved = load_file(checkpoint / "model.safetensors")
    assert set(saved) == set(first.state_dict())  # the training state: adapters (at capacity) and statistics
    assert not any("base_layer" in k or "embed" in k or "wte" in k or k.endswith("shared.weight") for k in saved)
    state_bytes = sum(t.numel() * t.element_size() for t in saved.values())
    base_bytes = sum(p.numel() * 4 for p in lm(arch).parameters())
    size = os.path.getsize(checkpoint / "model.safetensors")
    header = 16_384 + 256 * len(saved)  # safetensors' JSON header: a line per tensor
    assert size <= state_bytes + header and size < base_bytes  # adapter-sized, not model-sized

    resumed = get_dynlora_model(lm(arch), engine_config())
    run_trainer(resumed, arch, tmp_path / "b", resume=str(checkpoint))
    assert resumed.allocation_events() == straight.allocation_events()
    a, b = straight.adapter_state_dict(), resumed.adapter_state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_sft_trainer_with_the_callback_trains_and_reallocates(tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from dynlora import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.sep_token_id,
    )
    model = get_dynlora_model(LlamaForCausalLM(config), engine_config())
    rows = Dataset.from_list([{"prompt": f"question {i} ?", "completion": f"answer {i % 3}"} for i in range(64)])
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        save_steps=6,
        report_to=[],
        use_cpu=True,
        max_length=32,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=rows, processing_class=tok, callbacks=[DynamicLoRACallback()]
    )
    trainer.train()
    assert [e["step"] for e in model.allocation_events()] == [3, 6, 9]
    assert (tmp_path / "checkpoint-12" / "dynlora_engine.pt").is_file()
    assert trainer.state.log_history[-1]["train_loss"] < 11


def test_with_and_without_reentrant_gradient_checkpointing_a_run_trains_the_same():
    """Reentrant checkpointing passes no gradient into a block whose inputs do not require it: the wrapper's
    gradient_checkpointing_enable makes the inputs require it, as PEFT does."""
    results = []
    for checkpointing in (False, True):
        model = get_dynlora_model(lm("llama"), DynamicLoRAConfig(rank=2, target_modules="all-linear"))
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": True})
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.bind_optimizer(optimizer, 3)
        rows = Rows("llama", n=8)
        batch = {k: torch.stack([rows[i][k] for i in range(8)]) for k in rows[0]}
        for step in (1, 2, 3):
            model(**batch).loss.backward()
            optimizer.step()
            model.update_and_allocate(step)
            optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            results.append(model(**batch).logits)
    assert torch.allclose(results[0], results[1], atol=1e-5)


def test_a_layer_no_trainable_path_reaches_is_still_measured_along_its_own_weight_gradient():
    """T5's encoder once all its adapters are at rank 0: nothing below the decoder trains, yet a layer there that
    grows back must start along its own ∂L/∂W, not at random."""
    model = get_dynlora_model(lm("t5"), DynamicLoRAConfig(rank=2, target_modules="all-linear", init="gradient"))
    model.set_ranks({n: 0 for n in model.lora_layers() if n.startswith("encoder.")})
    model.train()
    rows = Rows("t5", n=8)
    batch = {k: torch.stack([rows[i][k] for i in range(8)]) for k in rows[0]}
    layers = model.lora_layers()
    for layer in layers.values():
        layer.base_layer.weight.requires_grad_(True)
    model(**batch).loss.backward()
    reference = {n: m.base_layer.weight.grad.clone() for n, m in layers.items()}
    for layer in layers.values():
        layer.base_layer.weight.requires_grad_(False)
        layer.base_layer.weight.grad = None
    model.zero_grad(set_to_none=True)
    model.bind_optimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0), 10)
    model(**batch).loss.backward()
    measured = {n: p.weight_grad for n, p in model.engine.probes.items()}
    assert all(measured[n] is not None for n in layers)
    assert all(torch.allclose(measured[n], reference[n], atol=1e-5, rtol=1e-4) for n in layers)


def test_parameter_counts_are_honest_and_print_like_peft(capsys):
    base = lm("llama")
    base_total = sum(p.numel() for p in base.parameters())
    model = get_dynlora_model(base, DynamicLoRAConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    trainable = model.trainable_parameters()
    assert trainable == 2 * (3 * (32 + 32) + 3 * (32 + 16))  # 2 layers; q: 32 -> 32, v: 32 -> 16 (grouped KV)
    assert model.budget_trainable_parameters() == 2 * (2 * (32 + 32) + 2 * (32 + 16))  # rank 3 pruned to rank 2
    assert model.num_parameters(only_trainable=True) == trainable  # active ranks, not the capacity
    assert model.num_parameters() == base_total + trainable
    model.print_trainable_parameters()
    share = 100 * trainable / (base_total + trainable)
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,d} || all params: {base_total + trainable:,d} || trainable%: {share:.4f}"
        " || adapted: 4 linear layers"
    )


def test_disable_adapter_computes_as_the_base_model():
    model = get_dynlora_model(lm("llama"), DynamicLoRAConfig(rank=2, init="lora"))
    randomize_adapters(model)
    inputs = prompt()
    with torch.no_grad():
        adapted = model(**inputs).logits
        with model.disable_adapter():
            assert torch.allclose(model(**inputs).logits, lm("llama")(**inputs).logits, atol=1e-6)
        assert torch.equal(model(**inputs).logits, adapted)
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge_adapter"), model.disable_adapter():
        pass


def test_an_image_classifiers_new_head_is_trained_and_saved(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its 3-D cls_token and position embeddings are not taken for experts
        model = get_dynlora_model(
            ViTForImageClassification(config), DynamicLoRAConfig(rank=2, target_modules=["q_proj"])
        )
    assert model.saved_module_names == ["classifier"] and model.model.classifier.weight.requires_grad
    all_linear = get_dynlora_model(
        ViTForImageClassification(config), DynamicLoRAConfig(rank=2, target_modules="all-linear")
    )
    assert {m.kind for m in all_linear.lora_layers().values()} == {"linear"}
    with torch.no_grad():
        model.model.classifier.weight.add_(1.0)
    model.save_pretrained(tmp_path)
    torch.manual_seed(1)
    loaded = DynamicLoRAModel.from_pretrained(ViTForImageClassification(config), tmp_path)
    assert torch.equal(loaded.model.classifier.weight, model.model.classifier.weight)
