"""Every setting is declared once (a dataclass field) and reachable from a flag and from a config file."""

import dataclasses
import json
import subprocess
import sys
import types
import typing

import pytest
import yaml

from dynlora import DynamicLoRAConfig
from dynlora.cli import SETTINGS, build_parser
from dynlora.training.commands import train_settings
from dynlora.training.fields import convert
from dynlora.training.settings import TrainSettings


def _options(kind) -> tuple:
    return typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)


# Settings that need another one to make sense.
MERGEABLE = {"input_adaptive": "mergeable"}  # what the input normalisation's own settings need to mean anything
COMPANIONS = {"dev_file": {"train_file": "train.csv"}, "input_norm_strength": MERGEABLE, "input_norm_every": MERGEABLE}
# Settings whose halved default is below the least value they accept: a value they accept instead.
ABOVE_A_FLOOR = {"start_ratio": ("1.0", 1.0)}


def sample(setting) -> tuple[str, object]:
    """A value other than the default that the setting's checks accept: (command-line text, typed value)."""
    if setting.name in ABOVE_A_FLOOR:
        return ABOVE_A_FLOOR[setting.name]
    options, default = _options(setting.kind), setting.default
    choices = setting.field.metadata.get("choices")
    if choices:
        value = next(c for c in choices if c != default)
        return value, value
    if bool in options:
        return ("true" if not default else "false"), not default
    if dict in {typing.get_origin(o) for o in options}:
        return '{"layer\\\\.1\\\\.": 4}', {"layer\\.1\\.": 4}
    if list in {typing.get_origin(o) for o in options}:
        return "query,value", ["query", "value"]
    if int in options and float not in options:
        value = default + 1 if isinstance(default, int) else 64
        return str(value), value
    if float in options:
        value = default / 2 if default else 0.5
        return repr(value), value
    return "x", "x"


def test_every_setting_is_a_field_of_one_dataclass_with_help_and_one_flag_and_key():
    names = [(s.adapter, s.name) for s in SETTINGS]
    assert len(names) == len(set(names))
    assert {n for a, n in names if a} == {f.name for f in dataclasses.fields(DynamicLoRAConfig)}
    assert {n for a, n in names if not a} == {f.name for f in dataclasses.fields(TrainSettings)} - {"adapter"}
    assert all(s.help for s in SETTINGS)
    assert len({s.flag for s in SETTINGS}) == len(SETTINGS) and len({s.key for s in SETTINGS}) == len(SETTINGS)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.flag)
def test_every_setting_is_reachable_from_its_flag(setting, tmp_path):
    text, value = sample(setting)
    flag = [setting.flag if value is not False else f"--no-{setting.flag[2:]}"]
    argv = ["train", *(flag if isinstance(value, bool) else [*flag, text])]
    for name, companion in COMPANIONS.get(setting.name, {}).items():
        argv += [f"--{name.replace('_', '-')}", companion]
    if setting.name != "output_dir":
        argv += ["--output-dir", str(tmp_path)]
    settings = train_settings(build_parser().parse_args(argv))
    owner = settings.adapter if setting.adapter else settings
    assert getattr(owner, setting.name) == value


CONFIG_KEYS = [(s, False) for s in SETTINGS] + [(s, True) for s in SETTINGS if s.adapter]


@pytest.mark.parametrize(
    ("setting", "nested"), CONFIG_KEYS, ids=[s.key + (" (adapter:)" if n else "") for s, n in CONFIG_KEYS]
)
def test_every_setting_is_reachable_from_a_config_file(setting, nested, tmp_path):
    _, value = sample(setting)
    companions = COMPANIONS.get(setting.name, {})
    data = {"adapter": {setting.name: value, **companions}} if nested else {setting.key: value, **companions}
    if setting.name != "output_dir":
        data["output_dir"] = str(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    settings = train_settings(build_parser().parse_args(["train", "--config", str(path)]))
    owner = settings.adapter if setting.adapter else settings
    assert getattr(owner, setting.name) == value


def test_flags_override_the_config_file_and_both_override_defaults(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"lr": 1e-3, "rank": 4, "adapter": {"temperature": 2.0}, "schedule_final": 0.5}))
    settings = train_settings(
        build_parser().parse_args(["train", "--config", str(path), "--rank", "6", "--output-dir", str(tmp_path)])
    )
    assert (settings.lr, settings.adapter.rank, settings.adapter.temperature) == (1e-3, 6, 2.0)
    assert settings.adapter.final == 0.5 and settings.batch_size == TrainSettings().batch_size


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "method",
            "lora2",
            "setting method must be one of dynamic, lora, peft-lora, peft-adalora, peft-rslora, peft-loraplus, "
            "peft-eva, full, got 'lora2'",
        ),
        ("init", 5, "setting init must be a string, got 5"),
        ("target_modules", [1, 2], "setting target_modules must be a list of module names or one regex"),
        ("modules_to_save", "classifier", "setting modules_to_save must be a list of module names"),
        ("rank_pattern", {"q": "four"}, "setting rank_pattern must be a mapping of name patterns to numbers"),
        ("text_col", ["a"], "setting text_col must be a string, got ['a']"),
        ("task", 5, "setting task must be a string, got 5"),
        ("reallocate", "perhaps", "setting reallocate must be true or false"),
        ("rank", 2.5, "setting rank must be an integer, got 2.5"),
    ],
)
def test_a_config_value_of_the_wrong_type_is_one_clear_error(key, value, message, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({key: value}))
    with pytest.raises(ValueError, match="^" + message.replace("[", r"\[").replace("(", r"\(")):
        train_settings(build_parser().parse_args(["train", "--config", str(path)]))


def test_schedule_points_are_fractions_up_to_one_and_steps_above():
    warmup = next(s for s in SETTINGS if s.name == "warmup")
    assert convert(warmup, "50", from_text=True) == 50 and isinstance(convert(warmup, "50", from_text=True), int)
    assert convert(warmup, "1.0", from_text=True) == 1.0 and convert(warmup, 0.25) == 0.25
    assert convert(warmup, 30) == 30 and convert(warmup, 30.0) == 30


def test_importing_the_core_loads_nothing_of_the_training_application():
    core = [
        "dynlora",
        "dynlora.model",
        "dynlora.engine",
        "dynlora.layer",
        "dynlora.config",
        "dynlora.allocator",
        "dynlora.importance",
        "dynlora.probe",
        "dynlora.optim_state",
        "dynlora.input_adaptation",
        "dynlora.targets",
        "dynlora.serialization",
        "dynlora.export",
        "dynlora.shipped_models",
    ]
    code = f"import sys; import {', '.join(core)}; print('\\n'.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    outer = [m for m in loaded if m.startswith(("dynlora.training", "dynlora.cli", "dynlora.callbacks"))]
    assert outer == []
    heavy = [m for m in loaded if m.split(".")[0] in ("matplotlib", "sklearn", "scipy", "peft")]
    assert heavy == []
    assert "transformers.trainer" not in loaded  # the callback (and so Trainer) loads only when asked for


def test_a_lora_ga_start_with_a_base_it_cannot_offset_is_refused_before_the_run():
    from dynlora.training.settings import TrainSettings

    for base, message in [({"fsdp": True}, "which --fsdp shards"), ({"load_in_4bit": True}, "--init gradient")]:
        with pytest.raises(ValueError, match=message):
            TrainSettings(adapter={"init": "lora-ga"}, **base)
    TrainSettings(method="lora", fsdp=True, adapter={"init": "lora-ga"})  # static LoRA starts as LoRA
