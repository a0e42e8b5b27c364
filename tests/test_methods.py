import warnings

import torch
from conftest import tiny_bert
from safetensors.torch import load_file

from dynlora.methods import AdapterSettings, adapt


def test_adalora_layer_pruned_to_rank_zero_saves_without_a_sharding_warning(tmp_path):
    adapted = adapt("peft-adalora", tiny_bert(), AdapterSettings(rank=2, target_modules=["query", "value"]), 20)
    with torch.no_grad():
        pruned = next(p for n, p in adapted.model.named_parameters() if "lora_E" in n)
        pruned.zero_()
    adapted.load_state_dict({})  # rebuilds AdaLoRA's mask from the zeroed lora_E, as a resumed run does
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's ZeRO-3/FSDP warning does not apply to a pruned layer
        adapted.save_adapter(tmp_path)
    shapes = [t.shape for t in load_file(tmp_path / "adapter_model.safetensors").values()]
    assert any(0 in s for s in shapes)  # the layer really was saved at rank 0
