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
(tests/contract/test_streaming.py and test_streaming_hf.py compare them). The checkpoint side is a
candidate per format: the TensorRT-LLM checkpoint through trtconv's hand-written forward
(TrtllmCandidate), the unified HF checkpoint through its family's own decoder layers with the
in-memory gate's shipped numerics swapped in (HFCandidate, checkpoints.hf_executor.ShippedLayers).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from trtconv.checkpoints.hf_model import head_logits


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
                replayer("candidate", lambda k: self.candidate.logits(self.candidate_hidden[k])[..., : self.vocab]))

    # -- the layer-by-layer run ---------------------------------------------------------------
    @torch.no_grad()
    def compute(self, advance=lambda n=1: None, weight_errors: bool = True) -> None:
        from trtconv.checkpoints.hf_layers import LayerInputs, WeightIndex, build_shell, load_layer
        from trtconv.stages.base import Laps

        laps = Laps()
        index = WeightIndex(self.model_dir)
        batches = [b.to(self.device) for b in self.batches]
        # One model's vocabulary matrices at a time: the original's are parked before the checkpoint's load.
        shell, layer_cls, _full = build_shell(self.model_dir, index, self.baseline_dtype, self.device)
        base = LayerInputs(shell, batches)  # [(args, kwargs)] per batch, per kind of layer
        hidden_b = [a[0] for a, _ in base.first()]
        parked = park_vocab_matrices(self.device, park=self.park)
        parked.original(shell)
        cand = candidate_for(self.checkpoint_dir, self.device, self.model_dir)
        hidden_c = cand.start(batches)
        parked.candidate(cand)
        laps.lap("setup")  # both models' vocabulary matrices, the first hidden states (and parking)

        n_layers = cand.num_layers()
        if self.devices is not None and self.devices.count > 1:  # layer i on device i mod N (trtconv.stages.devices)
            if not isinstance(cand, TrtllmCandidate):  # the plan refuses it first (streamed.check_supported)
                raise RuntimeError("the split over several devices judges the TensorRT-LLM checkpoint only")
            run = dict(base=base.first(), layer_cls=layer_cls, config=shell.config, index=index, cand=cand.model,
                       loader=cand.loader, positions=cand.positions)
            hidden_b[:], hidden_c[:] = self.devices.evaluate_layers(self, run, hidden_b, hidden_c, cand.rope, advance, weight_errors)
            n_layers = 0  # nothing left for the one-device loop below
        copies = CopyStream(self.device)

        @torch.no_grad()
        def load(i: int):  # on the worker thread: reads and places layer i of both models
            with copies.loading(i):
                return load_layer(layer_cls, shell.config, index, i, self.baseline_dtype, self.device), cand.load(i)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="trtconv-eval-prefetch") as pool:
            for i, (original, quantized) in enumerate(prefetched(pool, load, n_layers)):
                for k, (args, kwargs) in enumerate(base.for_layer(i)):
                    out = original(hidden_b[k], *args[1:], **kwargs)
                    hidden_b[k] = out[0] if isinstance(out, (tuple, list)) else out
                    hidden_c[k] = cand.forward(quantized, i, k, hidden_c[k])
                if weight_errors:
                    self.errors += cand.weight_errors(i, quantized, original)
                copies.used(i)
                cand.drop(i)
                del original, quantized  # before layer i + 2 is read: two layers of each at most
                advance(1)
        laps.lap("layers")
        parked.restore()
        if weight_errors:
            self.errors += cand.outer_weight_errors()
        self.errors = read_errors(self.errors)  # one wait for the device, not one per linear
        self.baseline_hidden = hidden_b
        self.baseline_head = lambda h: head_logits(shell, h)
        self.candidate_hidden = [cand.final_hidden(h) for h in hidden_c]
        self.candidate = cand
        self.seconds = laps.lap("heads")

    def num_layers(self) -> int:
        return candidate_for(self.checkpoint_dir, None).num_layers()


def read_errors(errors: list) -> list[tuple[str, float]]:
    from trtconv.checkpoints.trtllm_reader import read_errors as read

    return read(errors)


def candidate_for(checkpoint_dir: Path, device: str | None, model_dir: Path | None = None):
    """The streamed candidate of a checkpoint folder: the unified HF checkpoint or the TensorRT-LLM one
    (model_dir: the original, whose weights the shipped ones are compared with)."""
    from trtconv.artifact.layout import is_hf_checkpoint

    return (HFCandidate if is_hf_checkpoint(checkpoint_dir) else TrtllmCandidate)(checkpoint_dir, device, model_dir)


class TrtllmCandidate:
    """The TensorRT-LLM checkpoint one layer at a time: trtconv's hand-written forward (trtllm_reader)."""

    def __init__(self, checkpoint_dir: Path, device: str | None, model_dir: Path | None = None):
        self.checkpoint_dir, self.device, self.model_dir = Path(checkpoint_dir), device, model_dir

    def num_layers(self) -> int:
        from trtconv.checkpoints.trtllm_format import read_config

        return int(read_config(self.checkpoint_dir)["num_hidden_layers"])

    def start(self, batches: list) -> list:
        from trtconv.checkpoints.trtllm_format import read_config
        from trtconv.checkpoints.trtllm_reader import _Loader

        self.loader = _Loader(self.checkpoint_dir, read_config(self.checkpoint_dir), torch.device(self.device), torch.float32)
        self.model = self.loader.model(with_layers=False)
        self.rope = [self.model.rope_tables(ids.shape[1]) for ids in batches]
        self.positions = self.loader.layer_positions()
        return [self.model.embedding[ids] for ids in batches]

    def park(self) -> None:
        self.model.embedding = None
        self.model.lm_head = self.model.lm_head.to("cpu")

    def restore(self) -> None:
        self.model.lm_head = self.model.lm_head.to(self.device)

    def load(self, i: int):
        return self.loader.layer(*self.positions[i])

    def forward(self, layer, i: int, k: int, h: torch.Tensor) -> torch.Tensor:
        return self.model.layer_forward(layer, h, *self.rope[k])

    def weight_errors(self, i: int, layer, original) -> list:
        from trtconv.checkpoints.trtllm_reader import layer_weight_errors

        return layer_weight_errors(i, layer, original, self.model.shape)

    def outer_weight_errors(self) -> list:
        return []

    def drop(self, i: int) -> None:
        pass

    def final_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.final_hidden(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.head(h)


class HFCandidate:
    """The unified HF checkpoint one layer at a time: the family's own decoder layer with the shipped numerics
    (checkpoints.hf_executor.ShippedLayers: the in-memory gate's ShippedLinear / ShippedExperts / FP8-KV attention),
    each layer given its kind's mask and rope tables (Gemma's sliding and full layers) as the whole model gives them."""

    def __init__(self, checkpoint_dir: Path, device: str | None, model_dir: Path | None = None):
        self.checkpoint_dir, self.device, self.model_dir = Path(checkpoint_dir), device, model_dir

    def num_layers(self) -> int:
        from trtconv.checkpoints.hf_reader import _read_json

        return int(_read_json(self.checkpoint_dir / "config.json")["num_hidden_layers"])

    def start(self, batches: list) -> list:
        from trtconv.checkpoints.hf_executor import ShippedLayers
        from trtconv.checkpoints.hf_layers import LayerInputs

        self.shipped = ShippedLayers(self.checkpoint_dir, self.device)
        self.inputs = LayerInputs(self.shipped.model, batches)
        return [a[0] for a, _ in self.inputs.first()]

    def park(self) -> None:
        """The embedding is not needed after the first hidden states; lm_head (the embedding when tied) waits on the host."""
        model = self.shipped.model
        embed = model.get_input_embeddings()
        if self.shipped.tied:
            embed.to("cpu")
            model.lm_head.weight = embed.weight
        else:
            embed.to("meta")
            model.lm_head.to("cpu")

    def restore(self) -> None:
        self.shipped.model.lm_head.to(self.device)

    def load(self, i: int):
        return self.shipped.layer(i)

    def forward(self, layer, i: int, k: int, h: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.inputs.for_layer(i)[k]
        out = layer(h, *args[1:], **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def weight_errors(self, i: int, layer, original) -> list:
        return self._errors(self.shipped.linears(i))

    def outer_weight_errors(self) -> list:
        return self._errors(self.shipped.linears(None))

    def _errors(self, linears: list) -> list:
        from trtconv.checkpoints.hf_executor import linear_errors, original_weights

        if not hasattr(self, "_weights"):
            self._weights = original_weights(self.model_dir)
        return linear_errors(linears, self._weights, self.shipped.device)

    def drop(self, i: int) -> None:
        self.shipped.drop(i)

    def final_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.shipped.logits(h)


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
            cand.park()
            self._release()

    def _release(self) -> None:
        if self.device != "cpu":
            torch.cuda.empty_cache()

    def restore(self) -> None:
        if self.active:
            self.shell.lm_head.to(self.device)
            self.cand.restore()


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
