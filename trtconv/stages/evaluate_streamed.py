"""Layer-streamed evaluation: the original model and the exported checkpoint side by side, one layer at a time.

The in-memory gate holds the whole original and the whole checkpoint (for 70B in bf16 with an fp8
checkpoint, over 200 GB). Here at most two decoder layers of each model are in memory: the one
computing and the next, read from the memory-mapped safetensors on a worker thread meanwhile (so
reading overlaps computing; one worker, and the order of the operations is unchanged). The hidden
states of every evaluation batch, for both models, are what is kept (on a GPU the vocabulary
matrices wait in host memory during the layer loop where the memory plan says they must not stay:
park_vocab_matrices). The original computes in the
in-memory path's `baseline_dtype` (float32 on a CPU, the load dtype on a GPU). The scorers
(per-document statistics, the multiple-choice task) stay exactly as they are: they run twice,
first against recorders that note which batches they ask for (returning placeholder logits), then,
after both models have been run over all noted batches layer by layer, against replayers that
return the real logits in the same order. Every operation is the one the in-memory path runs, in
the same order on the same shapes, so the statistics and the verdicts are the same
(tests/contract/test_streaming.py compares them).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch


class LayerStreamedPair:
    """Both models' logits for a fixed set of batches, computed one decoder layer at a time."""

    def __init__(self, model_dir: Path, checkpoint_dir: Path, device: str, vocab: int,
                 baseline_dtype: torch.dtype = torch.float32, park: bool = True, devices=None):
        self.model_dir, self.checkpoint_dir, self.device, self.vocab = Path(model_dir), Path(checkpoint_dir), device, vocab
        self.baseline_dtype = baseline_dtype  # the original's dtype: stages/evaluate.py baseline_dtype, as in memory
        self.park = park  # on a GPU, vocabulary matrices wait on the host during the layer loop (the memory plan decides)
        self.batches: list[torch.Tensor] = []  # distinct batches asked for, in first-asked order
        self.calls: dict[str, list[int]] = {"baseline": [], "candidate": []}  # batch index of each call, per model
        self.errors: list[tuple[str, float]] = []
        self.seconds: dict[str, float] = {}  # setup, layers, heads (compute's laps)
        self.devices = devices  # trtconv.stages.devices.Devices: several run the layers as a pipeline (None: self.device)

    # -- the two passes of a scorer ---------------------------------------------------------
    def _index(self, ids) -> int:
        ids = ids.detach().cpu()
        for k, b in enumerate(self.batches):
            if b.shape == ids.shape and torch.equal(b, ids):
                return k
        self.batches.append(ids.clone())
        return len(self.batches) - 1

    def recorders(self) -> tuple[Callable, Callable]:
        def recorder(which):
            def fn(ids):
                self.calls[which].append(self._index(ids))
                return torch.zeros(*ids.shape, self.vocab, device=ids.device)
            return fn

        return recorder("baseline"), recorder("candidate")

    def replayers(self) -> tuple[Callable, Callable]:
        position = {"baseline": 0, "candidate": 0}

        def replayer(which, logits):
            def fn(ids):
                n = position[which]
                k = self.calls[which][n] if n < len(self.calls[which]) else None
                if k is None or not torch.equal(ids.detach().cpu(), self.batches[k]):
                    raise RuntimeError("layer-streamed evaluation: the scorer asked for other batches than it recorded")
                position[which] += 1
                return logits(k)
            return fn

        return (replayer("baseline", lambda k: self.baseline_head(self.baseline_hidden[k])),
                replayer("candidate", lambda k: self.candidate_model.head(self.candidate_hidden[k])[..., : self.vocab]))

    # -- the layer-by-layer run ---------------------------------------------------------------
    @torch.no_grad()
    def compute(self, advance=lambda n=1: None, weight_errors: bool = True) -> None:
        from trtconv.checkpoints.hf_layers import WeightIndex
        from trtconv.checkpoints.trtllm_format import read_config
        from trtconv.checkpoints.trtllm_reader import _Loader, layer_weight_errors, read_errors
        from trtconv.checkpoints.hf_layers import build_shell, capture_layer0_inputs, load_layer
        from trtconv.stages.base import Laps

        laps = Laps()
        index = WeightIndex(self.model_dir)
        batches = [b.to(self.device) for b in self.batches]
        # One model's vocabulary matrices at a time: the original's are parked before the checkpoint's load.
        shell, layer_cls, _full = build_shell(self.model_dir, index, self.baseline_dtype, self.device)
        base = capture_layer0_inputs(shell, batches)  # [(args, kwargs)] per batch
        hidden_b = [a[0] for a, _ in base]
        parked = park_vocab_matrices(self.device, park=self.park)
        parked.original(shell)
        loader = _Loader(self.checkpoint_dir, read_config(self.checkpoint_dir), torch.device(self.device), torch.float32)
        cand = loader.model(with_layers=False)
        hidden_c = [cand.embedding[ids] for ids in batches]
        rope = [cand.rope_tables(ids.shape[1]) for ids in batches]
        positions = loader.layer_positions()
        parked.candidate(cand)
        laps.lap("setup")  # both models' vocabulary matrices, the first hidden states (and parking)

        if self.devices is not None and self.devices.count > 1:  # layer i on device i mod N (trtconv.stages.devices)
            run = dict(base=base, layer_cls=layer_cls, config=shell.config, index=index, cand=cand, loader=loader, positions=positions)
            hidden_b[:], hidden_c[:] = self.devices.evaluate_layers(self, run, hidden_b, hidden_c, rope, advance, weight_errors)
            positions = []  # nothing left for the one-device loop below
        copies = CopyStream(self.device)

        @torch.no_grad()
        def load(i: int):  # on the worker thread: reads and places layer i of both models
            pp, local = positions[i]
            with copies.loading(i):
                return load_layer(layer_cls, shell.config, index, i, self.baseline_dtype, self.device), loader.layer(pp, local)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="trtconv-eval-prefetch") as pool:
            for i, (original, quantized) in enumerate(prefetched(pool, load, len(positions))):
                for k, (args, kwargs) in enumerate(base):
                    out = original(hidden_b[k], *args[1:], **kwargs)
                    hidden_b[k] = out[0] if isinstance(out, (tuple, list)) else out
                    hidden_c[k] = cand.layer_forward(quantized, hidden_c[k], *rope[k])
                if weight_errors:
                    self.errors += layer_weight_errors(i, quantized, original, cand.shape)
                copies.used(i)
                del original, quantized  # before layer i + 2 is read: two layers of each at most
                advance(1)
        self.errors = read_errors(self.errors)  # one wait for the device, not one per linear
        laps.lap("layers")
        parked.restore()
        self.baseline_hidden = [shell.model.norm(h) for h in hidden_b]
        self.baseline_head = lambda h: shell.lm_head(h)
        self.candidate_hidden = [cand.final_hidden(h) for h in hidden_c]
        self.candidate_model = cand
        self.seconds = laps.lap("heads")

    def num_layers(self) -> int:
        from trtconv.checkpoints.trtllm_format import read_config

        return int(read_config(self.checkpoint_dir)["num_hidden_layers"])


class park_vocab_matrices:
    """On a GPU, the layer loop needs no vocabulary matrix: each model's embedding is dropped once its
    first hidden states exist, and its lm_head waits in host memory until the logits are wanted.
    For a 70B model they are 13 GiB (bf16 original, float32 checkpoint): more than everything else
    the loop holds, so the original's are parked before the checkpoint's are read. Moving a tensor
    is exact, so the logits do not change. On a CPU nothing moves."""

    def __init__(self, device: str, park: bool = True, force: bool = False):
        self.device = device
        self.active = force or (park and device != "cpu")  # force: a CPU test that nothing later needs the embeddings
        self.shell = self.cand = None

    def original(self, shell) -> None:
        self.shell = shell
        if self.active:
            if shell.lm_head.weight is not shell.model.embed_tokens.weight:  # tied: the head is the embedding
                shell.model.embed_tokens.to("meta")
            shell.lm_head.to("cpu")
            self._release()

    def candidate(self, cand) -> None:
        self.cand = cand
        if self.active:
            cand.embedding = None
            cand.lm_head = cand.lm_head.to("cpu")
            self._release()

    def _release(self) -> None:
        if self.device != "cpu":
            torch.cuda.empty_cache()

    def restore(self) -> None:
        if self.active:
            self.shell.lm_head.to(self.device)
            self.cand.lm_head = self.cand.lm_head.to(self.device)


class CopyStream:
    """On a GPU, layer i + 1 is copied to the device on a stream of its own while layer i computes
    on the default one (a copy on the default stream would queue behind the compute).

    The computing thread runs ahead of the GPU, so layer i's memory is freed (on the host side)
    while its kernels may still be reading it. The allocator gives freed blocks of the copy stream
    to the copy stream's next allocations; so that no copy overwrites a block the compute still
    reads, the copy of layer i + 2 waits (on the GPU) for the event recorded after layer i's
    kernels were queued. The loading thread waits for its own copies before handing a layer over,
    so the compute never reads a half-copied layer. Nothing changes on a CPU."""

    def __init__(self, device: str):
        self.stream = torch.cuda.Stream() if device != "cpu" else None
        self.done: dict[int, torch.cuda.Event] = {}

    @contextmanager
    def loading(self, i: int):
        if self.stream is None:
            yield
            return
        before = self.done.pop(i - 2, None)
        if before is not None:
            self.stream.wait_event(before)
        with torch.cuda.stream(self.stream):
            yield
        self.stream.synchronize()

    def used(self, i: int) -> None:
        """Called after layer i's work is queued, before it is dropped."""
        if self.stream is not None:
            self.done[i] = torch.cuda.Event()
            self.done[i].record()


def prefetched(pool: ThreadPoolExecutor, load: Callable[[int], object], count: int) -> Iterator:
    """load(0), ..., load(count - 1) in order; load(i + 1) runs on `pool` while the caller uses load(i).
    The caller drops item i before asking for the next: at most two are alive, the one in use and the
    one loading."""
    pending = pool.submit(load, 0) if count else None
    for i in range(count):
        current = pending.result()  # a failed load raises here, in the caller's thread
        pending = pool.submit(load, i + 1) if i + 1 < count else None
        yield current
        del current


def run_scorers(pair: LayerStreamedPair, scorer: Callable, reporter, weight_errors: bool = True):
    """scorer(baseline_fn, candidate_fn) -> result, run against recorders, then (after the layer pass) for real."""
    recorded = pair.recorders()
    scorer(*recorded)
    with reporter.progress("evaluation layers (both models)", total=pair.num_layers()) as advance:
        pair.compute(advance, weight_errors)
    return scorer(*pair.replayers())
