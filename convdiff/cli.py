"""The ``convdiff`` commands: parse, call the library once, render, map errors to exit codes.

    convdiff [compare] MODEL [INPUT] [options]    diff every layer against NumPy (or a recording)
    convdiff compare-runs A.npz B.npz             diff two recorded runs

Exit status: 0 no layer divergent, in error or over budget; 1 at least one; 2 the run could not
be made (one ``Error: ...`` line on stderr, no traceback).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click
from rich.console import Console

from convdiff.errors import ConvdiffError, OptionError


class _Group(click.Group):
    """convdiff's commands, with one as the default: ``convdiff MODEL INPUT`` is ``convdiff
    compare MODEL INPUT`` (sqlite-utils' pattern). Every user error of any command is one
    ``Error:`` line and exit status 2."""

    default_command = "compare"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The default command's help (what ``convdiff MODEL INPUT`` takes), then the
        commands."""
        command = self.commands[self.default_command]
        with click.Context(command, info_name=ctx.info_name, parent=ctx.parent) as inner:
            command.format_help(inner, formatter)
        self.format_commands(ctx, formatter)

    def main(self, args=None, prog_name=None, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            return super().main(args, prog_name or "convdiff", **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            _fail("aborted")
        except click.UsageError as exc:
            _fail(exc.format_message())
        except ConvdiffError as exc:
            _fail(str(exc))
        except ImportError as exc:  # a broken installation must not read as "a layer failed"
            _fail(
                f"convdiff could not import {exc.name or 'a module'} ({exc}); the installation "
                "is broken or shadowed (e.g. a stale 'convdiff' folder in site-packages): "
                "reinstall with pip install --force-reinstall convdiff"
            )


def _fail(message: str) -> None:
    click.echo(f"Error: {' '.join(message.split())}", err=True)
    sys.exit(2)


# Option groups in --help, in this order (the README's option tables follow them).
GROUPS = (
    "Input",
    "What the NumPy side computes",
    "Budgets and reports (CI)",
    "Looking closer",
    "Where Keras runs",
    "Loading",
)


class _Option(click.Option):
    """An option that belongs to one of :data:`GROUPS` in ``--help``."""

    def __init__(self, *args: Any, group: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group


class _Command(click.Command):
    """A command whose ``--help`` lists its options by concern (:data:`GROUPS`)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is not None:
                rows.setdefault(getattr(param, "group", "Other"), []).append(record)
        for group in (*GROUPS, "Other"):
            if group in rows:
                with formatter.section(group):
                    formatter.write_dl(rows[group])


def _option(group: str, *names: str, **kwargs: Any) -> Callable:
    return click.option(*names, cls=_Option, group=group, **kwargs)


def _report_options(fn: Callable) -> Callable:
    """Budgets, layer selection and report files: shared by both commands."""
    ci = "Budgets and reports (CI)"
    path = click.Path(dir_okay=False)
    for decorator in reversed(
        [
            _option(
                ci,
                "--max-ulp",
                multiple=True,
                metavar="N|PATTERN=N",
                help="Budget: fail a layer above N ULP; PATTERN=N for layers matching a glob "
                "(repeatable; the last match wins; 'off' removes it).",
            ),
            _option(ci, "--atol", multiple=True, metavar="A|PATTERN=A", help="Absolute tol."),
            _option(ci, "--rtol", multiple=True, metavar="R|PATTERN=R", help="Relative tol."),
            _option(
                ci,
                "--quantile",
                type=float,
                default=None,
                help="Budget the Q-quantile of the ULP distribution instead of the max.",
            ),
            _option(
                ci,
                "--ulp-metric",
                type=click.Choice(["raw", "scaled"]),
                default="raw",
                show_default=True,
                help="Budget raw ULPs of each output, or ULPs of its terms' magnitude.",
            ),
            _option(
                ci,
                "--layers",
                multiple=True,
                metavar="PATTERN",
                help="Compare only layers whose name or class matches (glob, repeatable).",
            ),
            _option(ci, "--json", "json_path", type=path, help="JSON report to PATH ('-')."),
            _option(ci, "--junit", "junit_path", type=path, help="JUnit XML report to PATH."),
            _option(
                ci,
                "--html",
                "html_path",
                type=path,
                help="Visual report to PATH: where in each layer the differences sit.",
            ),
            _option(ci, "--quiet", "-q", is_flag=True, help="Print the summary line only."),
        ]
    ):
        fn = decorator(fn)
    return fn


def _loading_options(fn: Callable) -> Callable:
    fn = _option(
        "Loading",
        "--custom-objects",
        type=click.Path(dir_okay=False),
        help="Python file defining custom layers (imported: it runs).",
    )(fn)
    return _option(
        "Loading",
        "--unsafe",
        is_flag=True,
        help="Allow Lambda layers: runs code stored in the file.",
    )(fn)


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"]},
    invoke_without_command=False,
    no_args_is_help=True,
)
@click.version_option(package_name="convdiff")
def cli() -> None:
    """convdiff: layer-by-layer numerical diff of Keras models against independent pure-NumPy
    kernels."""


_NUMPY = "What the NumPy side computes"
_KERAS = "Where Keras runs"


@cli.command(
    "compare",
    cls=_Command,
    short_help="Diff every layer against NumPy (the default: convdiff MODEL INPUT).",
    context_settings={"help_option_names": ["-h", "--help"]},
    options_metavar="[OPTIONS]",
)
@click.argument("model", type=click.Path(dir_okay=True))
@click.argument("input", required=False, type=click.Path(dir_okay=True))
@_option("Input", "--random-input", is_flag=True, help="Draw a standard-normal input instead.")
@_option("Input", "--seed", type=int, default=0, show_default=True, help="Seed for it.")
@_option(
    _NUMPY,
    "--order",
    default=None,
    show_default="auto; sequential with --no-fma, --accumulate or --tap-order",
    help="Summation order: auto (the trees this machine's backend adds in, revealed per "
    "layer), sequential, reverse, pairwise, kahan, blocked:K, blas, float64, exact, eigen; "
    "all: every one, the best compared.",
)
@click.option(
    "--cache/--no-cache",
    default=True,
    show_default=True,
    help="Reuse the trees auto (the default order) revealed before (user cache directory).",
)
@_option(_NUMPY, "--fma/--no-fma", default=True, show_default=True, help="Fused multiply-add.")
@_option(_NUMPY, "--accumulate", help="Accumulator: float16, bfloat16, float32, float64.")
@_option(_NUMPY, "--tap-order", help="Nesting of reduction axes, e.g. hwc or chw.")
@_option(
    _NUMPY,
    "--mode",
    type=click.Choice(["isolated", "propagated"]),
    default="isolated",
    show_default=True,
    help="isolated: each layer gets Keras's input; propagated: NumPy feeds its own outputs.",
)
@_option(
    _NUMPY,
    "--impl",
    "impls",
    multiple=True,
    metavar="KEY=FILE.py:FUNC",
    help="Your own NumPy implementation for layers named or of class KEY (repeatable).",
)
@_option(
    _NUMPY,
    "--reference",
    type=click.Path(dir_okay=False),
    help="Compare with a recording (--save-outputs) instead of NumPy.",
)
@_report_options
@_option(
    "Budgets and reports (CI)",
    "--stop-at-first",
    is_flag=True,
    help="Stop after the first divergent layer.",
)
@_option(
    "Budgets and reports (CI)",
    "--save-outputs",
    type=click.Path(dir_okay=False),
    help="Record every layer's Keras output, the inputs and the environment (.npz).",
)
@_option("Looking closer", "--histogram", is_flag=True, help="Each layer's ULP distribution.")
@_option(
    "Looking closer",
    "--show-worst",
    type=click.IntRange(min=0),
    default=0,
    metavar="K",
    help="The K worst elements of each compared layer.",
)
@_option(
    "Looking closer",
    "--repeat",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Run the Keras side N times; report whether it changes run to run.",
)
@_option(
    _KERAS,
    "--backend",
    type=click.Choice(["tensorflow", "jax", "torch"]),
    default=None,
    help="Keras backend for the Keras side (default: KERAS_BACKEND or tensorflow).",
)
@_option(
    _KERAS,
    "--device",
    type=click.Choice(["cpu", "gpu"]),
    default="cpu",
    show_default=True,
    help="Where the Keras side runs.",
)
@_option(
    _KERAS, "--tf32/--no-tf32", default=False, show_default=True, help="TensorFloat-32 on GPU."
)
@_option(_KERAS, "--deterministic", is_flag=True, help="TensorFlow op determinism.")
@_option(_KERAS, "--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads.")
@_option(
    _KERAS,
    "--onednn/--no-onednn",
    default=None,
    help="TensorFlow's oneDNN path on or off (default: TensorFlow's for this CPU).",
)
@_option(
    "Looking closer",
    "--profile",
    is_flag=True,
    help="Where the time went: seconds per phase (startup, waiting for Keras, auto's probes, NumPy "
    "kernels, bounds, statistics, rendering) on stderr.",
)
@_loading_options
def compare_command(**options: Any) -> None:
    """Diff every layer of a Keras MODEL (.keras, .h5, or a Keras 2 SavedModel directory) on
    INPUT (.npy or .npz; a directory or quoted glob of them) against convdiff's pure-NumPy
    kernels: ULP figures and a verdict per layer (identical, rounding, divergent).

    Exit status: 0 every layer passed; 1 a layer is divergent, in error or over budget; 2 the
    run could not be made (one Error: line).
    """
    sys.exit(_run(**options))


def _run(profile: bool, **options: Any) -> int:
    """A run, and with ``profile`` its seconds per phase on stderr after the report."""
    from convdiff.timing import Timings

    with Timings() as timings:
        code = _diff(**options)
    if profile:
        sys.stdout.flush()  # after the report, also where both streams go to one terminal
        click.echo(f"Profile (seconds): {timings.summary()}", err=True)
    return code


def _diff(
    model: str,
    input: str | None,
    random_input: bool,
    onednn: bool | None,
    custom_objects: str | None,
    json_path: str | None,
    junit_path: str | None,
    html_path: str | None,
    quiet: bool,
    reference: str | None,
    **options: Any,
) -> int:
    if input is not None and random_input:
        raise OptionError(f"give either INPUT ({input!r}) or --random-input, not both")
    if input is None and not random_input and reference is None:
        raise OptionError("give either an INPUT file or --random-input (or --reference)")
    _check_outputs(json_path, junit_path, html_path)
    options["spatial"] = html_path is not None
    from convdiff.modelfile import start_early

    start_early(model)  # the model file is read in a child while the modules below load
    from convdiff.api import compare, compare_many, expand_inputs
    from convdiff.loading import check_custom_objects
    from convdiff.timing import phase

    # None: --random-input (one run)
    paths: list[str | None] = list(expand_inputs(input)) if input is not None else [None]
    if custom_objects is not None:
        check_custom_objects(custom_objects)
    # TensorFlow is imported inside compare(), while a child process checks the model file
    options.update(onednn=onednn, custom_objects=custom_objects)
    # The live progress line must be gone before anything else is written: it sits on stderr
    # while the table goes to stdout, and the terminal shows both at one cursor.
    with _progress(quiet or json_path == "-") as on_layer:
        if len(paths) == 1:
            report = compare(model, paths[0], reference=reference, on_layer=on_layer, **options)
        else:
            files = [path for path in paths if path is not None]  # several: input files
            reports = compare_many(model, files, reference=reference, on_layer=on_layer, **options)
    with phase("rendering"):
        if len(paths) == 1:
            return _emit(report, json_path, junit_path, quiet, html_path)
        return _emit_many(reports, json_path, junit_path, quiet, html_path)


@cli.command(
    "compare-runs",
    cls=_Command,
    short_help="Diff two runs recorded with --save-outputs.",
    context_settings={"help_option_names": ["-h", "--help"]},
    options_metavar="[OPTIONS]",
)
@click.argument("recording_a", type=click.Path(dir_okay=False))
@click.argument("recording_b", type=click.Path(dir_okay=False))
@_option(
    _NUMPY,
    "--model",
    type=click.Path(dir_okay=True),
    help="The model both were recorded from: gives each layer its rounding bound.",
)
@_report_options
@_loading_options
def compare_runs_command(
    recording_a: str,
    recording_b: str,
    json_path: str | None,
    junit_path: str | None,
    html_path: str | None,
    quiet: bool,
    custom_objects: str | None,
    **options: Any,
) -> None:
    """Diff two runs recorded with --save-outputs (CPU and GPU, oneDNN on and off, two
    TensorFlow versions) layer by layer: RECORDING_A is the reference, RECORDING_B the other
    side."""
    _check_outputs(json_path, junit_path, html_path)
    from convdiff.api import compare_runs
    from convdiff.loading import load_custom_objects

    report = compare_runs(
        recording_a,
        recording_b,
        custom_objects=load_custom_objects(custom_objects),
        spatial=html_path is not None,
        **options,
    )
    sys.exit(_emit(report, json_path, junit_path, quiet, html_path))


def _check_outputs(json_path: str | None, junit_path: str | None, html_path: str | None) -> None:
    """Output paths (and what --html needs) are checked before any work starts."""
    from convdiff.outputs import check_writable

    if html_path is not None:
        from convdiff.figures import require_matplotlib

        require_matplotlib()
    for path in (json_path, junit_path, html_path):
        if path is not None:
            check_writable(path)


def _emit(
    report, json_path: str | None, junit_path: str | None, quiet: bool, html_path: str | None
) -> int:
    """Notes on stderr; table and summary (or the summary line, or JSON) on stdout; files."""
    from convdiff.junit import to_junit
    from convdiff.outputs import write_atomic
    from convdiff.report import render, summary_line, to_json

    for note in report.notes:  # one line each (a CI log is grepped), no markup read in it
        click.echo(f"Note: {note}", err=True)
    out = Console(highlight=False, width=_width())
    if json_path == "-":
        sys.stdout.write(to_json(report))
    elif quiet:
        out.print(summary_line(report))
    else:
        out.print(render(report))
    if json_path not in (None, "-"):
        write_atomic(json_path, to_json(report).encode())
    if junit_path is not None:
        write_atomic(junit_path, to_junit(report))
    _write_html(html_path, report)
    return report.exit_code


def _emit_many(
    reports: list, json_path: str | None, junit_path: str | None, quiet: bool, html_path: str | None
) -> int:
    """Many inputs: each input's table (or summary line), then one line over all inputs; JSON
    holds every report under ``runs``; JUnit one test suite per input."""
    import json

    from convdiff.junit import to_junit
    from convdiff.outputs import write_atomic
    from convdiff.report import plural, render, summary_line, to_json

    out = Console(highlight=False, width=_width())
    for report in reports:
        for note in report.notes:
            click.echo(f"Note: {report.inputs}: {note}", err=True)
        if json_path == "-":
            continue
        if quiet:
            out.print(f"{report.inputs}: ", summary_line(report))
        else:
            out.print(render(report))
    failed = [r for r in reports if not r.passed]
    document = json.dumps(
        {"passed": not failed, "runs": [json.loads(to_json(r)) for r in reports]}, indent=2
    )
    if json_path == "-":
        sys.stdout.write(document + "\n")
    else:
        overall = f"{plural(len(reports), 'input')}: {len(reports) - len(failed)} PASS, "
        overall += f"{len(failed)} FAIL"
        out.print(overall, style="bold red" if failed else "bold green")
    if json_path not in (None, "-"):
        write_atomic(json_path, (document + "\n").encode())
    if junit_path is not None:
        write_atomic(junit_path, to_junit(reports))
    _write_html(html_path, reports)
    return 1 if failed else 0


def _write_html(path: str | None, report) -> None:
    """``--html``: the visual report (one page; a section per input for many inputs)."""
    if path is None:
        return
    from convdiff.outputs import write_atomic
    from convdiff.page import to_html

    write_atomic(path, to_html(report))


class _progress:
    """A progress bar on stderr while layers are compared, only on a terminal."""

    def __init__(self, quiet: bool) -> None:
        self.enabled = not quiet and sys.stderr.isatty()

    def __enter__(self) -> Callable | None:
        if not self.enabled:
            return None
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.bar.start()
        task = self.bar.add_task("comparing layers", total=None)

        def advance(result) -> None:
            self.bar.update(
                task, advance=1, description=f"layer {result.index}: {result.name} {result.status}"
            )

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()


def _width() -> int | None:
    """Terminal width on a terminal; 120 columns in logs and pipes (rich would pick 80)."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return None
    return 120


def main(argv: list[str] | None = None) -> NoReturn:
    """Console entry point (``convdiff``, ``python -m convdiff``): :func:`invoke`, then the
    process ends without tearing the interpreter down (:func:`_end_process`). Python's cycle
    collector is off for the run's start-up (:func:`convdiff.memory.pause_collector`)."""
    _set_numpy_environment()
    from convdiff.memory import pause_collector

    pause_collector()
    try:
        invoke(argv)
        status: Any = 0
    except SystemExit as exc:
        status = exc.code
    _end_process(status)


def invoke(argv: list[str] | None = None) -> None:
    """The command line in this process: parse ``argv`` (default ``sys.argv[1:]``), run,
    render; it ends by raising :class:`SystemExit` with the exit status, as click's commands
    do, and leaves the interpreter running (for a caller that goes on, or tests)."""
    _set_numpy_environment()
    from convdiff.memory import keep_freed_memory

    keep_freed_memory()
    cli.main(args=argv, prog_name="convdiff")


def _end_process(status: Any) -> NoReturn:
    """End the process with ``status`` (SystemExit's: None, an int, or a message for stderr)
    as a normal exit does, less the interpreter's teardown.

    Once TensorFlow is imported, Python's teardown (freeing every module's objects, then
    TensorFlow's and LLVM's own destructors) takes 0.8 to 1.4 s on a 2-core machine, a fifth
    of a batch-1 run, and changes nothing: every output file is written and closed before
    the command returns. What a normal exit does that matters still happens here: the
    ``atexit`` functions run (temporary folders, logging), and standard output and error are
    flushed (a pipe keeps its last block); a reader that went away is no error.
    """
    if status is None:
        code = 0
    elif isinstance(status, int):
        code = status
    else:  # sys.exit("message"): the message goes to stderr, status 1
        print(status, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream
            stream.flush()
    os._exit(code)


# Read when NumPy (and with it OpenBLAS) loads; neither changes a result.
_NUMPY_ENVIRONMENT = {
    # OpenBLAS's threads sleep as soon as a matrix product is done (the least wait, in log2
    # of CPU cycles; OpenBLAS's default is 28: a spin of about 0.1 s on its core)
    "OPENBLAS_THREAD_TIMEOUT": "4",
    # NumPy does not ask the kernel to back its large arrays with 2 MiB pages
    "NUMPY_MADVISE_HUGEPAGE": "0",
}


def _set_numpy_environment() -> None:
    """Settings for the command line's process, made before NumPy loads (each is read then);
    what the user's environment already sets wins.

    - OpenBLAS's threads wait for the next matrix product by spinning on their core for up
      to 2**28 cycles. A run alternates products (the bounded pass) with other work on the
      same cores: TensorFlow's ops, the compiled passes split between threads. A spinning
      thread takes a core from them (measured on ResNet50, batch 8, 2 cores: some 5
      CPU-seconds of spinning); waking a sleeping one costs microseconds.
    - NumPy advises the kernel to back every array of 4 MiB or more with 2 MiB pages. The
      bounded pass makes many large arrays that live for milliseconds; each first touch of
      fresh memory then waits for the kernel to find (compact) and zero a 2 MiB page
      (measured on ResNet50, batch 8, on the 2-core VM: 4.7 to 5.3 s of system time against
      2.1 to 2.3 s with 4 KiB pages, the run 1.6 to 2.4 s shorter).
    """
    for name, value in _NUMPY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
