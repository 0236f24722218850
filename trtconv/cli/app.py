"""The command line. It only builds a recipe and hands it to the pipeline (`--dry-run` prints it).

Exit codes: 0 every stage ran and every gate passed; 1 an accuracy gate failed (artifact written,
marked failed); 2 a user mistake (recipe, paths, data, model); 3 an engine was required but could
not be built here; 4 (`plan` only) something does not fit the GPU; 130 interrupted. User mistakes print one message, never a traceback.
"""

from __future__ import annotations

import typer
import yaml

from trtconv.cli import artifact, build, doctor, plan, recipe
from trtconv.cli.cache import cache_app
from trtconv.cli.data import data_app

app = typer.Typer(
    name="trtconv",
    help="Hugging Face checkpoint -> ModelOpt calibration -> TensorRT-LLM artifact, from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# The command listing: one line per command, in the order of the pipeline's life.
app.command()(plan.plan)
app.command()(build.build)
app.command()(build.calibrate)
app.command()(artifact.inspect)
app.command()(artifact.check)
app.command()(artifact.verify)
app.command()(artifact.engine)
app.command()(doctor.doctor)
app.add_typer(recipe.recipe_app, name="recipe")
app.add_typer(data_app, name="data")
app.add_typer(cache_app, name="cache")


@app.command()
def version() -> None:
    """Print trtconv's and its key dependencies' versions."""
    from trtconv.core.environment import package_versions

    print(yaml.safe_dump(package_versions(), sort_keys=False), end="")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
