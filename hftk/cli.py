"""The hftk command line: parse flags, load the recipe, call run.py. No ML logic here."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import typer

from hftk.errors import HftkError, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune, evaluate and publish Hugging Face models from one YAML recipe.")

RecipeArg = typer.Argument(..., help="The recipe YAML.", show_default=False)
OverridesArg = typer.Argument(None, help="Dotted KEY=VALUE overrides, e.g. train.learning_rate=3e-4.",
                              show_default=False)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


# How long the other processes of a launch wait, after the same known ending, before they exit: the
# launcher ends every process once one has exited, and the first must have printed its line by then.
SPEAKER_GRACE_S = 3.0


def _is_first_on_machine() -> bool:
    """Prints the line a run ends with: each machine keeps its own log, and the machine a scheduler
    stopped must say so (and where the checkpoint is) as well as machine 0."""
    return os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0"


def _offline_defaults() -> None:
    # evaluate ignores HF_HUB_OFFLINE and would try (and hang on) the network; keep them in step.
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


QuietOpt = typer.Option(False, "--quiet", "-q", help="Show errors only: no progress bar, no log lines.")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Also show the libraries' own log lines and warnings.")


def _verbosity(quiet: bool, verbose: bool) -> str:
    if quiet and verbose:
        raise UserError("--quiet and --verbose exclude each other")
    return "quiet" if quiet else "verbose" if verbose else "normal"


def _guarded(action: Callable[[], object], quiet: bool = False, verbose: bool = False) -> None:
    """Known endings (bad input 2, a run that cannot go on 1, preempted 75) print one line on stderr;
    anything else is a bug and keeps its traceback (exit 1)."""
    _offline_defaults()
    from hftk.logs import set_verbosity, setup_logging

    try:
        set_verbosity(_verbosity(quiet, verbose))
    except UserError as err:
        print(f"hftk: error: {err}", file=sys.stderr)
        raise typer.Exit(err.exit_status) from None
    setup_logging(_is_main_process())  # before the checks, so their notes (e.g. repaired QA rows) show
    try:
        action()
    except HftkError as err:
        if _is_first_on_machine() or getattr(err, "each_process", False):
            kind = "stopped" if err.exit_status == 75 else "error"
            print(f"hftk: {kind}: {err}", file=sys.stderr)
        else:  # the first process speaks for the machine: leave after it, or the launcher ends it first
            import time

            time.sleep(SPEAKER_GRACE_S)
        raise typer.Exit(err.exit_status) from None


@app.command()
def finetune(recipe: Path = RecipeArg, overrides: list[str] | None = OverridesArg, quiet: bool = QuietOpt,
             verbose: bool = VerboseOpt) -> None:
    """Validate the recipe, prepare data, train, evaluate and save."""
    from hftk.recipe import load_recipe

    def action():
        from hftk import followups
        from hftk.errors import Preempted

        checked = load_recipe(recipe, overrides)  # a mistyped key shows before torch is imported
        from hftk.run import finetune as run_finetune

        try:
            run_finetune(checked)
        except Preempted as stopped:  # said with the exact command that continues it
            raise Preempted(f"{stopped}; {followups.continue_command(recipe, overrides or [], checked)}") from None
        if _is_main_process() and not quiet:
            print(followups.finished_line(recipe, overrides or [], checked.train.output_dir), file=sys.stderr)

    _guarded(action, quiet, verbose)


@app.command(name="eval")
def evaluate(
    recipe: Path = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    model: str | None = typer.Option(None, "--model", show_default=False,
                                     help="The saved model's directory (default: the recipe's train.output_dir)."),
    split: str = typer.Option("validation", "--split", help="validation, test or train."),
    output_dir: str | None = typer.Option(None, "--output-dir", show_default=False,
                                          help="Where results go (default: MODEL/eval/SPLIT)."),
    prompt: list[str] | None = typer.Option(None, "--prompt", help="Also sample a continuation of this text "
                                               "into samples.jsonl (repeatable)."),
    temperature: float = typer.Option(0.8, "--temperature", min=0.01, help="Sampling temperature for --prompt."),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Evaluate a saved model on a split; writes eval_results.json and predictions.jsonl (under MODEL/eval/SPLIT)."""
    from hftk.recipe import load_recipe

    def action():
        if split not in {"train", "validation", "test"}:
            raise UserError(f"--split must be train, validation or test, not '{split}'")
        checked = load_recipe(recipe, overrides)
        from hftk.eval_split import evaluate_saved

        results = evaluate_saved(checked, _expand_home(model), split, _expand_home(output_dir), prompt, temperature)
        if _is_main_process():
            for key, value in results.items():
                if isinstance(value, list):  # eval_<metric>_ci95
                    typer.echo(f"{key}: [{value[0]:.4f}, {value[1]:.4f}]")
                else:
                    typer.echo(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")

    _guarded(action, quiet, verbose)


@app.command()
def validate(recipe: Path = RecipeArg, overrides: list[str] | None = OverridesArg,
             no_cache: bool = typer.Option(False, "--no-cache", help="Check the data and the model again even "
                                           "if these exact inputs passed before.")) -> None:
    """Check the recipe, its files and columns and the model config without loading a model."""
    from hftk.recipe import load_recipe

    def action():
        from hftk.validate import validate as validate_recipe

        for line in validate_recipe(load_recipe(recipe, overrides), remember=not no_cache):
            typer.echo(line)

    _guarded(action)


@app.command()
def push(
    run_dir: Path = typer.Argument(..., help="A finished run's output_dir.", show_default=False),
    repo_id: str = typer.Option(..., "--repo-id", help="USER/NAME on the Hugging Face Hub."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    require_better_than: str | None = typer.Option(
        None, "--require-better-than", show_default=False,
        help="Push only a run significantly better (paired test, p < 0.05) than this run folder, or than its own "
             "step-0 score with `start` (default: the run recipe's hub.require_better_than)."),
    metric: str | None = typer.Option(None, "--metric", show_default=False,
                                      help="The metric --require-better-than compares (default: the task's "
                                           "headline metric: rougeL, bleu, f1 or perplexity)."),
) -> None:
    """Upload a finished run with its model card through huggingface_hub."""

    def action():
        from hftk.comparison import read_recipe
        from hftk.hub import push_run

        if "/" not in repo_id:
            raise UserError(f"--repo-id must be USER/NAME, not '{repo_id}'")
        section = read_recipe(run_dir).get("hub") or {}
        other = require_better_than or section.get("require_better_than")
        if metric and not other:
            raise UserError("--metric needs --require-better-than (or hub.require_better_than in the run's recipe)")
        typer.echo(push_run(run_dir, repo_id, private, token=None, require_better_than=other,
                            metric=metric or section.get("require_better_on")))

    _guarded(action)


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="Finished runs' output_dir folders.", show_default=False),
    output: Path | None = typer.Option(None, "--output", show_default=False,
                                       help="Where the picture goes (default: report.png in the first run's folder)."),
    as_json: bool = typer.Option(False, "--json", help="Print the runs, the recipe values that differ and the "
                                                       "paired comparisons as one JSON object (no table, no picture)."),
) -> None:
    """Compare finished runs side by side: a table of their results, the recipe values that differ, paired
    comparisons against the first run on the examples they share, and one picture of their curves."""

    def action():
        from hftk.report import compare_runs, comparison_report

        if as_json:
            import json

            typer.echo(json.dumps(comparison_report(run_dirs), indent=2))
            return
        from hftk.report import report_picture_path

        picture = report_picture_path(run_dirs, output)
        compare_runs(run_dirs, picture)
        typer.echo(f"picture: {picture}")

    _guarded(action)


@app.command()
def plan(
    recipe: Path = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    config_file: Path | None = typer.Option(None, "--config-file", show_default=False,
                                            help="The accelerate config the run will use (processes, precision)."),
    num_processes: int | None = typer.Option(None, "--num-processes", min=1, show_default=False,
                                             help="Processes to plan for (default: the config's, or 1)."),
    bandwidth_gbps: float = typer.Option(100.0, "--bandwidth-gbps",
                                         help="Interconnect bandwidth per device, in gigabits per second."),
    latency_us: float = typer.Option(5.0, "--latency-us", help="Latency of one ring hop, in microseconds."),
    tflops: float = typer.Option(100.0, "--tflops", help="Achieved TFLOP/s per device of the device the step-time "
                                                          "table assumes (not this machine's: --probe measures it)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    probe: int = typer.Option(0, "--probe", min=0, max=1000, show_default=False,
                              help="Time at least this many real optimizer steps here (one process; up to 10x as "
                                   "many while they take under 3 s) and estimate the training time; the measured "
                                   "step replaces --tflops in the step-time table. Loads real weights."),
) -> None:
    """Parameters, memory per process per strategy, token lengths and padding, steps and FLOPs, and the
    bytes sent and step time of each strategy and communication hook on 1 to 1024 devices, without
    loading weights."""
    from hftk.recipe import load_recipe

    def action():
        import json

        link = interconnect(bandwidth_gbps, latency_us, tflops)
        checked = load_recipe(recipe, overrides)  # a mistyped key shows before torch is imported
        from hftk.planning.planner import make_plan, print_plan, read_launch_config

        report = make_plan(checked, read_launch_config(config_file, num_processes), link, probe)
        if as_json:
            typer.echo(json.dumps(report.to_dict(), indent=2))
        else:
            print_plan(report)

    _guarded(action, quiet=as_json)


def interconnect(bandwidth_gbps: float, latency_us: float, tflops: float):
    """The plan's network and device speed; nan and non-positive speeds are bad input."""
    from hftk.planning.scaling import Interconnect

    for flag, value in (("--bandwidth-gbps", bandwidth_gbps), ("--tflops", tflops)):
        if not 0 < value < float("inf"):
            raise UserError(f"{flag} must be a positive number, not {value:g}")
    if not 0 <= latency_us < float("inf"):
        raise UserError(f"--latency-us must be 0 or more, not {latency_us:g}")
    return Interconnect(bandwidth_gbps, latency_us, tflops)


@app.command(name="recipe-schema")
def recipe_schema(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
    markdown: bool = typer.Option(False, "--markdown", help="Print markdown tables (the README's recipe reference)."),
    readme: Path | None = typer.Option(None, "--write-readme", show_default=False,
                                       help="Write the markdown between the recipe-reference marker comments of "
                                            "this README."),
) -> None:
    """Every recipe key with its type, default and description."""

    def action():
        import json

        from hftk.schema import markdown_reference, print_schema, recipe_keys, write_readme

        if sum((as_json, markdown, readme is not None)) > 1:
            raise UserError("--json, --markdown and --write-readme exclude each other")
        if as_json:
            typer.echo(json.dumps(recipe_keys(), indent=2, default=str))
        elif markdown:
            typer.echo(markdown_reference(), nl=False)
        elif readme is not None:
            changed = write_readme(readme)
            typer.echo(f"{readme}: recipe reference {'updated' if changed else 'already current'}")
        else:
            print_schema()

    _guarded(action)


def _expand_home(path: str | None) -> str | None:
    # the shell leaves `--model=~/run` alone; the recipe's own paths are expanded the same way
    return os.path.expanduser(path) if path else path


def main() -> None:
    """Usage errors (a missing argument, an unknown option, a bad option value) end like any other bad
    input: one line on stderr and exit 2, instead of click's framed usage box."""
    try:
        status = app(prog_name="hftk", standalone_mode=False)
    except _usage_errors() as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # plain `hftk` prints the help, as before
            if err.format_message().strip():  # unless rich has printed it already
                print(err.format_message(), file=sys.stderr)
        elif _is_first_on_machine():
            print(f"hftk: error: {' '.join(err.format_message().split())}", file=sys.stderr)
        status = err.exit_code
    except typer.Abort:  # end of input at a prompt
        print("Aborted!", file=sys.stderr)
        status = 1
    sys.exit(status if isinstance(status, int) else 0)


def _usage_errors() -> tuple[type[Exception], ...]:
    # typer 0.2x raises its own copy of click's exceptions; older releases raise click's
    classes: list[type[Exception]] = [typer.TyperException] if hasattr(typer, "TyperException") else []
    try:
        import click

        classes.append(click.ClickException)
    except ImportError:
        pass
    return tuple(classes)
