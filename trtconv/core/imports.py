"""Importing NVIDIA ModelOpt: once, on a fresh thread, with its undeclared dependency named.

ModelOpt's dependency pulp keeps the exceptions of its failed optional imports (cplex, COPT) at
module level, tracebacks included; a traceback holds its frames and every frame its caller
(`f_back`), so whatever was on the stack during the first import stayed alive for the rest of the
process. On the H200 that was the calibrated 8B model (15 GiB of GPU memory) when ModelOpt was first
imported inside the calibrate stage: it sat through evaluation (docs/performance.md, run 3). On a
thread of its own the import's stack ends at the thread, so nothing of the caller is kept.
"""

from __future__ import annotations

import sys
import threading

from trtconv.core.errors import UserError

MODULE = "modelopt.torch.quantization"


def import_modelopt():
    """modelopt.torch.quantization (imported on a fresh thread the first time); UserError if absent."""
    if MODULE not in sys.modules:
        failed: list[BaseException] = []

        def load() -> None:
            try:
                __import__(MODULE)
            except BaseException as exc:  # re-raised below, on the caller's thread
                failed.append(exc)

        thread = threading.Thread(target=load, name="trtconv-import-modelopt")
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

    return mtq
