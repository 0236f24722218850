"""Importing NVIDIA ModelOpt: once, on a thread of its own, started early, with its undeclared dependency named.

On a thread of its own: ModelOpt's dependency pulp keeps the exceptions of its failed optional
imports (cplex, COPT) at module level, tracebacks included; a traceback holds its frames and every
frame its caller (`f_back`), so whatever was on the stack during the first import stayed alive for
the rest of the process. On the H200 that was the calibrated 8B model (15 GiB of GPU memory) when
ModelOpt was first imported inside the calibrate stage: it sat through evaluation
(docs/performance.md, run 3). On a thread of its own the import's stack ends at the thread.

Started early: the import takes 6-8 s on the H200 host (torch's compiler stack, transformers'
trainer, reading some thousand files), while bare ModelOpt's timings start after it. The pipeline
starts it (`start_modelopt_import`) as soon as it knows calibration will run, so it overlaps the
tokenizer, the token rows and the model load; `import_modelopt` waits for it.

Two threads importing at once can, in module cycles, make Python's import lock raise
`_DeadlockError` in one of them, or hand one a module the other has half imported. On the background
thread any failure is dropped (the import is done again, on demand, where its error is reported); on
the main thread `retry_after_import_deadlock` waits for the background import and tries once more.
ModelOpt itself drops a failed plugin import with a warning (modelopt.torch.utils.import_plugin):
when the main thread was importing transformers' generation utilities (accelerate.hooks) during the
model load, the background import lost ModelOpt's accelerate, huggingface and transformers plugins to
a half-imported `accelerate` in 3 of 8 runs on the loaded 2-core host; a calibration after that would
have run without ModelOpt's handling of HF attention (the KV-cache quantizers) and mixture-of-experts
blocks, silently. The main thread's retry failed too (accelerate's modules import each other in a fixed
order, and the half import broke it). So the pipeline imports transformers' loading stack first
(hf_model.import_model_class: 14 of 14 runs clean under load), and `import_modelopt` checks that every
plugin of PLUGINS is imported, imports a missing one again once the background import is over (one
importer, no race), and stops the run if that fails or a BOUND_PLUGINS one is missing.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

from trtconv.core import interrupts
from trtconv.core.errors import UserError

MODULE = "modelopt.torch.quantization"
# What the calibrate and export stages use, in the order they need it.
BACKGROUND_MODULES = (MODULE, "modelopt.torch.export")
# ModelOpt's quantization plugins for the libraries trtconv loads models with (a failure ModelOpt only warns about):
# HF attention, MoE blocks and fused experts (huggingface), accelerate's hooks, transformers' modules. Each is a
# star import into its package (`from .huggingface import *`), so one imported again later works as the first would.
PLUGINS = ("modelopt.torch.quantization.plugins.accelerate", "modelopt.torch.quantization.plugins.huggingface",
           "modelopt.torch.quantization.plugins.transformers")
# Plugin functions another ModelOpt module binds at import time (module -> name, the plugin that defines it): when the
# plugin was lost, ModelOpt binds a no-op in its place (sanitize_hf_config_for_deployment shapes the exported
# config.json), and importing the plugin again later does not rebind it.
BOUND_PLUGINS = {"modelopt.torch.export.unified_export_hf": ("sanitize_hf_config_for_deployment",
                                                             "modelopt.torch.export.plugins.hf_checkpoint_utils")}

_background: threading.Thread | None = None
T = TypeVar("T")


def _import_all(names: tuple[str, ...], failed: list[BaseException]) -> None:
    """Import names in order (a thread's target); the first failure goes into `failed` and stops it.
    (A Ctrl-C is never raised here: Python raises it on the main thread, see core.interrupts.)"""
    interrupts.point("import-thread")  # tests: a SIGINT from this thread, mid-import
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # noqa: BLE001 - the caller decides whether to raise it
            failed.append(exc)
            return


def _importer(names: tuple[str, ...], failed: list[BaseException]) -> threading.Thread:
    # Not a daemon: a process that exits meanwhile waits for the import instead of killing it mid-way.
    return threading.Thread(target=_import_all, args=(names, failed), name="trtconv-import-modelopt")


def start_modelopt_import() -> None:
    """Begin importing ModelOpt on a thread of its own (at most once); errors surface in import_modelopt,
    which imports again on demand and reports them."""
    global _background
    if _background is not None or MODULE in sys.modules:
        return
    _background = _importer(BACKGROUND_MODULES, [])
    _background.start()


def wait_for_background_import() -> None:
    """Joined in short steps: a Ctrl-C that the kernel delivered to another thread does not wake a
    blocked join, each step lets the main thread run the handler, and check() raises one swallowed."""
    if _background is not None:
        while _background.is_alive():
            _background.join(0.1)
            interrupts.check()


def retry_after_import_deadlock(fn: Callable[[], T]) -> T:
    """fn(), and once more after the background import has finished if fn's imports met it in a cycle."""
    try:
        return fn()
    except (RuntimeError, ImportError, KeyError) as exc:
        if _background is None or not _is_import_deadlock(exc):
            raise
    interrupts.point("import-retry")
    wait_for_background_import()
    interrupts.check()  # a Ctrl-C during the wait that a dependency swallowed
    return fn()


def _is_import_deadlock(exc: BaseException | None) -> bool:
    """An import that met the background import mid-way: a deadlock importlib broke, or a module another
    thread had half imported (ImportError "partially initialized module", KeyError from importlib's
    _find_and_load when that thread's failed import removed it: seen once in CI's load on the 2-core host).
    A genuine import failure fails again on the retry, after the background import has finished."""
    seen = 0
    while exc is not None and seen < 20:  # transformers' lazy modules wrap the import error in a RuntimeError
        if type(exc).__name__ == "_DeadlockError" or isinstance(exc, (ImportError, KeyError)):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def import_modelopt():
    """modelopt.torch.quantization (waiting for the background import, else imported on a fresh thread); UserError if absent."""
    interrupts.point("import-wait")
    wait_for_background_import()
    interrupts.check()
    if MODULE not in sys.modules:
        failed: list[BaseException] = []  # re-raised below, on the caller's thread
        thread = _importer((MODULE,), failed)
        thread.start()
        thread.join()
        if failed:
            exc = failed[0]
            if isinstance(exc, ModuleNotFoundError):
                raise UserError(
                    f"nvidia-modelopt cannot be imported ({exc}); install trtconv's dependencies "
                    "(pip install trtconv) — note nvidia-modelopt 0.47 also needs `requests`"
                ) from None
            raise exc.with_traceback(None)
    import modelopt.torch.quantization as mtq

    ensure_plugins()
    return mtq


def ensure_plugins() -> list[str]:
    """Import every PLUGINS module that is missing (module docstring) on this thread, once no background import
    runs, as ModelOpt's package does (its public names into the package); returns those imported again. A plugin
    that fails here, or a BOUND_PLUGINS one that is missing, stops the run: the artifact would silently differ."""
    import importlib.util

    wait_for_background_import()
    for user, (attr, plugin) in BOUND_PLUGINS.items():
        bound = getattr(sys.modules.get(user), attr, None)
        if bound is not None and bound.__module__ != plugin and importlib.util.find_spec(plugin) is not None:
            raise RuntimeError(f"ModelOpt's plugin {plugin} was lost to a concurrent import and cannot be imported again "
                               f"in this process ({user} bound a no-op {attr} in its place); run the command again")
    redone = []
    for name in PLUGINS:
        package = name.rpartition(".")[0]
        if name in sys.modules or package not in sys.modules:
            continue
        try:
            if importlib.util.find_spec(name) is None:  # not in this ModelOpt version
                continue
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - named in the error
            raise RuntimeError(f"ModelOpt's plugin {name} failed to import ({exc!r}); trtconv does not calibrate "
                               "without it, since the artifact would silently differ") from exc
        public = getattr(module, "__all__", None)
        public = [k for k in vars(module) if not k.startswith("_")] if public is None else public
        vars(sys.modules[package]).update({k: getattr(module, k) for k in public})
        redone.append(name)
    return redone
