"""The ``convdiff`` command: parse, call the library once, render, map errors to exit codes.

Exit status: 0 no layer divergent or over budget; 1 at least one; 2 the run could not be made
(one ``Error: ...`` line on stderr, no traceback).
"""

from __future__ import annotations

import sys

import click
from rich.console import Console

from convdiff.errors import ConvdiffError, OptionError


class _Command(click.Command):
    """A click command whose every user error is one ``Error:`` line and exit status 2."""

    def main(self, *args, **kwargs):  # type: ignore[override]
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            _fail("aborted")
        except click.UsageError as exc:
            _fail(exc.format_message())
        except ConvdiffError as exc:
            _fail(str(exc))


def _fail(message: str) -> None:
    click.echo(f"Error: {' '.join(message.split())}", err=True)
    sys.exit(2)


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(dir_okay=True))
@click.argument("input", required=False, type=click.Path(dir_okay=True))
@click.option(
    "--random-input", is_flag=True, help="Draw a standard-normal input of the model's shape."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --random-input.")
@click.option(
    "--order",
    default="sequential",
    show_default=True,
    help="NumPy summation order: sequential, reverse, pairwise, kahan, blocked:K, blas, "
    "float64, exact.",
)
@click.option("--fma/--no-fma", default=True, show_default=True, help="Fused multiply-add.")
@click.option(
    "--accumulate", default=None, help="Accumulator dtype: float16, bfloat16, float32, float64."
)
@click.option("--tap-order", default=None, help="Nesting of reduction axes, e.g. hwc or chw.")
@click.option(
    "--mode",
    type=click.Choice(["isolated", "propagated"]),
    default="isolated",
    show_default=True,
    help="isolated: each layer gets Keras's input; propagated: NumPy feeds its own outputs.",
)
@click.option(
    "--max-ulp", type=click.IntRange(min=0), default=None, help="Fail a layer above N ULP."
)
@click.option(
    "--json", "json_path", default=None, help="Write the JSON report to PATH ('-': stdout)."
)
@click.option(
    "--impl",
    "impls",
    multiple=True,
    metavar="KEY=FILE.py:FUNC",
    help="Your own NumPy implementation for layers named or of class KEY (repeatable).",
)
@click.option(
    "--backend",
    type=click.Choice(["tensorflow", "jax", "torch"]),
    default=None,
    help="Keras backend for the Keras side (default: KERAS_BACKEND or tensorflow).",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "gpu"]),
    default="cpu",
    show_default=True,
    help="Where the Keras side runs.",
)
@click.option("--tf32/--no-tf32", default=False, show_default=True, help="TensorFloat-32 on GPU.")
@click.option("--deterministic", is_flag=True, help="TensorFlow op determinism.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads.")
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Run the Keras side N times; report whether it changes run to run.",
)
@click.option(
    "--unsafe", is_flag=True, help="Allow Lambda layers: runs code stored in the model file."
)
@click.option("--custom-objects", default=None, help="Python file defining custom layers.")
@click.option(
    "--onednn/--no-onednn", default=None, help="Set TF_ENABLE_ONEDNN_OPTS before TF loads."
)
@click.version_option(package_name="convdiff")
def cli(**options) -> None:
    """Diff every layer of a Keras MODEL (.h5 or .keras) on INPUT (.npy or .npz) against
    convdiff's pure-NumPy kernels, with ULP figures and a rounding-or-divergent verdict."""
    sys.exit(_run(**options))


def _run(
    model: str,
    input: str | None,
    random_input: bool,
    seed: int,
    json_path: str | None,
    onednn: bool | None,
    custom_objects: str | None,
    **compare_options,
) -> int:
    from convdiff.device import select_backend
    from convdiff.loading import configure_tensorflow, load_custom_objects
    from convdiff.report import check_writable, render, to_json, write_atomic

    if (input is None) == (not random_input):
        raise OptionError(
            "give either an INPUT file or --random-input"
            if input is None
            else f"give either INPUT ({input!r}) or --random-input, not both"
        )
    if json_path is not None:
        check_writable(json_path)
    select_backend(compare_options["backend"])
    configure_tensorflow(onednn=onednn)
    from convdiff.api import compare

    report = compare(
        model,
        input,
        seed=seed,
        custom_objects=load_custom_objects(custom_objects),
        **compare_options,
    )
    err = Console(stderr=True, highlight=False)
    for note in report.notes:
        err.print(f"Note: {note}")
    if json_path == "-":
        sys.stdout.write(to_json(report))
    else:
        Console(highlight=False, width=_width()).print(render(report))
        if json_path is not None:
            write_atomic(json_path, to_json(report).encode())
    return report.exit_code


def _width() -> int | None:
    """Terminal width on a terminal; 120 columns in logs and pipes (rich would pick 80)."""
    import os

    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return None
    return 120


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    cli.main(args=argv, prog_name="convdiff")
