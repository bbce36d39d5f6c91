"""What `hftk plan` prints: tables that fit 80 columns with one line per row, a one-process launch named as
one, and a step time that says where its compute figure comes from (the probe, or an assumed device)."""

from __future__ import annotations

import json

import pytest

from hftk.planning.planner import PRECISIONS
from hftk.planning.probe import typical_step_seconds
from hftk.planning.scaling import Interconnect, TensorShape, scale_plan
from hftk.recipe import ParallelSection
from tests.conftest import ROOT, run_here, tiny_recipe, write_recipe
from tests.integration.test_tensor_parallel import LLAMA

ZERO3 = str(ROOT / "accelerate_configs" / "zero3.yaml")


def plan_output(*args: str, columns: int = 80) -> tuple[str, dict]:
    """The tables at `columns` and the --json report of the same plan. In this interpreter: the tables read
    COLUMNS when they print, not when the process starts."""
    shown = run_here(["plan", *args], ROOT, {"COLUMNS": str(columns)})
    assert shown.returncode == 0, shown.stderr
    planned = run_here(["plan", *args, "--json"], ROOT, {})
    assert planned.returncode == 0, planned.stderr
    return shown.stdout, json.loads(planned.stdout)


def table_body(lines: list[str], title: str) -> list[str]:
    """The rows of the table printed under `title`: from the rule below its header to its first blank or
    indented line."""
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rule = next(i for i in range(start, len(lines)) if lines[i].startswith("─"))
    body = []
    for line in lines[rule + 1:]:
        if not line.strip() or line.startswith("  "):
            break
        body.append(line)
    return body


def scale_labels(report: dict) -> list[str]:
    labels = []
    for row in report["scale"]["rows"]:
        label = (f"ddp + {row['comm_hook']}" if row["strategy"] == "ddp" else
                 f"fsdp_tp (tp {row['tp_size']})" if row["strategy"] == "fsdp_tp" else row["strategy"])
        if label not in labels:
            labels.append(label)
    return labels


@pytest.mark.parametrize("model", ["t5", "llama"])
def test_plan_fits_80_columns_one_line_per_row(tmp_path, model):
    recipe = tiny_recipe(tmp_path)
    if model == "llama":  # a family with tensor-parallel rows, and a device count beside the usual ones
        recipe["model"]["config"] = LLAMA
    text, report = plan_output(str(write_recipe(tmp_path, recipe)), "--config-file", ZERO3, "--num-processes", "4")
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    memory = table_body(lines, "model states per process")
    assert [line.split()[0] for line in memory] == list(report["memory_per_process"])
    labels = scale_labels(report)
    if model == "llama":
        assert "fsdp_tp (tp 2)" in labels and "tp" in labels
    for title in ("bytes each process sends", "step time on paper"):
        body = table_body(lines, title)
        # a wrapped cell would add a line that starts with no row's name
        assert len(body) == len(labels) and all(line.startswith(label) for line, label in zip(body, labels)), body
        devices = len({row["processes"] for row in report["scale"]["rows"]})
        assert all(len(line.split()) >= devices for line in body)
    assert "zero3 * " in text and "* this config: zero3 on 4 devices" in text


def test_one_process_is_named_as_such(tmp_path):
    text, report = plan_output(str(write_recipe(tmp_path, tiny_recipe(tmp_path))))
    assert report["launch"]["num_processes"] == 1
    assert "one process (this config)" in text and "ddp (this config)" not in text
    assert "one process, mixed_precision=no" in text and "1 process(es)" not in text
    assert "* this config: one process, which sends nothing" in text


def test_without_a_probe_the_step_time_names_the_device_it_assumes(tmp_path):
    path = str(write_recipe(tmp_path, tiny_recipe(tmp_path)))
    text, report = plan_output(path, "--tflops", "7")
    assert report["scale"]["compute_source"] == "tflops"
    flops = 6 * report["parameters"] * report["scale"]["tokens_per_process_step"]
    assert report["scale"]["compute_seconds_per_step"] == pytest.approx(flops / 7e12)
    assert "assumes a device doing 7 TFLOP/s (--tflops)" in " ".join(text.split())


def test_measured_step_seconds_replace_the_assumed_device():
    shapes = [TensorShape(1000, 10, 4, True)]
    parallel = ParallelSection()
    assumed = scale_plan(shapes, parallel, PRECISIONS["no"], 1, 100.0, Interconnect(tflops=1), (1, 2))
    measured = scale_plan(shapes, parallel, PRECISIONS["no"], 1, 100.0, Interconnect(tflops=1), (1, 2),
                          measured_step_seconds=0.25)
    assert assumed.compute_source == "tflops" and assumed.compute_seconds_per_step == 6 * 1000 * 100 / 1e12
    assert measured.compute_source == "probe" and measured.compute_seconds_per_step == 0.25
    for before, after in zip(assumed.rows, measured.rows):
        assert after.communication_seconds == before.communication_seconds
        assert after.step_seconds == pytest.approx(0.25 + after.communication_seconds)


def test_typical_step_is_a_median_of_steps_scaled_to_the_mean_batch():
    # one step slowed (a neighbour), the rest alike: the median ignores it where a mean would not
    assert typical_step_seconds([0.1, 0.1, 0.9], [100, 100, 100]) == pytest.approx(0.1)
    # a short batch timed, a run of longer ones: each step scaled to the run's mean size first
    assert typical_step_seconds([0.1, 0.2, 0.3], [100, 200, 300], mean_positions=400) == pytest.approx(0.4)
    assert typical_step_seconds([0.2], [50]) == pytest.approx(0.2)


def test_a_probe_that_got_little_of_the_cpu_says_so():
    from rich.console import Console

    from hftk.planning.probe import Probe
    from hftk.planning.tables import print_probe

    quiet = Probe(30, 0.13, 49.0, "cpu", fastest_step=0.12, slowest_step=0.15, load_average=0.5, cpus=2,
                  cpu_share=0.98, checkpoints_during_training=1)
    # two busy neighbours on two cores: half the CPU time, while the load average still reads under 2
    shared = Probe(6, 0.55, 207.0, "cpu", fastest_step=0.52, slowest_step=0.66, load_average=1.8, cpus=2,
                   cpu_share=0.5)
    assert not quiet.busy and shared.busy
    assert Probe(3, 0.1, 1.0, "cpu", load_average=5.0, cpus=2, cpu_share=0.9).busy  # more work than CPUs
    console = Console(width=80, record=True)
    print_probe(console, shared, 376, 1)
    print_probe(console, quiet, 376, 1)
    said = " ".join(console.export_text().split())
    assert "busy while probing (50% of the CPU time its threads could use, load 1.8 on 2 CPUs)" in said
    assert said.count("busy while probing") == 1
    assert "the 376 steps: about 49 s of training; not counted: 1 checkpoint during training" in said
