"""`trtconv recipe list | show | validate | schema`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from trtconv.cli.options import SetOpt, fail
from trtconv.core.errors import UserError

recipe_app = typer.Typer(help="List, show, validate shipped and local recipes; write the JSON Schema.", no_args_is_help=True,
                         epilog="Example: trtconv recipe validate my-recipe.yaml")


@recipe_app.command("list")
def recipe_list() -> None:
    """The shipped recipes.

    Example:

        trtconv recipe list
    """
    from trtconv.recipe.schema import builtin_recipe_names, builtin_recipes_dir, load_recipe

    for name in builtin_recipe_names():
        r, _ = load_recipe(str(builtin_recipes_dir() / f"{name}.yaml"))
        print(f"{name:28s} {r.quantization.precision:9s} kv={r.quantization.kv_cache:5s} {r.description}")


@recipe_app.command("show")
def recipe_show(
    recipe: Annotated[str, typer.Argument(help="Recipe file or shipped recipe name.")],
    set_: SetOpt = None,
) -> None:
    """Print a recipe with every default made explicit (what a build would run).

    Example:

        trtconv recipe show default --set quantization.precision=int8_sq
    """
    from trtconv.recipe.schema import load_recipe

    try:
        r, _ = load_recipe(recipe, set_ or [])
    except UserError as exc:
        fail(exc)
    print(r.resolved().to_yaml(), end="")


@recipe_app.command("validate")
def recipe_validate(recipes: Annotated[list[str], typer.Argument(help="Recipe files or shipped names.")]) -> None:
    """Check recipes against the schema; exit 2 if any is invalid.

    Example:

        trtconv recipe validate my-recipe.yaml recipes/*.yaml
    """
    from trtconv.recipe.schema import load_recipe
    from trtconv.core.ui import Reporter

    rep = Reporter()
    bad = 0
    for ref in recipes:
        try:
            _r, path = load_recipe(ref)
            print(f"ok: {path}")
        except UserError as exc:
            rep.error(str(exc))
            bad += 1
    if bad:
        raise typer.Exit(2)


@recipe_app.command("schema")
def recipe_schema(output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write to this file.")] = None) -> None:
    """The recipe JSON Schema (for editors: yaml-language-server, VS Code).

    Example:

        trtconv recipe schema -o recipe.schema.json
    """
    from trtconv.recipe.schema import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if output:
        output.write_text(text, encoding="utf-8")
    else:
        print(text, end="")


