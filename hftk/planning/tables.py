"""The tables `hftk plan` prints, each at most 80 columns wide with one line per row: model states per
process, token lengths, the probe's measured step, and the scale on paper as two tables (bytes sent,
step time) over 1 to 1024 devices."""

from __future__ import annotations

from typing import Any

WIDTH = 80  # a table wider than a terminal's default wraps its cells into unreadable rows
CONFIG_MARK = "*"


def size_text(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{num_bytes:.0f} B"
        num_bytes /= 1024
    return ""


def short_size(num_bytes: float) -> str:
    """At most 8 characters: three significant figures, the next unit from 1000 up ("0.98 MiB")."""
    value, unit = float(num_bytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1000 or unit == "TiB":
            break
        value /= 1024
    if unit == "B":
        return f"{value:.0f} B"
    return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"


def duration_text(seconds: float) -> str:
    if seconds >= 7200:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    if seconds >= 100:
        return f"{seconds:.0f} s"
    if seconds >= 1:
        return f"{seconds:.3g} s"
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} µs"


def _table(console: Any, title: str) -> Any:
    """A borderless table under its title; the title is a line of its own (a table title would wrap to the
    table's width)."""
    from rich import box
    from rich.table import Table

    console.print()
    console.print(f"[bold]{title}[/]")
    return Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)


def _note(console: Any, text: str) -> None:
    """A line under a table, indented on every line it wraps to."""
    from rich.padding import Padding

    console.print(Padding(text, (0, 0, 0, 2)))


def print_plan(report: Any, console: Any = None) -> None:
    from rich.console import Console

    console = console or Console()
    launch = report.launch
    processes = "one process" if launch.num_processes == 1 else f"{launch.num_processes} process(es)"
    console.print(f"[bold]{report.task}[/] on {'an' if report.family[0] in 'aeiou' else 'a'} {report.family} "
                  f"{report.model_type} model: {report.parameters:,} parameters ({report.trainable_parameters:,} "
                  f"trained); {processes}, mixed_precision={report.precision} ({report.precision_reason})")
    print_memory(console, report)
    print_lengths(console, report)
    console.print(f"padding: {report.padding_fraction:.1%} of the positions in training batches"
                  + (" (packed rows)" if report.packing else ""))
    console.print(f"steps: {report.steps_per_epoch} per epoch, {report.total_steps} in all; "
                  f"{report.tokens_per_step:,.0f} tokens and {report.flops_per_step:.3g} FLOPs (6 x params x tokens) "
                  f"per optimizer step")
    if report.probe is not None:
        print_probe(console, report.probe, report.total_steps, launch.num_processes)
    print_scale(console, report.scale, launch.strategy, launch.num_processes)


def config_label(strategy: str, processes: int) -> str:
    """The memory table's name for what this launch runs: one process shards nothing and syncs nothing."""
    return "one process" if processes == 1 and strategy == "ddp" else strategy


def print_memory(console: Any, report: Any) -> None:
    launch = report.launch
    memory = _table(console, "model states per process (weights + gradients + optimizer)")
    for column in ("strategy", "device", "CPU"):
        memory.add_column(column, justify="left" if column == "strategy" else "right")
    for name, where in report.memory_per_process.items():
        if name == launch.strategy:
            name = f"{config_label(name, launch.num_processes)} (this config)"
        memory.add_row(name, size_text(where["device"]), size_text(where["cpu"]))
    console.print(memory)
    _note(console, f"activations: about {size_text(report.activation_bytes_per_process)} more per process on the "
                  f"device (an estimate, the same for every strategy)")
    if report.persistent_parameters:
        _note(console, f"zero3 also keeps {report.persistent_parameters:,} parameters whole on every process (tensors "
                      f"of at most {launch.param_persistence_threshold} elements, stage3_param_persistence_threshold)")


def print_lengths(console: Any, report: Any) -> None:
    lengths = _table(console, f"training tokens per example ({report.train_examples} examples)")
    for column in ("", "mean", "p50", "p90", "p99", "max", "at the limit"):
        lengths.add_column(column, justify="right")
    for name, stats in (("source", report.source_lengths), ("target", report.target_lengths)):
        if stats is not None:
            lengths.add_row(name, f"{stats.mean:.1f}", str(stats.p50), str(stats.p90), str(stats.p99),
                            str(stats.max), f"{stats.at_limit:.1%}")
    console.print(lengths)
    _note(console, "at the limit: examples cut to data.max_source_length / max_target_length")


def print_probe(console: Any, probe: Any, total_steps: int, processes: int) -> None:
    besides = [f"{count} {what}{'s' if count > 1 else ''} during training ({key})" for count, what, key in (
        (probe.evaluations_during_training, "evaluation", "train.eval_steps"),
        (probe.checkpoints_during_training, "checkpoint", "train.save_steps")) if count]
    console.print(f"probe: {duration_text(probe.seconds_per_step)} per optimizer step on {probe.device} (one process; "
                  f"median of {probe.steps_measured} steps after {probe.warmup_steps} untimed, "
                  f"{duration_text(probe.fastest_step)} to {duration_text(probe.slowest_step)}); the {total_steps} "
                  f"steps: about {duration_text(probe.estimated_training_seconds)} of training"
                  + (" on each process, before communication" if processes > 1 else "")
                  + (f"; not counted: {' and '.join(besides)}" if besides else ""))
    if probe.busy:
        got = f"{probe.cpu_share:.0%} of the CPU time its threads could use, " if probe.cpu_share is not None else ""
        _note(console, f"this machine was busy while probing ({got}load {probe.load_average:.1f} on {probe.cpus} "
                       f"CPUs): the figure says as much about that other work as about this recipe; probe again "
                       f"when it is quiet")


def scale_rows(scale: Any, strategy: str) -> tuple[list[int], dict[tuple[str, str, int], list[Any]], tuple[str, str]]:
    """Device counts, the rows by (strategy, hook, tp size) in the plan's order, and the key of the row
    this launch runs."""
    counts = sorted({row.processes for row in scale.rows})
    grouped: dict[tuple[str, str, int], list[Any]] = {}
    for row in scale.rows:
        # tp rows put every device in one group (tp size = devices): one row; fsdp_tp rows keep their group size
        group = row.tp_size if row.strategy == "fsdp_tp" else 1
        grouped.setdefault((row.strategy, row.comm_hook, group), []).append(row)
    runs = (strategy.removesuffix("_offload"), scale.comm_hook if strategy == "ddp" else "none")
    return counts, grouped, runs


def _row_label(strategy: str, hook: str, tp_size: int) -> str:
    if strategy == "ddp":
        return f"ddp + {hook}"
    return f"fsdp_tp (tp {tp_size})" if strategy == "fsdp_tp" else strategy


def print_scale(console: Any, scale: Any, strategy: str, processes: int) -> None:
    """Bytes sent and step time per (strategy, hook) and device count: two tables, one value a cell."""
    link = scale.interconnect
    counts, grouped, runs = scale_rows(scale, strategy)
    if scale.compute_source == "probe":
        compute = (f"compute {duration_text(scale.compute_seconds_per_step)} per step: the step --probe measured "
                   f"here, at the recipe's per-device batch")
    else:
        compute = (f"compute {duration_text(scale.compute_seconds_per_step)} per step assumes a device doing "
                   f"{link.tflops:g} TFLOP/s (--tflops); --probe N measures this machine instead")
    step_title = (f"step time on paper (compute + communication, no overlap; {link.bandwidth_gbps:g} Gbit/s, "
                  f"{link.latency_us:g} µs a hop)")
    tables = (("bytes each process sends on a ring per optimizer step, by device count",
               lambda r: short_size(r.wire_bytes_per_step)),
              (step_title, lambda r: duration_text(r.step_seconds)))
    for title, cell in tables:
        table = _table(console, title)
        table.add_column("strategy", no_wrap=True)
        for n in counts:
            table.add_column(f"{n}{CONFIG_MARK if n == processes else ''}", justify="right", no_wrap=True)
        for (name, hook, tp_size), rows in grouped.items():
            by_count = {row.processes: cell(row) for row in rows}
            mark = f" {CONFIG_MARK}" if (name, hook) == runs and processes > 1 else ""
            # a TP layout that does not fit a device count (heads, group size) has no cell there
            table.add_row(_row_label(name, hook, tp_size) + mark, *(by_count.get(n, "-") for n in counts))
        console.print(table)
    this_row = next((key for key in grouped if key[:2] == runs), None)
    if processes == 1:
        _note(console, f"{CONFIG_MARK} this config: one process, which sends nothing (the 1 column)")
    elif this_row is not None:
        _note(console, f"{CONFIG_MARK} this config: {_row_label(*this_row)} on {processes} devices")
    _note(console, f"{compute}")
    for note in scale.notes:
        _note(console, f"{note}")
