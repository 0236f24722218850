"""The command line. It only builds a recipe and hands it to the pipeline (`--dry-run` prints it).

Exit codes: 0 every stage ran and every gate passed; 1 an accuracy gate failed (artifact written,
marked failed); 2 a user mistake (recipe, paths, data, model, an unreachable Hub); 3 an engine was
required but could not be built here; 70 an internal error (a bug: one line, the traceback in a log
file); 130 interrupted. `verify`: 1 the files, manifest, pinned
digest or signature do not match; 4 intact but not passed (without --allow-failed). `plan`: 4 something
does not fit the GPU. User mistakes
print one message, never a traceback (with --json also a JSON object on stdout).
"""

from __future__ import annotations

import json
import sys

import typer
import yaml

import typer.core

from trtconv.cli import artifact, build, doctor, plan, recipe
from trtconv.cli.cache import cache_app
from trtconv.cli.data import data_app



def _flags_take_no_value() -> None:
    """Help shows `--help <bool>`: typer 0.29's TyperOption.display_type_rich returns the type label
    for every option, flags included (click's own help shows none for a flag). A flag takes no
    value, so it gets no type label; other options are unchanged."""
    option = getattr(typer.core, "TyperOption", None)
    original = getattr(option, "display_type_rich", None)
    if original is None or getattr(original, "_trtconv_flags", False):
        return

    def display_type_rich(self, ctx):
        if getattr(self, "is_flag", False) and self.metavar is None:
            return None
        return original(self, ctx)

    display_type_rich._trtconv_flags = True
    option.display_type_rich = display_type_rich


_flags_take_no_value()

app = typer.Typer(
    name="trtconv",
    help="Hugging Face checkpoint -> ModelOpt calibration -> TensorRT-LLM artifact, from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    epilog="Example: trtconv build default -o out/default; trtconv verify out/default",
)
# The command listing: one line per command, in the order of the pipeline's life.
app.command()(plan.plan)
app.command()(build.build)
app.command()(build.calibrate)
app.command()(artifact.inspect)
app.command()(artifact.check)
app.command()(artifact.verify)
app.command()(artifact.sign)
app.command()(artifact.engine)
app.command()(doctor.doctor)
app.add_typer(recipe.recipe_app, name="recipe")
app.add_typer(data_app, name="data")
app.add_typer(cache_app, name="cache")


@app.command()
def version() -> None:
    """Print trtconv's and its key dependencies' versions.

    Example:

        trtconv version
    """
    from trtconv.core.environment import package_versions

    print(yaml.safe_dump(package_versions(), sort_keys=False), end="")


def main() -> None:
    """The console entry point (`trtconv`, `python -m trtconv`): the command, then fast_exit.

    A Ctrl-C is recorded before it is raised (core.interrupts), so an interrupted command exits 130
    however it ended (click's "Aborted!" is exit 1). An exception that is not a user error is a
    crash: one line and a log file with the traceback, exit 70 (core.crash)."""
    from trtconv.core import crash, interrupts
    from trtconv.core.errors import UserError

    interrupts.install()
    try:
        _main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:
        code = interrupts.EXIT_CODE
    except UserError as exc:  # a command that let one through: still one line and its own code
        print(f"error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except Exception as exc:  # noqa: BLE001 - anything else is a bug: said in one line, traceback in a file
        code = crash.report(exc)
    fast_exit(_interrupted_code(code))


def _interrupted_code(code):
    """130 for a command that was interrupted, whatever code its unwinding produced (typer's is a silent
    130, click's "Aborted!" 1), with one line unless the command already said it was interrupted."""
    from trtconv.core import interrupts

    if not interrupts.requested() and code != interrupts.EXIT_CODE:
        return code
    if not interrupts.acknowledged():
        message = "interrupted (Ctrl-C); nothing after the last line above was done"
        print(f"error: {message}", file=sys.stderr)
        if "--json" in sys.argv[1:]:
            print(json.dumps({"error": message, "exit_code": interrupts.EXIT_CODE}))
    return interrupts.EXIT_CODE


def fast_exit(code) -> None:
    """Leave the process without the interpreter's teardown, once everything that teardown would
    finish is finished: other non-daemon threads joined, the atexit handlers run (logging, temporary
    folders, multiprocessing, torch), stdout and stderr flushed. The teardown itself, collecting every
    module of torch, transformers and ModelOpt (and on a GPU the models' memory), took 1.7–2.5 s on
    this project's CPU host and about 2.5 s after an 8B run on an H200, after the artifact was
    committed. mypy leaves the same way (util.hard_exit). `code` is what SystemExit carries: None is
    0, a string is printed to stderr and gives 1, as the interpreter would. Exit 130 (interrupted)
    and a Ctrl-C during the wait do not wait for the other threads."""
    import atexit
    import os
    import threading

    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    try:
        # An interrupted command does not wait for its threads (the ModelOpt import, a 16 GB hash):
        # without the teardown, leaving them mid-way is safe.
        for t in threading.enumerate() if code != 130 else []:
            while t is not threading.main_thread() and not t.daemon and t.is_alive():
                t.join(0.1)  # in steps: a Ctrl-C delivered to another thread does not wake a blocked join
    except KeyboardInterrupt:  # Ctrl-C while waiting for them: leave now, as interrupted
        print("error: interrupted (Ctrl-C) while background work was finishing; leaving it", file=sys.stderr)
        code = 130
    try:
        atexit._run_exitfuncs()
    except KeyboardInterrupt:
        code = 130
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`trtconv ... | head`) or stream
            pass
    os._exit(code)


def _main() -> None:
    """Under --json, Typer's own usage errors (an unknown option, a value that
    is not allowed) also print the {"error", "exit_code"} object every other error prints, so a CI job
    parsing stdout gets one for every failure; without --json, Typer's output is left as it is."""
    if "--json" not in sys.argv[1:]:
        app()
        return
    try:
        result = app(standalone_mode=False)
    except typer.Abort:
        print("Aborted!", file=sys.stderr)
        sys.exit(1)
    except typer.TyperException as exc:  # Typer's (vendored click's) usage errors
        code = getattr(exc, "exit_code", 2)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if hasattr(exc, "show"):
            exc.show()
        else:
            print(f"Error: {message}", file=sys.stderr)
        print(json.dumps({"error": message, "exit_code": code}))
        sys.exit(code)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
