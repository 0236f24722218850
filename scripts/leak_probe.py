"""Which references keep a model alive into evaluation (a debugging aid for GPU runs).

    python3 scripts/leak_probe.py trtconv calibrate --model M --precision fp8 --device cuda -o OUT ...

Runs the real CLI in this process with the evaluate stage wrapped: before evaluation starts it
collects garbage, prints the CUDA memory still allocated and, for every live `*ForCausalLM`
module, a chain of referrers from it to a root (a frame, a traceback, a module's globals), so a
leak names its holder.
"""

from __future__ import annotations

import gc
import sys
import types


def describe(obj) -> str:
    if isinstance(obj, types.FrameType):
        return f"frame {obj.f_code.co_filename}:{obj.f_code.co_name}:{obj.f_lineno}"
    if isinstance(obj, types.TracebackType):
        return f"traceback at {obj.tb_frame.f_code.co_filename}:{obj.tb_lineno}"
    if isinstance(obj, dict):
        keys = list(obj)[:6]
        return f"dict({len(obj)}) keys {keys}"
    if isinstance(obj, (list, tuple, set)):
        return f"{type(obj).__name__}({len(obj)})"
    if isinstance(obj, types.ModuleType):
        return f"module {obj.__name__}"
    if isinstance(obj, BaseException):
        return f"exception {type(obj).__name__}: {str(obj)[:80]}"
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def chains(target, limit: int = 3, depth: int = 12) -> list[list[str]]:
    """Breadth-first from target through gc referrers to roots (frames, tracebacks, modules)."""
    found: list[list[str]] = []
    skip = {id(sys._getframe())}
    queue = [(target, [describe(target)])]
    seen = {id(target)}
    while queue and len(found) < limit:
        obj, path = queue.pop(0)
        if len(path) > depth:
            continue
        for ref in gc.get_referrers(obj):
            if id(ref) in seen or id(ref) in skip or ref is queue or ref is found:
                continue
            if isinstance(ref, types.FrameType) and ref.f_code.co_filename == __file__:
                continue
            seen.add(id(ref))
            step = path + [describe(ref)]
            if isinstance(ref, (types.FrameType, types.ModuleType)):
                found.append(step)
            else:
                queue.append((ref, step))
    return found


def report_live(where: str) -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        print(f"LEAK-PROBE {where}: cuda allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB", flush=True)
    live = [o for o in gc.get_objects() if isinstance(o, torch.nn.Module) and type(o).__name__.endswith("ForCausalLM")]
    print(f"LEAK-PROBE {where}: {len(live)} live *ForCausalLM", flush=True)
    for model in live:
        for chain in chains(model):
            print("LEAK-PROBE   " + "\n LEAK-PROBE     <- ".join(chain), flush=True)
    del live


def main() -> None:
    from trtconv.stages import evaluate as evaluate_stage

    original = evaluate_stage.run

    def run(*args, **kwargs):
        report_live("before evaluate")
        return original(*args, **kwargs)

    evaluate_stage.run = run
    from trtconv.cli.app import main as cli

    sys.argv = sys.argv[1:]
    cli()


if __name__ == "__main__":
    main()
