"""DynamicLoRACallback under a real transformers.Trainer: one line, nothing else to call."""

import warnings

import pytest
import torch
from conftest import build
from test_engine import data, engine_config
from transformers import Trainer, TrainingArguments

from dynlora import DynamicLoRACallback, get_dynlora_model
from dynlora.callbacks import ENGINE_STATE_NAME


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=160):
        batch = data(0, n=n)
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def trainer(model, out, max_steps=20, **kw):
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        save_steps=10,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **kw,
    )
    return Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[DynamicLoRACallback()])


def test_trainer_user_gets_reallocation_and_checkpointed_allocator(tmp_path):
    model = get_dynlora_model(build("bert"), engine_config())
    initial = model.rank_pattern()
    trainer(model, tmp_path).train()
    assert isinstance(model.engine.optimizer, torch.optim.Optimizer)  # bound to the Trainer's optimizer
    assert [h["step"] for h in model.allocation_events()] == [4, 7, 10, 13, 16]
    assert model.rank_pattern() != initial
    assert (tmp_path / "checkpoint-10" / ENGINE_STATE_NAME).is_file()
    assert model.engine.total_cost() <= model.engine.budget


@pytest.mark.parametrize("old_name", [False, True])
def test_resume_from_trainer_checkpoint_restores_the_allocation(tmp_path, old_name):
    straight = get_dynlora_model(build("bert"), engine_config())
    trainer(straight, tmp_path / "a").train()

    first = get_dynlora_model(build("bert"), engine_config())
    trainer(first, tmp_path / "b").train()  # writes checkpoint-10 on the way
    if old_name:  # a checkpoint written before the engine's state file was renamed
        saved = tmp_path / "b" / "checkpoint-10"
        (saved / ENGINE_STATE_NAME).rename(saved / "dynlora_allocator.pt")
    resumed = get_dynlora_model(build("bert"), engine_config())
    trainer(resumed, tmp_path / "b").train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-10"))
    assert resumed.allocation_events() == straight.allocation_events()  # includes steps 4, 7, 10 from the checkpoint
    assert resumed.rank_pattern() == straight.rank_pattern()
    a, b = straight.adapter_state_dict(), resumed.adapter_state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_callback_rejects_a_plain_model(tmp_path):
    from transformers import BertForSequenceClassification

    with pytest.raises(TypeError, match="get_dynlora_model"):
        trainer(build("bert"), tmp_path).train()
    assert isinstance(build("bert"), BertForSequenceClassification)


def test_warns_when_the_schedule_never_ran(tmp_path):
    model = get_dynlora_model(build("bert"), engine_config(warmup=4, final=16))
    cb = DynamicLoRACallback()
    model.bind_optimizer(None, 20)

    class State:
        global_step = 20

    with pytest.warns(UserWarning, match="never re-allocated"):
        cb.on_train_end(None, State(), None, model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.engine.events.append({"step": 4})
        cb.on_train_end(None, State(), None, model=model)


def test_resume_without_allocator_state_is_a_clear_error(tmp_path):
    first = get_dynlora_model(build("bert"), engine_config())
    trainer(first, tmp_path).train()
    (tmp_path / "checkpoint-10" / ENGINE_STATE_NAME).unlink()
    resumed = get_dynlora_model(build("bert"), engine_config())
    with pytest.raises(FileNotFoundError, match="cannot be restored"):
        trainer(resumed, tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-10"))


def test_trainer_predict_sees_the_labels(tmp_path):
    model = get_dynlora_model(build("bert"), engine_config(warmup=0.25, interval=0.25, final=0.75))
    t = trainer(model, tmp_path, max_steps=4)
    t.train()
    out = t.predict(Rows(n=16))
    assert out.label_ids is not None and out.label_ids.shape == (16,)
    assert "test_loss" in out.metrics
