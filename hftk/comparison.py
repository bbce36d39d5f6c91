"""Paired comparisons of evaluations on the examples they share: the difference of each metric, its 95%
paired bootstrap interval and an approximate randomization p-value (hftk.intervals), read back from
predictions.jsonl; and the gate `hftk push --require-better-than` puts before an upload.

Rows are matched by id (the k-th row with an id against the k-th row with the same id on the other
side). Mean metrics come from each row's `scores`, BLEU and chrF from its prediction and references.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hftk import intervals
from hftk.errors import UserError

PREDICTIONS = "predictions.jsonl"
START_PREDICTIONS = "predictions_step0.jsonl"  # train.eval_on_start: the checkpoint's own predictions
START = "start"  # --require-better-than start: the run's own step-0 evaluation
SIGNIFICANCE = 0.05
DEFAULT_SAMPLES = 1000


@dataclass(frozen=True)
class Comparison:
    """b against a on one metric: delta = b - a."""

    metric: str
    a: float
    b: float
    delta: float
    ci95: list[float]
    p_value: float
    examples: int
    greater_is_better: bool

    @property
    def significant(self) -> bool:
        return self.p_value < SIGNIFICANCE

    @property
    def better(self) -> bool:
        """Significantly better: lower for a loss or perplexity, higher for the rest."""
        return self.significant and (self.delta > 0 if self.greater_is_better else self.delta < 0)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "a": self.a, "b": self.b, "delta": self.delta, "ci95": self.ci95,
                "p_value": self.p_value, "significant": self.significant, "examples": self.examples,
                "greater_is_better": self.greater_is_better}

    def sentence(self) -> str:
        return (f"{self.metric} difference {self.delta:+.4g}, 95% interval [{self.ci95[0]:.4g}, {self.ci95[1]:.4g}], "
                f"p = {self.p_value:.3g} on {self.examples} examples")


@dataclass(frozen=True)
class Settings:
    samples: int = DEFAULT_SAMPLES
    seed: int = 12345

    @classmethod
    def of_recipe(cls, recipe: dict[str, Any]) -> Settings:
        """A run's eval.bootstrap_samples and bootstrap_seed; a run without intervals still compares."""
        section = recipe.get("eval") or {}
        return cls(int(section.get("bootstrap_samples") or DEFAULT_SAMPLES), int(section.get("bootstrap_seed") or 12345))


def read_rows(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path.parent} has no {path.name} to compare")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError:
        raise UserError(f"{path} is not valid JSON lines") from None


def read_recipe(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        return {}
    loaded = yaml.safe_load(path.read_text())
    return loaded if isinstance(loaded, dict) else {}


def task_of(recipe: dict[str, Any]) -> Any:
    from hftk.tasks import get_task

    name = recipe.get("task")
    return get_task(name) if name else None


def shared(rows_a: list[dict], rows_b: list[dict]) -> tuple[list[dict], list[dict]]:
    """The rows both sides hold, paired by id and occurrence, in a's order."""
    def keyed(rows: list[dict]) -> dict[tuple[str, int], dict]:
        seen: Counter = Counter()
        found = {}
        for row in rows:
            key = json.dumps(row.get("id"))
            found[(key, seen[key])] = row
            seen[key] += 1
        return found

    a, b = keyed(rows_a), keyed(rows_b)
    both = [key for key in a if key in b]
    return [a[k] for k in both], [b[k] for k in both]


def row_statistics(rows: list[dict], task: Any) -> dict[str, intervals.Statistic]:
    found = intervals.score_statistics([row.get("scores", {}) for row in rows])
    if task is not None and rows and all("prediction" in r and "reference" in r for r in rows):
        found.update(task.corpus_statistics([r["prediction"] for r in rows], [r["reference"] for r in rows]))
    return found


def compare_rows(rows_a: list[dict], rows_b: list[dict], task: Any, settings: Settings = Settings(),
                 only: str | None = None) -> list[Comparison]:
    """Every metric both sides have (or `only` that one), the task's headline metric first."""
    paired_a, paired_b = shared(rows_a, rows_b)
    if not paired_a:
        return []
    stats_a, stats_b = row_statistics(paired_a, task), row_statistics(paired_b, task)
    headline = getattr(task, "headline_metric", None)
    names = sorted(set(stats_a) & set(stats_b), key=lambda n: (n != headline, n))
    if only is not None:
        names = [n for n in names if n == only]
    return [compare(name, stats_a[name], stats_b[name], settings) for name in names]


def compare(name: str, a: intervals.Statistic, b: intervals.Statistic, settings: Settings) -> Comparison:
    return Comparison(metric=name, a=a.value(), b=b.value(), delta=b.value() - a.value(),
                      ci95=intervals.difference_interval(a, b, settings.samples, settings.seed),
                      p_value=intervals.randomization_p_value(a, b, seed=settings.seed), examples=len(a),
                      greater_is_better=a.greater_is_better)


def against_start(run_dir: Path, task: Any, settings: Settings) -> list[Comparison]:
    """The fine-tuned model (predictions.jsonl) against the checkpoint it started from; [] without a
    step-0 evaluation."""
    run_dir = Path(run_dir)
    if not (run_dir / START_PREDICTIONS).is_file() or not (run_dir / PREDICTIONS).is_file():
        return []
    return compare_rows(read_rows(run_dir / START_PREDICTIONS), read_rows(run_dir / PREDICTIONS), task, settings)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        found: dict[str, Any] = {}
        for key, value in tree.items():
            found.update(flatten(value, f"{prefix}{key}."))
        return found
    return {prefix.rstrip("."): tree}


# Values that differ between any two runs and say nothing about them: where each run was written.
NOT_SETTINGS = {"train.output_dir"}


def recipe_differences(recipes: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Every dotted recipe key whose value is not the same in all runs (None where a run lacks it)."""
    flat = [flatten(r) for r in recipes]
    keys = sorted({k for f in flat for k in f} - NOT_SETTINGS)
    return {k: [f.get(k) for f in flat] for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1}


def compare_run_dirs(run_dirs: list[Path], labels: list[str]) -> dict[str, Any]:
    """What `hftk report --json` prints: the runs, the recipe values that differ, and every later run
    against the first on the examples they share."""
    recipes = [read_recipe(d) for d in run_dirs]
    first_rows = _rows_if_any(run_dirs[0])
    task, settings = task_of(recipes[0]), Settings.of_recipe(recipes[0])
    comparisons = []
    for run_dir, label in zip(run_dirs[1:], labels[1:]):
        rows = _rows_if_any(run_dir)
        if first_rows and rows:
            comparisons += [{"run": label, "baseline": labels[0], **c.to_dict()}
                            for c in compare_rows(first_rows, rows, task, settings)]
    return {"runs": labels, "differences": recipe_differences(recipes), "comparisons": comparisons}


def _rows_if_any(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / PREDICTIONS
    return read_rows(path) if path.is_file() else []


def gate(run_dir: Path, other: str, metric: str | None = None) -> Comparison:
    """The run's comparison against `other` (a run folder, or `start`) on `metric` (default: the task's
    headline metric); a UserError in one line unless the run is significantly better."""
    run_dir = Path(run_dir)
    recipe = read_recipe(run_dir)
    task = task_of(recipe)
    metric = (metric or getattr(task, "headline_metric", None) or "loss").removeprefix("eval_")
    if other == START:
        baseline_path, baseline = run_dir / START_PREDICTIONS, "its step-0 score"
        if not baseline_path.is_file():
            raise UserError(f"--require-better-than start: {run_dir} has no step-0 evaluation ({START_PREDICTIONS}); "
                            f"train with train.eval_on_start=true")
    else:
        baseline_path, baseline = Path(other).expanduser() / PREDICTIONS, str(other)
    rows_a, rows_b = read_rows(baseline_path), read_rows(run_dir / PREDICTIONS)
    if not shared(rows_a, rows_b)[0]:
        raise UserError(f"push refused: {run_dir} and {baseline} share no evaluated example ids")
    found = compare_rows(rows_a, rows_b, task, Settings.of_recipe(recipe), only=metric)
    if not found:
        raise UserError(f"push refused: {metric} is not in both {run_dir}'s and {baseline}'s predictions "
                        f"(choose another with --metric)")
    (comparison,) = found
    if not comparison.better:
        raise UserError(f"push refused: {run_dir} is not significantly better than {baseline}: {comparison.sentence()}")
    return comparison
