"""train.bf16: auto, true and false resolved against the hardware (its probe mocked), the family, the
launcher's mixed_precision and a resumed checkpoint; what the Accelerator gets and what a checkpoint records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hftk import precision
from hftk.checkpoint import MANIFEST, check_compatible, resumed_precision, save_checkpoint
from hftk.errors import EXIT_BAD_INPUT, UserError
from hftk.precision import resolve_precision
from hftk.recipe import validate_recipe
from hftk.tasks.base import DECODER_ONLY, ENCODER_DECODER, ENCODER_ONLY
from tests.conftest import tiny_recipe


@pytest.fixture
def no_launcher(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)


def native(monkeypatch, answer: bool) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda device: answer)


def recipe(tmp_path: Path, bf16):
    return validate_recipe(tiny_recipe(tmp_path, train={"bf16": bf16}))


@pytest.mark.parametrize("family", [ENCODER_DECODER, ENCODER_ONLY])
def test_auto_is_bf16_where_the_cpu_has_native_bf16(monkeypatch, no_launcher, family):
    native(monkeypatch, True)
    resolved = resolve_precision("auto", family, "cpu")
    assert (resolved.mixed_precision, resolved.accelerator_argument()) == ("bf16", "bf16")
    assert resolved.line() == "precision: bf16 autocast (train.bf16=auto: this CPU has native bf16)"


def test_auto_is_fp32_without_native_bf16(monkeypatch, no_launcher):
    native(monkeypatch, False)
    resolved = resolve_precision("auto", ENCODER_DECODER, "cpu")
    assert resolved.mixed_precision == "no" and resolved.accelerator_argument() is None
    assert resolved.line() == "precision: fp32 (train.bf16=auto: this CPU has no native bf16)"


def test_auto_keeps_decoder_only_models_in_fp32(monkeypatch, no_launcher):
    native(monkeypatch, True)
    resolved = resolve_precision("auto", DECODER_ONLY, "cuda")
    assert resolved.mixed_precision == "no"
    assert resolved.line() == "precision: fp32 (train.bf16=auto: decoder-only models train faster in fp32 here)"


@pytest.mark.parametrize("launched", ["bf16", "fp16"])
@pytest.mark.parametrize("setting", ["auto", False])
def test_a_launcher_setting_is_kept(monkeypatch, launched, setting):
    native(monkeypatch, launched == "fp16")  # the hardware's answer never overrides the launcher
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    resolved = resolve_precision(setting, DECODER_ONLY if launched == "bf16" else ENCODER_DECODER, "cpu")
    assert resolved.mixed_precision == launched
    assert resolved.accelerator_argument() is None  # Accelerate reads the launcher's own setting
    assert f"the launcher's mixed_precision={launched}" in resolved.reason
    # The planner hands its --config-file's setting over instead of the environment's.
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert resolve_precision(setting, ENCODER_DECODER, "cpu", launcher=launched).mixed_precision == launched


def test_true_and_false_keep_their_meaning(monkeypatch, no_launcher):
    native(monkeypatch, True)
    assert resolve_precision(False, ENCODER_DECODER, "cpu").mixed_precision == "no"
    native(monkeypatch, False)
    assert resolve_precision(True, DECODER_ONLY, "cpu").accelerator_argument() == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert resolve_precision(True, ENCODER_DECODER, "cpu").mixed_precision == "bf16"  # true wins over the launcher


def test_recipe_accepts_auto_true_and_false_only(tmp_path):
    assert validate_recipe(tiny_recipe(tmp_path)).train.bf16 is False  # the tests' own recipes stay in fp32
    del_bf16 = tiny_recipe(tmp_path)
    del del_bf16["train"]["bf16"]
    assert validate_recipe(del_bf16).train.bf16 == "auto"
    for value in ("auto", True, False):
        assert recipe(tmp_path, value).train.bf16 == value
    for value in ("fp16", "yes", "Auto", 1):
        with pytest.raises(UserError, match="train.bf16: must be auto, true or false") as raised:
            recipe(tmp_path, value)
        assert raised.value.exit_status == EXIT_BAD_INPUT


def saved_checkpoint(tmp_path: Path, bf16, mixed_precision: str | None = None) -> Path:
    """A checkpoint written by hftk's own writer, from a real CPU Accelerator in `mixed_precision`."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    saved = recipe(tmp_path, bf16)
    return save_checkpoint(accelerator, tmp_path / "run", 4, saved.dump_yaml(), None)


def before_precision_was_recorded(folder: Path, recipe_bf16: bool | None) -> None:
    """As a checkpoint from before: no precision in the manifest, train.bf16 false or absent in recipe.yaml."""
    import yaml

    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["precision"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    saved = yaml.safe_load((folder / "recipe.yaml").read_text())
    if recipe_bf16 is None:
        del saved["train"]["bf16"]
    else:
        saved["train"]["bf16"] = recipe_bf16
    (folder / "recipe.yaml").write_text(yaml.safe_dump(saved))


def test_every_checkpoint_records_its_precision(tmp_path, no_launcher):
    folder = saved_checkpoint(tmp_path, True, "bf16")
    assert json.loads((folder / MANIFEST).read_text())["precision"] == "bf16"


@pytest.mark.parametrize("recipe_bf16", [False, None])
def test_auto_resumes_a_checkpoint_from_before_in_fp32(tmp_path, monkeypatch, no_launcher, recipe_bf16):
    folder = saved_checkpoint(tmp_path, False)
    before_precision_was_recorded(folder, recipe_bf16)
    native(monkeypatch, True)  # a fresh run of this T5 would train in bf16
    assert resolve_precision("auto", ENCODER_DECODER, "cpu").mixed_precision == "bf16"
    auto = recipe(tmp_path, "auto")
    check_compatible(folder, auto)  # auto against the saved false is no differing setting
    resolved = resumed_precision(folder, auto, ENCODER_DECODER, "cpu")
    assert resolved.mixed_precision == "no" and "as the resumed checkpoint trained" in resolved.reason
    check_compatible(folder, recipe(tmp_path, False))
    with pytest.raises(UserError, match=r"was saved with other training settings: precision \('no' -> 'bf16'"):
        check_compatible(folder, recipe(tmp_path, True))


def test_auto_resumes_as_a_bf16_checkpoint_trained(tmp_path, monkeypatch, no_launcher):
    folder = saved_checkpoint(tmp_path, "auto", "bf16")
    native(monkeypatch, False)  # this machine would start afresh in fp32
    auto = recipe(tmp_path, "auto")
    check_compatible(folder, auto)
    assert resumed_precision(folder, auto, ENCODER_DECODER, "cpu").accelerator_argument() == "bf16"
    with pytest.raises(UserError, match=r"precision \('bf16' -> 'no': train.bf16=false\)"):
        check_compatible(folder, recipe(tmp_path, False))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # a launcher that contradicts the checkpoint
    with pytest.raises(UserError, match=r"precision \('bf16' -> 'fp16'"):
        check_compatible(folder, auto)


def test_the_accelerator_trains_as_resolved_and_the_log_says_so(tmp_path, monkeypatch, no_launcher, capsys):
    from hftk.prepare import make_accelerator

    native(monkeypatch, True)
    resolved = resolve_precision("auto", ENCODER_DECODER, "cpu")
    accelerator = make_accelerator(recipe(tmp_path, "auto").train, resolved)
    assert accelerator.mixed_precision == "bf16"
    # the run logs this line once its inputs are checked (hftk.run.setup_training)
    assert resolved.line() == "precision: bf16 autocast (train.bf16=auto: this CPU has native bf16)"


def test_an_fp16_checkpoint_off_a_gpu_is_refused_naming_the_checkpoint(tmp_path, no_launcher):
    """A run stopped after checkpoint-2, as if trained in fp16 on a GPU: resumed here under auto, it would train
    in fp16 (a resume keeps its precision), which a CPU cannot. One line names the checkpoint, not the
    accelerate config, before any model loads."""
    from hftk.run_dir import RUN_MANIFEST
    from tests.conftest import digest, run_hftk, write_recipe

    path = write_recipe(tmp_path, tiny_recipe(tmp_path, train={"max_steps": 4, "save_steps": 2, "bf16": "auto"}))
    assert run_hftk("finetune", str(path)).returncode == 0
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoint-4")
    manifest = run / RUN_MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "finished": False}))
    saved = run / "checkpoint-2" / MANIFEST
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "precision": "fp16"}))
    before = digest(run)
    result = run_hftk("finetune", str(path), "train.resume_from_checkpoint=latest")
    assert result.returncode == EXIT_BAD_INPUT
    [line] = result.stderr.strip().splitlines()
    assert "checkpoint-2 trained in fp16, which cannot run on this CPU" in line and "accelerate config" not in line
    assert digest(run) == before  # nothing written, nothing removed
    checked = run_hftk("validate", str(path), "train.resume_from_checkpoint=latest")
    assert checked.returncode == EXIT_BAD_INPUT and checked.stderr.strip() == line
