"""Errors a user can act on.

Everything raised as a ``UserError`` is printed by the CLI as one clear message (no traceback) and
turned into a non-zero exit code. Anything else that escapes is a bug in trtconv and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the input (recipe, paths, data, model) that the user can fix.

    The message must name the file, the key or the value, and say what is allowed.
    """

    exit_code = 2


class RecipeError(UserError):
    """The recipe file is not valid YAML, or does not match the schema."""


class ModelError(UserError):
    """The model folder is missing, incomplete, corrupt or of an unsupported architecture."""


class DataError(UserError):
    """Calibration or evaluation data is missing, empty or unusable."""


class UncalibratedExperts(DataError):
    """Experts of a mixture-of-experts model left without a usable scale after calibration."""


class CheckpointError(UserError):
    """An exported checkpoint does not match the TensorRT-LLM checkpoint format."""


class ArtifactError(UserError):
    """The output folder cannot be written, or already holds an artifact."""


class EngineUnavailable(UserError):
    """The engine could not be built here (e.g. tensorrt_llm is not installed) and the run required it."""

    exit_code = 3


class GateFailed(Exception):
    """An accuracy gate failed: the artifact was written, marked failed."""

    exit_code = 1


class Interrupted(Exception):
    """The run was interrupted (SIGINT/SIGTERM); nothing half-written was left behind."""

    exit_code = 130
