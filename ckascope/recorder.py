"""``ActivationRecorder``: forward hooks that live only inside a ``with`` block.

Each hook reduces its module's output at once (a copy, a flattened copy, a global average pool
or the centred Gram matrix), so later in-place operations cannot change what was recorded and a
224-px activation never has to be kept when only its (n, n) Gram is needed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ckascope.errors import InputError
from ckascope.kernels import centered_gram, centre_width, gram_into
from ckascope.layers import LayerSpec, resolve_layers
from ckascope.metric import gram_dtype_for
from ckascope.packing import BlockLayout, packed_blocks
from ckascope.vocab import GramDtype

Reduce = Literal["none", "flatten", "gap", "gram"] | Callable[[Tensor], Tensor]
Mode = Literal["eval", "train", "keep"]
#: A packed float32 Gram and its ``packed_blocks`` views.
Scratch = tuple[Tensor, tuple[Tensor, list[Tensor]]]


def _gap(t: Tensor) -> Tensor:
    """Global average pool over every dimension after the channel one: (n, c, ...) -> (n, c)."""
    return t.mean(dim=tuple(range(2, t.ndim))) if t.ndim > 2 else t.clone()


def make_reducer(reduce: Reduce, gram_dtype: GramDtype = "auto") -> Callable[[Tensor], Tensor]:
    """The function a hook applies to a module output (n, ...).

    Args:
        reduce: "none" (copy), "flatten" ((n, p) copy), "gap" ((n, c) mean over space), "gram"
            ((n, n) linear Gram of the centred flattened features) or a callable.
        gram_dtype: Precision of the Gram for ``reduce="gram"`` (see ``MinibatchCKA``).

    Returns:
        A function from a detached output to a new tensor that shares no memory with it (a
        ``GramStack`` instead returns rows of its own buffer, see there).
    """
    if callable(reduce):
        return reduce
    reducers: dict[str, Callable[[Tensor], Tensor]] = {
        "none": lambda t: t.clone(),
        "flatten": lambda t: t.reshape(t.shape[0], -1).clone(),
        "gap": _gap,
        "gram": lambda t: centered_gram(t, gram_dtype_for(t, gram_dtype)),
    }
    if reduce not in reducers:
        raise InputError(f"unknown reduce {reduce!r}. Hint: use one of {', '.join(reducers)}")
    return reducers[reduce]


def select_output(output: Any, key: str | None, name: str) -> Tensor:
    """The tensor to record from a module output.

    That is the output itself, the first tensor of a tuple/list, or ``output[key]`` of a dict.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        if key is None or key not in output:
            raise InputError(
                f"layer {name!r} returns a dict with keys {sorted(output)}. Hint: pass "
                "output_key= to choose one"
            )
        return select_output(output[key], None, name)
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor):
                return item
    raise InputError(f"layer {name!r} returned {type(output).__name__}, which holds no tensor")


class ActivationRecorder:
    """Records (reduced) outputs of chosen modules during forward passes.

    Example:
        >>> with ActivationRecorder(model, "blocks", reduce="gap") as rec:
        ...     model(images)
        ...     feats = rec.pop()  # {"maxpool": (n, 64), "layer1.0": (n, 256), ...}

    Hooks exist only inside the block and are removed on exit, also when the forward raises.
    Inside the block the model is in the chosen mode and its parameters do not require grad;
    both are restored on exit. Recorded tensors are detached, so no autograd graph is kept.

    Args:
        model: The network.
        layers: Names, glob patterns, a predicate or a preset (see ``resolve_layers``).
        reduce: What each hook keeps (see ``make_reducer``).
        output_key: The key to record from modules that return dicts.
        mode: Put the model in "eval" (default) or "train" mode, or "keep" its flags.
        gram_dtype: Precision of Grams for ``reduce="gram"``.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec = "blocks",
        *,
        reduce: Reduce = "none",
        output_key: str | None = None,
        mode: Mode = "eval",
        gram_dtype: GramDtype = "auto",
    ) -> None:
        if mode not in ("eval", "train", "keep"):
            raise InputError(f"unknown mode {mode!r}. Hint: use eval, train or keep")
        self.model = model
        self.layer_names = resolve_layers(model, layers)
        self.output_key = output_key
        self.mode = mode
        self._reduce = make_reducer(reduce, gram_dtype)
        self._records: list[tuple[str, Tensor]] = []
        self._handles: list[RemovableHandle] = []
        self._training: dict[nn.Module, bool] = {}
        self._requires_grad: dict[nn.Parameter, bool] = {}
        #: Hooks ignore outputs while True (see ``recording``).
        self.paused = False

    def __enter__(self) -> ActivationRecorder:
        if self._handles:
            raise RuntimeError("this ActivationRecorder is already active")
        self._records = []  # nothing from an earlier block whose forward raised
        self._training = {m: m.training for m in self.model.modules()}
        self._requires_grad = {p: p.requires_grad for p in self.model.parameters()}
        try:
            if self.mode != "keep":
                self.model.train(self.mode == "train")
            self.model.requires_grad_(False)
            for name in self.layer_names:
                module = self.model.get_submodule(name)
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        self.paused = False
        try:
            for handle in self._handles:
                handle.remove()
        finally:
            self._handles.clear()
            for module, training in self._training.items():
                module.training = training
            for param, flag in self._requires_grad.items():
                param.requires_grad_(flag)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Records inside this block even while paused; the pause flag is restored after it.

        For recorders that stay active over many forward passes, several of them hooked into
        one model (one per input scale) and paused: each records its own pass, and the hooks
        are added and the model's flags saved once rather than per batch.

        Raises:
            RuntimeError: The recorder is not active (no ``with recorder:`` around this).
        """
        if not self._handles:
            raise RuntimeError("recording() needs an active recorder: use it inside `with rec:`")
        self._records, paused, self.paused = [], self.paused, False
        try:
            yield
        finally:
            self.paused = paused

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.paused:
                return
            tensor = select_output(output, self.output_key, name).detach()
            with torch.no_grad():
                self._records.append((name, self._reduce(tensor)))

        return hook

    def pop(self) -> dict[str, Tensor]:
        """Returns what was recorded since the last call, in execution order, and forgets it.

        A module that ran k > 1 times yields ``name#0`` .. ``name#{k-1}``.
        """
        counts = Counter(name for name, _ in self._records)
        seen: Counter[str] = Counter()
        out: dict[str, Tensor] = {}
        for name, value in self._records:
            key = f"{name}#{seen[name]}" if counts[name] > 1 else name
            seen[name] += 1
            out[key] = value
        self._records = []
        return out


class GramStack:
    """A reducer that writes each recorded layer's packed Gram into one reused float64 stack.

    For ``ActivationRecorder(model, layers, reduce=stack)``: call ``start(n)`` before each
    forward pass of n examples; every hook then packs its layer's centred Gram
    (``kernels.packed_gram``) into the next row of the stack, and ``stack()`` returns the
    (L, size) rows, ready for ``MinibatchCKA.update_packed``; the rows (also what the hooks
    record) are views of the stack, overwritten by the next batch. Instead of a fresh Gram per
    layer, all of them alive until the engine runs (25 MB per batch for two 50-layer MLPs at
    n = 256, memory the allocator may hand back to the system and fault in again), the buffer
    is allocated once, and each Gram converted to float64 while it is still in cache.

    Args:
        gram_dtype: Precision of the products (see ``MinibatchCKA``); the stack is float64.
        layers: How many Grams a batch is expected to hold (the buffer grows if it holds more);
            sizing it from the start spares growing copies and page faults in the first batch.
    """

    def __init__(self, gram_dtype: GramDtype = "auto", layers: int = 1) -> None:
        self.gram_dtype: GramDtype = gram_dtype
        self.layers = max(1, layers)
        self.layout = BlockLayout(1)
        self.count = 0
        self.started = False
        self._buffer: Tensor | None = None
        self._scratch: dict[tuple[torch.device, BlockLayout], Scratch] = {}
        self._rooms: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def start(self, n: int) -> None:
        """Begins a batch of n examples: the next Gram goes to row 0."""
        if n < 1:
            raise InputError(f"a batch of {n} examples has no Gram matrix")
        self.layout, self.count, self.started = BlockLayout.for_size(n), 0, True

    def __call__(self, output: Tensor) -> Tensor:
        """Packs the Gram of a layer's output (n, ...) into the next row and returns that row.

        The row is a view of the stack, which the next batch overwrites.
        """
        if not self.started:
            raise RuntimeError("GramStack: call start(n) before the forward pass")
        if output.ndim < 1 or output.shape[0] != self.layout.n:
            raise InputError(
                f"a hooked layer returned shape {tuple(output.shape)} for a batch of "
                f"{self.layout.n} examples. Hint: choose layers whose outputs are (n, ...)"
            )
        row = self._next_row(output.device)
        dtype = gram_dtype_for(output, self.gram_dtype)
        n, p = self.layout.n, math.prod(output.shape[1:])
        room = None  # CUDA's caching allocator reuses a temporary at no cost
        if output.device.type == "cpu":
            room = self._room(dtype, output.device, n * centre_width(n, p, dtype, output.device))
        if dtype == torch.float64:
            gram_into(output, packed_blocks(row, self.layout), self.layout, room)
            return row
        scratch, blocks = self._float32_scratch(output.device)
        gram_into(output, blocks, self.layout, room)
        return row.copy_(scratch)  # to float64 while the Gram is in cache

    def _room(self, dtype: torch.dtype, device: torch.device, numel: int) -> Tensor:
        """A buffer of at least ``numel`` values for the centred features, kept across layers.

        On a CPU a fresh one per layer (256 KB for the 50-layer MLP at n = 256) is a round trip
        to the allocator, which may hand it back to the system and fault it in again.
        """
        room = self._rooms.get((dtype, device))
        if room is None or room.numel() < numel:
            with torch.inference_mode(False):
                room = torch.empty(numel, dtype=dtype, device=device)
            self._rooms[(dtype, device)] = room
        return room

    def _float32_scratch(self, device: torch.device) -> Scratch:
        """A float32 packed Gram and its block views, kept for every layer of every batch."""
        key = (device, self.layout)
        if key not in self._scratch:
            with torch.inference_mode(False):
                scratch = torch.empty(self.layout.size, device=device)
            self._scratch[key] = (scratch, packed_blocks(scratch, self.layout))
        return self._scratch[key]

    def stack(self) -> Tensor:
        """This batch's packed Grams (L, size), float64, in execution order.

        A view of the buffer: valid until the next ``start``.
        """
        size = self.layout.size
        buffer = self._buffer if self._buffer is not None else torch.empty(0, dtype=torch.float64)
        return buffer[: self.count * size].view(self.count, size)

    def _next_row(self, device: torch.device) -> Tensor:
        size, old = self.layout.size, self._buffer
        need = (self.count + 1) * size
        if old is None or old.numel() < need or old.device != device:
            # More Grams than expected (a module that runs twice): grows geometrically. A model
            # whose layers sit on several devices moves the stack at every switch (slow, exact).
            rows = self.layers if old is None else max(self.layers, 2 * (self.count + 1))
            with torch.inference_mode(False):  # writable in and out of inference mode
                grown = torch.empty(max(rows * size, need), dtype=torch.float64, device=device)
            if old is not None:
                grown[: self.count * size].copy_(old[: self.count * size])
            self._buffer = old = grown
        self.count += 1
        return old[need - size : need]
