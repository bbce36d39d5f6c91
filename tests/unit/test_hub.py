"""hftk push: the Hub's servers cannot exist here, so a recording stand-in for HfApi takes the
calls, and the test asserts what would have been sent."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hftk.cli import app
from hftk.errors import UserError
from hftk.hub import push_run, write_model_card


class RecordingApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))


def finished_run(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-4").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "all_results.json").write_text(json.dumps({"eval_rougeL": 0.5}))
    write_model_card(run, "summarization", "task: summarization\n", {"eval_rougeL": 0.5}, None, "AutoModelForSeq2SeqLM",
                     model_ref="me/tiny")
    return run


def test_push_uploads_the_run_without_checkpoints(tmp_path):
    api = RecordingApi()
    url = push_run(finished_run(tmp_path), "me/tiny", private=True, token=None, api=api)
    assert url == "https://huggingface.co/me/tiny"
    (_, repo, create), (_, _, upload) = api.calls
    assert repo == "me/tiny" and create == {"private": True, "exist_ok": True}
    assert upload["folder_path"].endswith("run") and "checkpoint-*" in upload["ignore_patterns"]
    card = (tmp_path / "run" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and 'from_pretrained("me/tiny")' in card


def test_push_refuses_an_unfinished_run(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="not a finished hftk run"):
        push_run(tmp_path / "half", "me/tiny", private=False, token=None, api=RecordingApi())


def test_push_command_checks_the_repo_id(tmp_path):
    result = CliRunner().invoke(app, ["push", str(finished_run(tmp_path)), "--repo-id", "no-slash"])
    assert result.exit_code == 2 and "--repo-id must be USER/NAME" in result.stderr


RESULTS = {"train_loss": 2.5, "eval_loss": 1.25, "eval_rouge1": 0.4, "eval_rougeL": 0.375, "eval_samples": 16,
           "trainable_parameters": 3072, "total_parameters": 33632}


def test_card_model_index_holds_the_eval_scores(tmp_path):
    from huggingface_hub import ModelCard, metadata_load

    write_model_card(tmp_path, "summarization", "task: summarization\n", RESULTS, "google-t5/t5-small",
                     "AutoModelForSeq2SeqLM", adapter=True, datasets=["EdinburghNLP/xsum", str(tmp_path)],
                     eval_dataset="EdinburghNLP/xsum")
    card = ModelCard.load(tmp_path / "README.md")
    scores = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert scores == {k: v for k, v in RESULTS.items() if k.startswith("eval_") and k != "eval_samples"}
    assert {(r.task_type, r.dataset_type, r.dataset_split) for r in card.data.eval_results} == {
        ("summarization", "EdinburghNLP/xsum", "validation")}
    metadata = metadata_load(tmp_path / "README.md")
    assert metadata["library_name"] == "peft" and metadata["pipeline_tag"] == "summarization"
    assert metadata["base_model"] == "google-t5/t5-small" and metadata["datasets"] == ["EdinburghNLP/xsum"]
    assert "AutoPeftModelForSeq2SeqLM" in card.text and "pipeline(" not in card.text


def test_card_leaves_local_paths_out(tmp_path):
    from huggingface_hub import metadata_load

    base = tmp_path / "base"
    base.mkdir()
    write_model_card(tmp_path, "extractive_qa", "task: extractive_qa\n", {"eval_f1": 50.0}, str(base),
                     "AutoModelForQuestionAnswering", datasets=["data/qa/train.jsonl"],
                     eval_dataset="data/qa/validation.jsonl")
    metadata = metadata_load(tmp_path / "README.md")
    assert "base_model" not in metadata and "datasets" not in metadata
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "question-answering"
    result = metadata["model-index"][0]["results"][0]
    assert result["task"]["type"] == "question-answering" and result["metrics"] == [
        {"type": "f1", "value": 50.0, "name": "eval_f1"}]


@pytest.mark.parametrize("auto_class, task", [("AutoModelForCausalLM", "text_generation"),
                                              ("AutoModelForSeq2SeqLM", "translation"),
                                              ("AutoModelForQuestionAnswering", "extractive_qa")])
@pytest.mark.parametrize("adapter", [False, True])
def test_usage_snippet_is_python_without_pipelines(auto_class, task, adapter):
    from hftk.hub import usage_snippet

    code = usage_snippet(auto_class, "me/tiny", adapter, task)
    compile(code, "snippet", "exec")
    assert "pipeline" not in code and ("peft" in code) == adapter


def hub_settings(**values):
    from hftk.recipe import HubSection

    return HubSection(**{"push": True, "repo_id": "me/tiny", **values})


def test_hub_section_pushes_the_finished_run(tmp_path, monkeypatch):
    from hftk.hub import push_finished_run

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    api = RecordingApi()
    assert push_finished_run(hub_settings(private=True), finished_run(tmp_path), api=api) == "https://huggingface.co/me/tiny"
    (_, repo, create), (_, _, upload) = api.calls
    assert repo == "me/tiny" and create == {"private": True, "exist_ok": True}
    assert upload["folder_path"] == str(tmp_path / "run") and "checkpoint-*" in upload["ignore_patterns"]
    assert push_finished_run(hub_settings(push=False), tmp_path / "run", api=api) is None and len(api.calls) == 2


def test_hub_push_needs_the_network_and_a_token(monkeypatch):
    from huggingface_hub import constants

    from hftk.hub import check_push

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="hub.push: HF_HUB_OFFLINE is set"):
        check_push(hub_settings())
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(UserError, match="hub.push: no Hugging Face token"):
        check_push(hub_settings())
    check_push(hub_settings(push=False))  # nothing to push: nothing to check


def test_hub_push_offline_stops_finetune_before_writing(tmp_path):
    from tests.conftest import run_hftk, tiny_recipe, write_recipe

    recipe = tiny_recipe(tmp_path)
    recipe["hub"] = {"push": True, "repo_id": "me/tiny"}
    result = run_hftk("finetune", str(write_recipe(tmp_path, recipe)), env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "hub.push" in result.stderr and not (tmp_path / "run").exists()


def test_hub_section_needs_a_repo_id():
    from hftk.recipe import HubSection

    with pytest.raises(ValueError, match="hub.push needs hub.repo_id"):
        HubSection(push=True)
    with pytest.raises(ValueError, match="USER/NAME"):
        HubSection(repo_id="no-slash")


def test_hub_dataset_gets_eval_results_entries(tmp_path):
    """The current .eval_results/*.yaml form, parsed back with huggingface_hub, holds the same scores."""
    import yaml
    from huggingface_hub import parse_eval_result_entries

    write_model_card(tmp_path, "summarization", "task: summarization\n", RESULTS, None, "AutoModelForSeq2SeqLM",
                     eval_dataset="EdinburghNLP/xsum", eval_split="test")
    entries = parse_eval_result_entries(yaml.safe_load((tmp_path / ".eval_results" / "xsum.yaml").read_text()))
    assert {e.task_id: e.value for e in entries} == {
        k.removeprefix("eval_"): v for k, v in RESULTS.items() if k.startswith("eval_") and k != "eval_samples"}
    assert {(e.dataset_id, e.notes) for e in entries} == {("EdinburghNLP/xsum", "split test")}
    local = tmp_path / "local"
    local.mkdir()
    write_model_card(local, "summarization", "task: summarization\n", RESULTS, None, "AutoModelForSeq2SeqLM",
                     eval_dataset="data/summarize/validation.jsonl")
    assert not (local / ".eval_results").exists()  # a local file is no Hub dataset
