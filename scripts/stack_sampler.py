"""Where a Python process spends its wall time, every thread, without a profiler installed (the GPU host has none).

    python3 scripts/stack_sampler.py OUT_PREFIX -m trtconv calibrate ...      # or: OUT_PREFIX script.py args

A daemon thread reads ``sys._current_frames()`` every 20 ms while the command runs (in this process,
through runpy) and writes, at exit:

- OUT_PREFIX.timeline.txt: for each 0.5 s of the main thread, its most frequent innermost trtconv
  frame and the innermost frame below it (the library call it is waiting in);
- OUT_PREFIX.top.txt: per thread, functions by inclusive wall time (samples x interval).

Sampling takes the GIL every 20 ms, so it costs a little wall time; it measures wall time, not CPU,
which is what a stage timing shows (waiting on a GPU, a disk or a lock included).
"""

from __future__ import annotations

import collections
import runpy
import sys
import threading
import time

INTERVAL = 0.02
BUCKET = 0.5


def _label(frame) -> str:
    code = frame.f_code
    path = code.co_filename
    short = path.split("site-packages/")[-1] if "site-packages/" in path else path.split("/trtconv/")[-1] if "/trtconv/" in path else path
    return f"{short}:{code.co_name}:{frame.f_lineno}"


def _chain(frame) -> list:
    out = []
    while frame is not None:
        out.append(frame)
        frame = frame.f_back
    return out  # innermost first


class Sampler:
    def __init__(self):
        self.samples: list[tuple[float, str, list[str], str | None, str | None]] = []
        self.start = time.monotonic()
        self.stop = threading.Event()
        self.me = None

    def run(self) -> None:
        self.me = threading.get_ident()
        while not self.stop.wait(INTERVAL):
            self._sample()

    def _sample(self) -> None:
        """One sample of every thread. The frames die with this call: a frame object kept between
        samples keeps a finished function's locals alive (a whole model, once, on the H200)."""
        names = {t.ident: t.name for t in threading.enumerate()}
        now = time.monotonic() - self.start
        for ident, frame in sys._current_frames().items():
            if ident == self.me:
                continue
            chain = _chain(frame)
            labels = [_label(f) for f in chain]
            ours = next((i for i, f in enumerate(chain) if "/trtconv/" in f.f_code.co_filename
                         and "stack_sampler" not in f.f_code.co_filename), None)
            inner_ours = labels[ours] if ours is not None else None
            below = labels[ours - 1] if ours else (labels[0] if labels else None)
            funcs = list(dict.fromkeys(lbl.rsplit(":", 1)[0] for lbl in labels))  # inclusive, once per sample
            self.samples.append((now, names.get(ident, str(ident)), funcs, inner_ours, below))

    def write(self, prefix: str) -> None:
        main = threading.main_thread().name
        buckets: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        for t, name, _funcs, ours, below in self.samples:
            if name == main:
                buckets[int(t / BUCKET)][(ours, below)] += 1
        with open(prefix + ".timeline.txt", "w") as f:
            for b in sorted(buckets):
                (ours, below), n = buckets[b].most_common(1)[0]
                f.write(f"{b * BUCKET:7.1f}s {n:3d}  {ours}  <-  {below}\n")
        per_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for _t, name, funcs, _o, _b in self.samples:
            per_thread[name].update(funcs)
        with open(prefix + ".top.txt", "w") as f:
            for name, counts in per_thread.items():
                f.write(f"== thread {name}: {counts.total() and max(counts.values()) * INTERVAL:.1f} s sampled\n")
                for func, n in counts.most_common(60):
                    f.write(f"{n * INTERVAL:8.2f}s  {func}\n")


def main() -> None:
    prefix, rest = sys.argv[1], sys.argv[2:]
    sampler = Sampler()
    thread = threading.Thread(target=sampler.run, name="stack-sampler", daemon=True)
    thread.start()
    code = 0
    try:
        if rest[0] == "-m":
            sys.argv = [rest[1]] + rest[2:]
            runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = rest
            runpy.run_path(rest[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sampler.stop.set()
        thread.join()
        sampler.write(prefix)
    sys.exit(code)


if __name__ == "__main__":
    main()
