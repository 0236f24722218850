"""`trtconv data pack`: freeze text into a hashed, offline JSONL pack."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trtconv.core.errors import UserError
from trtconv.data.packs import DEFAULT_MAX_CHARS, DEFAULT_MIN_CHARS, build_pack

# --------------------------------------------------------------------------------------------
# CLI: registered by trtconv.cli.app as `trtconv data`

data_app = typer.Typer(
    name="data",
    help="Freeze calibration and evaluation text into hashed, offline JSONL packs.",
    no_args_is_help=True,
    epilog="Example: trtconv data pack docs/ -o calib.jsonl --num-samples 512",
)


@data_app.callback()
def data_callback() -> None:
    """Freeze calibration and evaluation text into hashed, offline JSONL packs."""
    # A callback keeps `pack` a subcommand even though it is the only one (Typer would
    # otherwise collapse a one-command app into that command).


@data_app.command("pack")
def pack_command(
    sources: Annotated[list[str], typer.Argument(help="Files, folders (recursive), a save_to_disk dataset folder, or hf:NAME[:CONFIG].")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The pack to write (.jsonl).")],
    field_name: Annotated[str, typer.Option("--field", help="Text field of .jsonl sources.")] = "text",
    split: Annotated[str, typer.Option(help="Split of a dataset source.")] = "train",
    column: Annotated[str, typer.Option(help="Text column of a dataset source.")] = "text",
    num_samples: Annotated[int | None, typer.Option(help="Keep this many documents, chosen with --seed.")] = None,
    min_chars: Annotated[int, typer.Option(help="Drop documents (and split pieces) shorter than this.")] = DEFAULT_MIN_CHARS,
    max_chars: Annotated[int, typer.Option(help="Split longer documents into pieces of at most this many chars.")] = DEFAULT_MAX_CHARS,
    dedupe: Annotated[bool, typer.Option("--dedupe/--no-dedupe", help="Drop repeated texts (whitespace-insensitive).")] = True,
    seed: Annotated[int, typer.Option(help="Seed of --num-samples sampling.")] = 0,
    force: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
) -> None:
    """Build a JSONL pack (id, source, text per line) from local text or a dataset.

    Example:

        trtconv data pack docs/ notes.txt -o calib.jsonl --num-samples 512 --seed 1
    """
    from rich.console import Console
    from rich.text import Text

    try:
        summary = build_pack(
            sources, output, field_name=field_name, split=split, column=column, num_samples=num_samples,
            min_chars=min_chars, max_chars=max_chars, dedupe=dedupe, seed=seed, force=force,
        )
    except UserError as err:
        # Plain text: a message may contain brackets that rich would read as markup.
        Console(stderr=True).print(Text("error: ", style="bold red") + Text(str(err)), highlight=False, soft_wrap=True)
        raise typer.Exit(err.exit_code) from None
    console = Console()
    for note in summary.notes:
        console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    console.print(
        f"wrote {summary.path}: {summary.documents} documents, {summary.chars} chars, "
        f"{summary.bytes} bytes, sha256 {summary.sha256}",
        highlight=False,
        markup=False,
        soft_wrap=True,  # keep the sha256 on one line for copy/paste and grep
    )
