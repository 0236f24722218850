"""Several GPUs of one host (`--gpus N`): the layer-streamed conversion split over them, same bytes.

What is split, and why this way (issue 22):

- **Calibration + export: a pipeline of layers, handed on batch by batch.** Layer i's calibration
  needs layer i-1's outputs, so contiguous slices of layers run one after another if each slice
  waits for the whole of the previous one. It need not: ModelOpt's calibration forward passes
  (max, SmoothQuant, AWQ's two passes) each run the cached batches one after another, and a
  quantizer that collects statistics does not quantize (`enable_stats_collection` disables it),
  so batch k of layer i's pass p is final as soon as it is computed. Here layer i runs on device
  i mod N; its forward loop takes batch k of pass p from layer i-1 the moment that batch exists
  (`Handoff`), copies it to its own device (an exact copy) and publishes its own output for layer
  i+1. N layers are in flight at once, like a wavefront over the batches; every layer still sees
  every batch in the one-device order on one device, so every statistic ModelOpt sums (AWQ's
  activation scales and search losses) is summed in the same order. That is why this split and
  not data parallelism over batches within a layer: splitting the batches would make AWQ's sums
  depend on the split unless ModelOpt's internals were rewritten to gather per-batch partials.
- **Where ModelOpt keeps state of the whole process, one thread at a time.** Two places in 0.47:
  - ModelOpt's quantized attention (and its fused-expert modules) swap a module-level function for the
    length of each forward and put back what they found: the transformers module's attention function
    (`eager_attention_forward` / `ALL_ATTENTION_FUNCTIONS`, plugins/huggingface.py), or torch functions
    (plugins/custom.py). Two threads interleaving the swap left ModelOpt's function installed for good
    here (seen: the evaluation's plain original then failed with `no attribute 'q_bmm_quantizer'`).
    So the forward of those modules holds one process-wide lock (`one_swap_at_a_time`). The rest of
    the layer still overlaps, including the MLP, which does most of the work; on a GPU the lock is
    held only while the attention's kernels are queued.
  - `awq_lite` keeps its phase in a class attribute (`AWQLiteHelper.cache_mode`, model_calib.py),
    shared by every layer. So AWQ layers calibrate one at a time: a layer's calibration starts when
    the previous layer's has finished, in layer order, so there is no deadlock. Reading the next layers
    onto their GPUs and exporting and writing the last ones still overlap (`calibrates_concurrently`).
- **Export:** each layer is exported by the thread that calibrated it, on its device, into its own
  part files (as on one device); the ranks' part files are then merged into the rank files in
  parallel, one thread per rank (`streamed.merge_ranks`): the same parts in the same order, so the
  same bytes.
- **Evaluation: the same pipeline** (`evaluate_layers_split`): layer i of both models on device
  i mod N, each batch's two hidden states handed on as soon as they are through. Each batch goes
  through each layer exactly as on one device (same batch, same shapes, the same GPU model), so the
  statistics are the same bytes. Not data parallelism over batches: the one-device evaluation is
  bound by reading the layers (docs/performance.md), and data parallelism would have every device
  read every layer; in the pipeline each device reads only its own N-th of them. The weight-error
  table is computed by the device of each layer and kept in layer order.
- **Threads, one per device** (each sets its own current CUDA device and uses that device's
  default stream), not torch.multiprocessing: the layers are read from one memory-mapped index,
  the activations move device to device in the same process (peer copies, no pickling, no CUDA
  IPC), and ModelOpt is imported once (6-8 s a process). The GIL is held only between kernel
  launches; a 70B layer's kernels are milliseconds each.

The artifact digest does not depend on N (tests/contract/test_devices.py: fp8 and int4_awq, the
evaluation's statistics too). On a CPU more than one device is refused, except through the test-only
variable TRTCONV_SIMULATED_DEVICES=N, which runs the same split on N threads of the CPU so that the
split logic and the digest identity are tested in CI; such a run says so in its log and manifest
and is never a GPU measurement. `plan`, `doctor` and `build` ask `check_gpus` the same question.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from trtconv.core.errors import UserError

SIMULATED_ENV = "TRTCONV_SIMULATED_DEVICES"  # tests only: N simulated devices on the CPU
# ModelOpt calibration algorithms whose state is per module (they may calibrate several layers at once);
# the others (AWQ: a class-level phase flag) calibrate one layer at a time (see the module docstring).
CONCURRENT_ALGORITHMS = frozenset({None, "max", "smoothquant"})
SWAP_LOCK = threading.RLock()  # one forward at a time of ModelOpt's modules that swap module-level functions


def calibrates_concurrently(cfg: dict | None) -> bool:
    """Whether several layers may calibrate at once under this ModelOpt config."""
    return _algorithm(cfg) in CONCURRENT_ALGORITHMS


def _swapping_classes() -> tuple:
    """ModelOpt 0.47's quantized modules whose forward swaps a function of a module (process-wide)."""
    from modelopt.torch.quantization.plugins.custom import _QuantFunctionalMixin
    from modelopt.torch.quantization.plugins.huggingface import _QuantAttention, _T5QuantAttention

    return (_QuantAttention, _T5QuantAttention, _QuantFunctionalMixin)


@contextmanager
def one_swap_at_a_time(module):
    """While inside: the forward of every such module under `module` holds SWAP_LOCK."""
    classes = _swapping_classes()
    wrapped = [m for m in module.modules() if isinstance(m, classes)]
    for m in wrapped:
        inner = m.forward

        def forward(*args, _inner=inner, **kwargs):
            with SWAP_LOCK:
                return _inner(*args, **kwargs)

        m.forward = forward
    try:
        yield
    finally:
        for m in wrapped:
            del m.forward  # the class's forward again


@dataclass(frozen=True)
class Devices:
    """The devices a run computes on: torch device names, the first one the shell's."""

    names: tuple[str, ...]
    simulated: bool = False  # CPU threads standing in for GPUs (TRTCONV_SIMULATED_DEVICES): never a GPU run

    @property
    def count(self) -> int:
        return len(self.names)

    def describe(self) -> str:
        if self.simulated:
            return f"{self.count} simulated devices on the CPU ({SIMULATED_ENV}; a test of the split, not a GPU run)"
        return f"{self.count} GPUs ({', '.join(self.names)})" if self.count > 1 else self.names[0]

    def record(self) -> dict:
        return {"count": self.count, "names": list(self.names), "simulated": self.simulated}

    # The split, as the layer-streamed modules call it (they do not import this module: the import
    # arrow goes one way, from here to them).
    def calibrate_layers(self, job, streams: list, n_layers: int, advance) -> list[dict]:
        return run_layers_split(job, self, streams, n_layers, advance)

    def evaluate_layers(self, pair, run: dict, hidden_b: list, hidden_c: list, rope: list, advance, weight_errors: bool):
        return evaluate_layers_split(pair, run, hidden_b, hidden_c, rope, advance, weight_errors)


def simulated_count() -> int:
    """TRTCONV_SIMULATED_DEVICES as an integer (0 when unset); a bad value is named."""
    raw = os.environ.get(SIMULATED_ENV, "").strip()
    if not raw:
        return 0
    if not raw.isdigit() or int(raw) < 1:
        raise UserError(f"{SIMULATED_ENV}={raw!r}: allowed: a positive integer (test-only: simulated devices on the CPU)")
    return int(raw)


def allowed_gpus(device) -> tuple[int, str]:
    """The largest --gpus here and why (`doctor` prints it): visible CUDA devices, or 1 on a CPU."""
    if device.kind == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return max(1, device.count), f"{device.count} visible GPU(s)" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible else "")
    sim = simulated_count()
    if sim:
        return sim, f"{sim} simulated devices on the CPU ({SIMULATED_ENV}, test-only)"
    return 1, "no CUDA GPU: the CPU is one device"


def check_gpus(gpus: int, device) -> Devices:
    """--gpus against the device `build` computes on; UserError (exit 2) naming what is allowed."""
    most, why = allowed_gpus(device)
    if gpus < 1 or gpus > most:
        extra = "" if device.kind == "cuda" else f"; several devices need a CUDA host ({SIMULATED_ENV} is for tests)"
        raise UserError(f"--gpus {gpus}: this host has {why}; allowed: 1 to {most}{extra}")
    if device.kind == "cuda":
        return Devices(tuple(f"cuda:{i}" for i in range(gpus)) if gpus > 1 else ("cuda",))
    return Devices(("cpu",) * gpus, simulated=gpus > 1)


def check_split(count: int, streamed: bool) -> None:
    """What the split cannot do, named before any work: only the layer-streamed path is split (the
    memory plan streams whenever --gpus > 1, unless the recipe says calibration.streaming: never)."""
    if count > 1 and not streamed:
        raise UserError(f"--gpus {count}: only the layer-streamed path splits over several devices, and the recipe sets "
                        "calibration.streaming: never; allowed: calibration.streaming auto or always, or --gpus 1")


# ---------------------------------------------------------------------------------------------
# Calibration + export: a pipeline of layers


class Handoff:
    """Layer i-1's outputs for layer i: one list of batches per ModelOpt forward pass, filled batch by
    batch as they are computed. Pass p of the consumer reads pass p of the producer, or the producer's
    last pass when it made fewer (what streamed.calibrate_layer's stream list does)."""

    def __init__(self, batches: int):
        self.batches = batches
        self.passes: list[list] = []
        self.closed = False
        self.error: BaseException | None = None
        self._cond = threading.Condition()

    @classmethod
    def complete(cls, hidden: list) -> Handoff:
        h = cls(len(hidden))
        h.passes, h.closed = [list(hidden)], True
        return h

    def put(self, p: int, k: int, value) -> None:
        with self._cond:
            while len(self.passes) <= p:
                self.passes.append([None] * self.batches)
            self.passes[p][k] = value
            self._cond.notify_all()

    def close(self, error: BaseException | None = None) -> None:
        with self._cond:
            self.closed, self.error = True, self.error or error  # a failure, once noted, stays
            self._cond.notify_all()

    def wait_closed(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.closed)
        if self.error is not None:
            raise RuntimeError("an earlier layer failed") from self.error

    def get(self, p: int, k: int):
        def ready() -> bool:
            return self.error is not None or (p < len(self.passes) and self.passes[p][k] is not None) or (
                self.closed and p >= len(self.passes))

        with self._cond:
            self._cond.wait_for(ready)
            if self.error is not None:
                raise RuntimeError("an earlier layer failed") from self.error
            return self.passes[min(p, len(self.passes) - 1)][k]


def _to(x, device: str):
    """A batch's arguments on `device` (an exact copy; nothing moves on a CPU)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x if str(x.device) == device or device == "cpu" and x.device.type == "cpu" else x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    if isinstance(x, list):
        return [_to(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def calibrate_layer_handoff(layer, i: int, cfg: dict | None, inbox: Handoff, outbox: Handoff, template: list,
                            device: str) -> None:
    """streamed.calibrate_layer, fed batch by batch from `inbox` and publishing to `outbox` as it goes.
    `template`: every batch's other arguments (rotary tables, mask, positions) on this device."""
    import torch

    from trtconv.checkpoints.hf_layers import first_output
    from trtconv.stages.streamed import named_root, quantize_layer

    passes = [0]

    def run_pass(module) -> None:
        p = passes[0]
        passes[0] += 1
        copies: dict[int, object] = {}
        with torch.no_grad(), one_swap_at_a_time(module):
            for k, (args, kwargs) in enumerate(template):
                hidden = copies.setdefault(k, _to(inbox.get(p, k), device))
                outbox.put(p, k, first_output(module(hidden, *args[1:], **kwargs)))

    if cfg is None:
        run_pass(layer)
        return
    quantize_layer(named_root(layer, i), cfg, lambda model: run_pass(model.model.layers[str(i)]))


def _algorithm(cfg: dict | None):
    algo = None if cfg is None else cfg.get("algorithm")
    return algo.get("method") if isinstance(algo, dict) else algo


def run_layers_split(job, devices: Devices, streams: list, n_layers: int, advance) -> list[dict]:
    """Every layer calibrated and exported (streamed.finish_layer), layer i on device i mod N; the
    per-layer results in layer order, each with the seconds it took on its device."""
    first = streams[0]
    handoffs = [Handoff.complete([a[0] for a, _ in first])] + [Handoff(len(first)) for _ in range(n_layers)]
    serial = not calibrates_concurrently(job.cfg)
    results: list[dict | None] = [None] * n_layers
    templates = {d: _to([((None,) + tuple(a[1:]), k) for a, k in first], d) for d in set(devices.names)}
    lock = threading.Lock()

    @failing_stops_all(handoffs)
    def work(slot: int) -> None:
        device = devices.names[slot]
        _select(device)
        for i in range(slot, n_layers, devices.count):
            results[i] = _one_layer(job, i, device, handoffs, templates[device], serial)
            handoffs[i] = None  # layer i-1's outputs: no longer needed
            with lock:
                advance(1)

    with ThreadPoolExecutor(max_workers=devices.count, thread_name_prefix="trtconv-device") as pool:
        futures = [pool.submit(work, slot) for slot in range(devices.count)]
        for f in futures:
            f.result()  # the first failure raises here (the others stop at their next hand-off)
    return results


def _one_layer(job, i: int, device: str, handoffs: list, template: list, serial: bool) -> dict:
    import torch

    from trtconv.checkpoints.hf_layers import load_layer
    from trtconv.stages.streamed import finish_layer

    t = time.monotonic()
    inbox, outbox = handoffs[i], handoffs[i + 1]
    try:
        layer = load_layer(job.layer_cls, job.shell.config, job.index, i, job.dtype, device)
        if serial:
            inbox.wait_closed()  # the previous layer's calibration is over: one at a time (calibrates_concurrently)
        calibrate_layer_handoff(layer, i, job.cfg, inbox, outbox, template, device)
    except BaseException as exc:
        outbox.close(exc)
        raise
    outbox.close()
    one = finish_layer(job, layer, i)
    del layer
    if device != "cpu":
        torch.cuda.empty_cache()
    one["seconds"] = round(time.monotonic() - t, 3)
    one["device"] = device
    return one


def failing_stops_all(handoffs: list):
    """A device's failure closes every hand-off still open, with its error: the layers no thread will
    now produce must not leave the other devices waiting for them."""
    def wrap(work):
        def run(slot: int) -> None:
            try:
                work(slot)
            except BaseException as exc:
                for h in list(handoffs):
                    if h is not None:
                        h.close(exc)
                raise
        return run
    return wrap


def _select(device: str) -> None:
    """This thread's current CUDA device (ModelOpt and torch allocate on it where no device is given)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(device))


# ---------------------------------------------------------------------------------------------
# Evaluation: the same pipeline of layers


def evaluate_layers_split(pair, run: dict, hidden_b: list, hidden_c: list, rope: list, advance, weight_errors: bool):
    """Both models' hidden states of every batch through every layer, layer i on device i mod N, each
    batch handed on as soon as it is through (evaluate_streamed.LayerStreamedPair.compute's loop, split).
    Returns the final hidden states on pair.device, in batch order; weight errors go to pair.errors in
    layer order. Each device reads only its own layers, the next one on a worker thread meanwhile."""
    devices, n = pair.devices, len(run["positions"])
    handoffs = [Handoff.complete(list(zip(hidden_b, hidden_c)))] + [Handoff(len(hidden_b)) for _ in range(n)]
    errors: list[list] = [[] for _ in range(n)]
    lock = threading.Lock()

    @failing_stops_all(handoffs)
    def work(slot: int) -> None:
        device = devices.names[slot]
        _select(device)
        mine = list(range(slot, n, devices.count))
        for i, errs in _evaluate_layers(pair, run, device, slot == 0, mine, handoffs, rope, weight_errors):
            errors[i] = [(name, e.to(pair.device)) for name, e in errs]  # read_errors stacks them on one device
            with lock:
                advance(1)

    with ThreadPoolExecutor(max_workers=devices.count, thread_name_prefix="trtconv-eval-device") as pool:
        for f in [pool.submit(work, slot) for slot in range(devices.count)]:
            f.result()
    pair.errors += [e for errs in errors for e in errs]
    last = handoffs[n]
    out = [_to(last.get(0, k), pair.device) for k in range(len(hidden_b))]
    return [b for b, _ in out], [c for _, c in out]


def _evaluate_layers(pair, run: dict, device: str, home: bool, mine: list[int], handoffs: list, rope: list, weight_errors: bool):
    """This device's layers in order: yields (layer index, its weight errors) when a layer is done."""
    import copy

    import torch

    from trtconv.checkpoints.hf_layers import load_layer
    from trtconv.checkpoints.trtllm_reader import _Loader, layer_weight_errors
    from trtconv.stages.evaluate_streamed import CopyStream, prefetched
    from trtconv.checkpoints.hf_layers import first_output

    loader, cand = run["loader"], run["cand"]
    if not home:  # a reader of its own, placing tensors on this device; the same model around the layers
        loader = _Loader(pair.checkpoint_dir, loader.config, torch.device(device), torch.float32)
        cand = copy.copy(cand)
        cand.device = loader.device  # where its attention-window mask is made
    base = [_to(b, device) for b in run["base"]]
    rope = [_to(r, device) for r in rope]
    copies = CopyStream(device)

    @torch.no_grad()
    def load(j: int):  # on the worker thread: this device's j-th layer of both models
        pp, local = run["positions"][mine[j]]
        with copies.loading(j):
            original = load_layer(run["layer_cls"], run["config"], run["index"], mine[j], pair.baseline_dtype, device)
            return original, loader.layer(pp, local)

    with torch.no_grad(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="trtconv-eval-prefetch") as pool:
        for j, (original, quantized) in enumerate(prefetched(pool, load, len(mine))):
            i = mine[j]
            inbox, outbox = handoffs[i], handoffs[i + 1]
            try:
                for k, (args, kwargs) in enumerate(base):
                    hb, hc = _to(inbox.get(0, k), device)
                    hb = first_output(original(hb, *args[1:], **kwargs))
                    outbox.put(0, k, (hb, cand.layer_forward(quantized, hc, *rope[k])))
                errs = layer_weight_errors(i, quantized, original, cand.shape) if weight_errors else []
            except BaseException as exc:
                outbox.close(exc)
                raise
            outbox.close()
            handoffs[i] = None
            copies.used(j)
            del original, quantized  # before this device's layer j + 2 is read
            yield i, errs
