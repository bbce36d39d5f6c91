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
