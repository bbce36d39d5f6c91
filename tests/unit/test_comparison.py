"""`hftk report --json` and the push gate on runs with known predictions; the Hub is a recording
stand-in (as in test_hub.py), so a refused push shows as no request at all."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction

import pytest
import yaml
from typer.testing import CliRunner

from hftk import comparison
from hftk.cli import app
from hftk.errors import UserError
from hftk.hub import push_finished_run, push_run
from tests.conftest import run_hftk
from tests.unit.test_hub import RecordingApi


def fake_run(folder, f1: dict[str, float], learning_rate: float = 1e-3, task: str = "extractive_qa",
             start: dict[str, float] | None = None, hub: dict | None = None):
    """A finished run folder: results, recipe and QA predictions whose per-example F1 is given (exact match
    is 100 where F1 is)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "all_results.json").write_text(json.dumps({"eval_f1": sum(f1.values()) / len(f1)}))
    recipe = {"task": task, "train": {"output_dir": str(folder), "learning_rate": learning_rate, "seed": 42},
              "eval": {"bootstrap_samples": 500}, **({"hub": hub} if hub else {})}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    write_predictions(folder / comparison.PREDICTIONS, f1)
    if start is not None:
        write_predictions(folder / comparison.START_PREDICTIONS, start)
    return folder


def write_predictions(path, f1: dict[str, float]) -> None:
    path.write_text("".join(json.dumps({"id": i, "prediction": "x", "reference": ["x"],
                                        "scores": {"exact_match": 100.0 * (v == 100), "f1": v}}) + "\n"
                            for i, v in f1.items()))


BASE = {"q1": 0.0, "q2": 50.0, "q3": 100.0, "q4": 25.0, "q5": 0.0, "q6": 100.0, "q7": 0.0, "only-a": 100.0}
# Shuffled, one example the first run lacks, one it has missing: 7 shared examples.
CHANGED = {"q7": 100.0, "q6": 100.0, "q5": 50.0, "new": 0.0, "q4": 25.0, "q3": 50.0, "q2": 100.0, "q1": 0.0}


def brute_force_p(a: list[float], b: list[float]) -> Fraction:
    differences = [Fraction(y) - Fraction(x) for x, y in zip(a, b)]
    observed = abs(sum(differences))
    flips = list(itertools.product((1, -1), repeat=len(differences)))
    return Fraction(sum(abs(sum(s * d for s, d in zip(signs, differences))) >= observed for signs in flips), len(flips))


def test_report_json_pairs_runs_by_id(tmp_path):
    first = fake_run(tmp_path / "base", BASE)
    second = fake_run(tmp_path / "changed", CHANGED, learning_rate=3e-3)
    result = run_hftk("report", str(first), str(second), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["runs"] == ["base", "changed"]
    assert report["differences"] == {"train.learning_rate": [1e-3, 3e-3]}
    by_metric = {c["metric"]: c for c in report["comparisons"]}
    assert [c["metric"] for c in report["comparisons"]] == ["f1", "exact_match"]  # the task's headline first
    f1 = by_metric["f1"]
    ids = [i for i in BASE if i in CHANGED]
    a, b = [BASE[i] for i in ids], [CHANGED[i] for i in ids]
    assert f1["examples"] == 7
    assert f1["a"] == pytest.approx(sum(a) / 7) and f1["b"] == pytest.approx(sum(b) / 7)
    assert f1["delta"] == pytest.approx((sum(b) - sum(a)) / 7, abs=1e-12)
    assert f1["p_value"] == pytest.approx(float(brute_force_p(a, b)), abs=1e-12)
    assert f1["significant"] == (f1["p_value"] < 0.05) and f1["ci95"][0] <= f1["delta"] <= f1["ci95"][1]
    exact = by_metric["exact_match"]
    assert exact["p_value"] == pytest.approx(float(brute_force_p([100.0 * (v == 100) for v in a],
                                                                 [100.0 * (v == 100) for v in b])), abs=1e-12)


def test_report_table_lists_differences_and_comparisons(tmp_path):
    from rich.console import Console

    from hftk.report import comparison_report, comparison_tables

    first = fake_run(tmp_path / "base", BASE)
    second = fake_run(tmp_path / "changed", CHANGED, learning_rate=3e-3)
    console = Console(record=True, width=200)
    for table in comparison_tables(comparison_report([first, second])):
        console.print(table)
    text = console.export_text()
    assert "train.learning_rate" in text and "0.0010" in text and "0.0030" in text
    f1_line = next(line for line in text.splitlines() if line.strip().startswith("│ f1"))
    assert "changed" in f1_line and "+21.4286" in f1_line and f1_line.rstrip(" │").endswith("7")  # +150 / 7 on 7


def test_report_on_one_run_has_nothing_to_pair(tmp_path):
    from hftk.report import comparison_report

    report = comparison_report([fake_run(tmp_path / "only", BASE)])
    assert report == {"runs": ["only"], "differences": {}, "comparisons": []}


GOOD = {f"q{i}": 100.0 for i in range(30)}
POOR = {f"q{i}": (100.0 if i % 3 == 0 else 0.0) for i in range(30)}


@pytest.fixture
def hub_api(monkeypatch):
    """Every HfApi hftk makes is this recorder: a request shows in its calls."""
    import huggingface_hub

    api = RecordingApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda **_: api)
    return api


def test_push_gate_refuses_a_worse_run_before_any_request(tmp_path, hub_api):
    base = fake_run(tmp_path / "base", GOOD)
    worse = fake_run(tmp_path / "worse", POOR)
    result = CliRunner().invoke(app, ["push", str(worse), "--repo-id", "me/tiny", "--require-better-than", str(base)])
    assert result.exit_code == 2 and hub_api.calls == []
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"hftk: error: push refused: {worse} is not significantly better than {base}: f1 difference")
    assert "95% interval [" in line and "on 30 examples" in line


def test_push_gate_lets_a_better_run_through(tmp_path, hub_api):
    base = fake_run(tmp_path / "base", POOR)
    better = fake_run(tmp_path / "better", GOOD)
    result = CliRunner().invoke(app, ["push", str(better), "--repo-id", "me/tiny", "--require-better-than", str(base)])
    assert result.exit_code == 0, result.stderr
    assert [call[0] for call in hub_api.calls] == ["create_repo", "upload_folder"]


def test_push_gate_against_the_runs_own_start_and_the_recipes_setting(tmp_path, hub_api):
    improved = fake_run(tmp_path / "improved", GOOD, start=POOR, hub={"require_better_than": "start"})
    assert comparison.gate(improved, "start").delta > 0
    unchanged = fake_run(tmp_path / "unchanged", POOR, start=POOR, hub={"require_better_than": "start"})
    result = CliRunner().invoke(app, ["push", str(unchanged), "--repo-id", "me/tiny"])  # the recipe's gate
    assert result.exit_code == 2 and "than its step-0 score: f1 difference +0" in result.stderr
    assert hub_api.calls == []
    without = fake_run(tmp_path / "without", GOOD)
    with pytest.raises(UserError, match="has no step-0 evaluation"):
        comparison.gate(without, "start")


def test_push_gate_metric_flag_picks_another_metric(tmp_path):
    # F1 rises everywhere, exact match nowhere: better on f1, not on exact_match.
    base = fake_run(tmp_path / "base", {f"q{i}": 10.0 for i in range(20)})
    closer = fake_run(tmp_path / "closer", {f"q{i}": 90.0 for i in range(20)})
    api = RecordingApi()
    push_run(closer, "me/tiny", False, None, api=api, require_better_than=str(base))
    with pytest.raises(UserError, match="exact_match difference \\+0"):
        push_run(closer, "me/tiny", False, None, api=(api := RecordingApi()), require_better_than=str(base),
                 metric="eval_exact_match")
    assert api.calls == []


def test_push_gate_on_perplexity_wants_it_lower(tmp_path):
    def lm_run(name, losses):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "recipe.yaml").write_text(yaml.safe_dump({"task": "text_generation"}))
        (folder / comparison.PREDICTIONS).write_text("".join(
            json.dumps({"id": i, "scores": {"loss": loss, "tokens": 32.0}}) + "\n" for i, loss in enumerate(losses)))
        return folder

    high = lm_run("high", [3.0 + 0.1 * (i % 5) for i in range(40)])
    low = lm_run("low", [2.0 + 0.1 * (i % 5) for i in range(40)])
    passed = comparison.gate(low, str(high))
    assert passed.metric == "perplexity" and passed.delta < 0 and passed.better
    with pytest.raises(UserError, match="perplexity difference \\+"):
        comparison.gate(high, str(low))


def test_finetune_push_skips_a_refused_gate_in_one_line(tmp_path, monkeypatch, caplog):
    from hftk.recipe import HubSection

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    base = fake_run(tmp_path / "base", GOOD)
    worse = fake_run(tmp_path / "worse", POOR)
    api = RecordingApi()
    settings = HubSection(push=True, repo_id="me/tiny", require_better_than=str(base))
    assert push_finished_run(settings, worse, api=api) is None and api.calls == []
    refused = [r.getMessage() for r in caplog.records if "push refused" in r.getMessage()]
    assert len(refused) == 1 and "not pushed" in refused[0]
    assert push_finished_run(settings.model_copy(update={"require_better_than": None}), worse, api=api)


def test_card_shows_intervals_and_the_start_against_the_end(tmp_path):
    from huggingface_hub import ModelCard

    from hftk.hub import write_model_card

    run = fake_run(tmp_path / "run", GOOD, start=POOR)
    paired = comparison.against_start(run, comparison.task_of(comparison.read_recipe(run)), comparison.Settings(500))
    assert [c.metric for c in paired] == ["f1", "exact_match"] and all(c.better for c in paired)
    results = {"eval_loss": 1.25, "eval_loss_ci95": [1.2, 1.3], "eval_f1": 100.0, "eval_f1_ci95": [100.0, 100.0],
               "eval_samples": 30}
    before = {"step": 0, "eval_loss": 2.5, "eval_f1": 100 / 3, "eval_samples": 30}
    write_model_card(run, "extractive_qa", "task: extractive_qa\n", results, None, "AutoModelForQuestionAnswering",
                     before=before, paired=paired)
    card = ModelCard.load(run / "README.md")
    assert "| eval_loss | 1.2500 | [1.2000, 1.3000] |" in card.text
    assert {r.metric_name for r in card.data.eval_results} == {"eval_loss", "eval_f1"}  # no interval in model-index
    f1 = paired[0]
    assert (f"| eval_f1 | 33.3333 | 100.0000 | +66.6667 | [{f1.ci95[0]:.4f}, {f1.ci95[1]:.4f}] | "
            f"{f1.p_value:.3g} | yes |") in card.text
    assert "| eval_loss | 2.5000 | 1.2500 | -1.2500 | - | - | - |" in card.text  # no per-example losses: no test
