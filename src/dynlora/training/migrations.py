"""Bringing a training checkpoint of an older format to the current one, one explicit step per version.

A step rewrites the manifest's ``identity`` (the settings the run was written with) and the saved ``state`` into the
next format, so that comparing the identity with the resuming run's is plain equality. A new setting therefore
needs no history of its own: a format bump, and a step that records what older checkpoints did without it.

Format 1 (dynlora 0.1, no ``format_version`` in the manifest): adapter settings as the old ``AdapterSettings``
recorded them, with ``init``, ``reallocate`` and ``input_norm_strength`` missing in checkpoints written before those
settings existed; the method state of Dynamic LoRA under ``allocator``.
Format 2: the adapter settings the method really uses (``Method.identity``), the engine state under ``engine``.
Format 3: ``objective`` (what a run trains for) recorded; every earlier run trained a classifier as ``auto`` still
chooses for it.
Format 4: ``precision``, ``load_in_4bit`` and ``load_in_8bit`` recorded; every earlier run computed in float32 on
a full-precision base.
Format 5: ``input_norm_every`` recorded for Dynamic LoRA; every earlier run folded its input statistics in after
every step.
Format 6: ``loraplus_lr_ratio`` recorded; every earlier run left it to the method (none but peft-loraplus's 16).
Format 7: ``lr_schedule`` and ``adapter.train_untrained_pooler`` recorded; every earlier run decayed its lr
linearly and left an untrained pooler frozen.
Format 8: ``peft-adalora`` records the schedule settings it now reads (``warmup``, ``interval``, ``final``); every
earlier AdaLoRA run pruned on fixed fractions of the run, 0.1, 0.05 and 0.8, whatever they were set to.
Format 9: Dynamic LoRA records ``start_ratio``, and every run counts the ``peak`` of its trainable parameters;
every earlier run started at its budget (1.0), and its peak is counted from where it resumes.
Format 10: without the mergeable input adaptation, Dynamic LoRA records its settings (``input_norm_strength``,
``input_norm_every``) at their defaults; an earlier run may have recorded others, which never acted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import DynamicLoRAConfig, written_settings
from .errors import CheckpointError

CHECKPOINT_VERSION = 10

# What format 1 did for the settings it did not record: init and input_norm_strength did not exist before they
# were added, so such a checkpoint ran random A and a full-strength input scale; the six fields it never recorded
# were fixed at these values in 0.1.
V1_UNRECORDED = {
    "init": "lora",
    "input_norm_strength": 1.0,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "budget": None,
    "beta1": 0.85,
    "beta2": 0.85,
}


def _v1_to_v2(manifest: dict[str, Any], state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from .methods import get_method

    identity = dict(manifest["identity"])
    method = get_method(identity["method"])
    recorded = {"reallocate": identity["method"] == "dynamic", **V1_UNRECORDED, **identity["adapter"]}
    identity["adapter"] = method.identity(DynamicLoRAConfig.from_dict(written_settings(recorded)))
    method_state = dict(state["method"])
    if "allocator" in method_state:
        method_state = {"engine": method_state.pop("allocator")}
    elif identity["method"] in ("dynamic", "lora"):
        method_state = {"engine": {}}
    return {**manifest, "identity": identity}, {**state, "method": method_state}


def _v2_to_v3(manifest: dict[str, Any], state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    return {**manifest, "identity": {**manifest["identity"], "objective": "auto"}}, state


def _v3_to_v4(manifest: dict[str, Any], state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    identity = {**manifest["identity"], "precision": "fp32", "load_in_4bit": False, "load_in_8bit": False}
    return {**manifest, "identity": identity}, state


def _v4_to_v5(manifest: dict[str, Any], state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    identity = manifest["identity"]
    if identity["method"] != "dynamic":  # only Dynamic LoRA's identity holds the engine's settings
        return manifest, state
    identity = {**identity, "adapter": {**identity["adapter"], "input_norm_every": 1}}
    return {**manifest, "identity": identity}, state


def _v5_to_v6(manifest: dict[str, Any], state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    return {**manifest, "identity": {**manifest["identity"], "loraplus_lr_ratio": None}}, state


def _v6_to_v7(manifest: dict[str, Any], state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    identity = {"lr_schedule": "linear", **manifest["identity"]}
    identity["adapter"] = {**identity["adapter"], "train_untrained_pooler": False}  # no earlier run trained one
    return {**manifest, "identity": identity}, state


def _v7_to_v8(manifest: dict[str, Any], state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    identity = manifest["identity"]
    if identity["method"] != "peft-adalora":
        return manifest, state
    identity = {**identity, "adapter": {**identity["adapter"], "warmup": 0.1, "interval": 0.05, "final": 0.8}}
    return {**manifest, "identity": identity}, state


def _v8_to_v9(manifest: dict[str, Any], state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    identity = manifest["identity"]
    if identity["method"] == "dynamic":
        identity = {**identity, "adapter": {**identity["adapter"], "start_ratio": 1.0}}
    return {**manifest, "identity": identity}, {**state, "peak": 0}


def _v9_to_v10(manifest: dict[str, Any], state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    identity = manifest["identity"]
    if identity["method"] == "dynamic":
        identity = {**identity, "adapter": written_settings(identity["adapter"])}
    return {**manifest, "identity": identity}, state


MIGRATIONS: dict[int, Callable[[dict, dict], tuple[dict, dict]]] = {
    1: _v1_to_v2,
    2: _v2_to_v3,
    3: _v3_to_v4,
    4: _v4_to_v5,
    5: _v5_to_v6,
    6: _v6_to_v7,
    7: _v7_to_v8,
    8: _v8_to_v9,
    9: _v9_to_v10,
}


def migrate(manifest: dict[str, Any], state: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(manifest, state)`` in the current format; a newer format than this dynlora reads is one clear error."""
    version = int(manifest.get("format_version", 1))
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {where} has format {version}, newer than this dynlora reads ({CHECKPOINT_VERSION}); "
            "upgrade dynlora to resume it"
        )
    while version < CHECKPOINT_VERSION:
        try:
            manifest, state = MIGRATIONS[version](manifest, state)
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {where} (format {version}) cannot be read by this dynlora ({e}); use a new --output-dir"
            ) from e
        version += 1
    return {**manifest, "format_version": version}, state
