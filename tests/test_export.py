import json

import pytest
import torch
from conftest import batch, build, randomize_adapters, save_tiny_llama, tiny_gpt2

from dynlora import DynamicLoRAConfig, get_dynlora_model


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def peft_round_trip(dyn, fresh_base, tmp_path, inputs):
    from peft import PeftModel

    dyn.export_peft(tmp_path)
    peft_model = PeftModel.from_pretrained(fresh_base, str(tmp_path)).eval()
    return (logits(peft_model, inputs) - logits(dyn, inputs)).abs().max().item()


def test_peft_export_reproduces_logits(arch, tmp_path):
    model = get_dynlora_model(build(arch), DynamicLoRAConfig(rank=4, max_rank=8, alpha=8, rank_pattern={"v_proj": 3}))
    randomize_adapters(model)
    names = list(model.lora_layers())
    model.set_ranks({names[0]: 7, names[-1]: 1})
    assert peft_round_trip(model, build(arch), tmp_path, batch()) < 1e-5
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    assert sorted(cfg["rank_pattern"].values()) == sorted(model.rank_pattern().values())
    # Scale folded into B: every layer's alpha equals its rank, so loaders that ignore alpha_pattern agree.
    assert cfg["alpha_pattern"] == cfg["rank_pattern"] and cfg["lora_alpha"] == cfg["r"]


def test_an_rslora_adapter_saves_loads_and_exports_with_its_scale(tmp_path):
    from dynlora import DynamicLoRAModel

    inputs = batch()
    model = get_dynlora_model(build("llama"), DynamicLoRAConfig(rank=4, max_rank=8, alpha=8, rslora=True))
    randomize_adapters(model)
    assert {m.scaling for m in model.lora_layers().values()} == {4.0}  # 8 / sqrt(4)
    names = list(model.lora_layers())
    model.set_ranks({names[0]: 7, names[-1]: 2})
    model.save_pretrained(tmp_path / "dynlora")
    loaded = DynamicLoRAModel.from_pretrained(build("llama"), tmp_path / "dynlora")
    assert (logits(loaded, inputs) - logits(model, inputs)).abs().max() < 1e-6
    assert peft_round_trip(model, build("llama"), tmp_path / "peft", inputs) < 1e-5


def test_peft_export_skips_rank_zero_layers(tmp_path):
    from safetensors.torch import load_file

    model = get_dynlora_model(build("bert"), DynamicLoRAConfig(rank=4))
    randomize_adapters(model)
    dropped = next(iter(model.lora_layers()))
    model.set_ranks({dropped: 0})
    assert peft_round_trip(model, build("bert"), tmp_path, batch()) < 1e-5
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert not any(dropped in k for k in keys)
    assert "base_model.model.classifier.weight" in keys


def test_gpt2_conv1d_classifier_export(tmp_path):
    torch.manual_seed(0)
    base = tiny_gpt2(head="cls").eval()
    model = get_dynlora_model(base, DynamicLoRAConfig(rank=4, target_modules=["c_attn", "c_proj", "c_fc"]))
    randomize_adapters(model)
    with torch.no_grad():
        model.model.score.weight.normal_()
    torch.manual_seed(0)
    fresh = tiny_gpt2(head="cls").eval()
    assert peft_round_trip(model, fresh, tmp_path, batch()) < 1e-5
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_export_of_all_zero_ranks_is_an_error(tmp_path):
    model = get_dynlora_model(build("bert"), DynamicLoRAConfig(rank=4))
    model.set_ranks(dict.fromkeys(model.lora_layers(), 0))
    with pytest.raises(ValueError, match="rank 0"):
        model.export_peft(tmp_path)


def test_a_peft_export_loads_with_peft_auto_classes_and_is_the_same_bytes_every_time(tmp_path):
    import subprocess
    import sys

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    build("llama").save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = get_dynlora_model(base, DynamicLoRAConfig(rank=4, target_modules="all-linear"))
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    model.export_peft(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    assert cfg["target_modules"] == sorted({n.rsplit(".", 1)[-1] for n in model.lora_layers()})  # as PEFT names them
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft").eval()  # the base from the config alone
    inputs = batch()
    assert (logits(loaded, inputs) - logits(model, inputs)).abs().max() < 1e-5
    again = (  # another process, another string-hash seed: the set order PEFT would write differs
        "import sys; from transformers import AutoModelForCausalLM; from dynlora import DynamicLoRAModel; "
        "m = DynamicLoRAModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2]); "
        "m.export_peft(sys.argv[3])"
    )
    for seed in ("1", "2"):
        env = {**__import__("os").environ, "PYTHONHASHSEED": seed}
        out = tmp_path / f"peft{seed}"
        subprocess.run([sys.executable, "-c", again, tmp_path / "base", tmp_path / "adapter", out], check=True, env=env)
        assert (out / "adapter_config.json").read_bytes() == (tmp_path / "peft" / "adapter_config.json").read_bytes()


def test_an_adapter_names_a_shipped_base_by_its_short_name_and_a_directory_by_its_absolute_path(tmp_path, monkeypatch):
    from dynlora import default_model_path
    from dynlora.shipped_models import portable_name

    assert portable_name(default_model_path()) == "minilm"
    assert portable_name(default_model_path(), hub=True) == "sentence-transformers/all-MiniLM-L6-v2"
    (tmp_path / "x").mkdir()
    monkeypatch.chdir(tmp_path)
    assert portable_name("x") == str(tmp_path / "x") and portable_name("org/some-model") == "org/some-model"


def test_an_adapter_whose_base_is_gone_says_to_pass_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from dynlora.training.base_model import load_adapted

    save_tiny_llama(tmp_path / "base")
    model = get_dynlora_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), DynamicLoRAConfig(rank=2))
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "base").rename(tmp_path / "moved")
    with pytest.raises(ValueError, match="was trained on the base model .*base': pass --model with that model's"):
        load_adapted(str(tmp_path / "adapter"))
    assert load_adapted(str(tmp_path / "adapter"), str(tmp_path / "moved"))[0] is not None
    with pytest.raises(ValueError) as chosen:  # a base the user chose: their own error, no hint about the recorded one
        load_adapted(str(tmp_path / "adapter"), str(tmp_path / "nowhere"))
    assert "pass --model" not in str(chosen.value)
