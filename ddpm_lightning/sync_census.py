"""A census of host syncs: the calls that make the CPU wait for an accelerator, counted on any device (a CPU too).

On a GPU, reading a device tensor from Python (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``, ``.tolist()``,
``.cpu()``, ``.numpy()``), an output whose size depends on the data (``nonzero``, boolean-mask indexing, ``unique``,
``masked_select``) and a blocking copy of a Python number to the device (``torch.tensor(x, device=...)``) each stall
the host until the GPU has caught up: the kernel queue drains, and the step costs launch latency on top of compute.
On a CPU such a call costs about a microsecond, so no timing on a CPU can show them; this census counts them
instead, so that a test on a CPU can prove a training step free of them. On CUDA,
``torch.cuda.set_sync_debug_mode("error")`` is the ground truth (it also sees syncs inside C++ kernels, which a
Python-level census cannot); :func:`cuda_sync_debug` wraps it.

How: the Tensor methods above are patched at class level (so calls from inside torch's own Python code count too),
and a :class:`~torch.overrides.TorchFunctionMode` sees the function forms (``torch.nonzero(x)``, one-argument
``torch.where``, ``torch.tensor(..., device=...)``). Every event is recorded with the first stack frame outside torch
and this module (``file:line``), so a failing census says where the sync is.

Host-side work that is not a device sync on any accelerator is not counted: the ``DataLoader``'s collation and
sampler (``torch/utils/data``, the images are on the host until the batch is moved) and torch's optimizers' step
counters (``torch/optim``: non-fused Adam keeps ``state["step"]`` on the CPU by design and reads it as a float).

No Lightning or Hydra import here.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

#: Tensor methods that read a tensor's value on the host (kind = method name).
READ_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")
#: Tensor methods whose output size depends on the data.
DATA_SIZED_METHODS = ("masked_select", "unique", "unique_consecutive", "argwhere")
#: Host-side work (see the module docstring): a read with one of these anywhere on the stack is the DataLoader's ...
HOST_ANYWHERE = ("torch/utils/data/",)
#: ... and one made directly by one of these files is an optimizer's CPU step counter (not ``swa_utils``: its
#: ``n_averaged`` lives on the device).
HOST_CALLERS = ("torch/optim/optimizer.py", "torch/optim/adam.py", "torch/optim/adamw.py", "torch/optim/sgd.py")

_THIS = __file__.replace("\\", "/")


def _is_mask(index: Any) -> bool:
    """True for a boolean (or uint8) tensor index, alone or inside a tuple/list index."""
    if isinstance(index, Tensor):
        return index.dtype in (torch.bool, torch.uint8)
    if isinstance(index, (tuple, list)):
        return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in index)
    return False


@dataclass
class Event:
    """One counted call: its ``kind`` (``item``, ``__bool__``, ``mask-index``, ...), where it came from
    (``file:line`` of the first frame outside torch and this module) and the ``label`` current at the time
    (e.g. the training step, set by the caller)."""

    kind: str
    where: str
    label: Any = None


@dataclass
class SyncCensus:
    """Count host syncs while active (``with SyncCensus() as census: ...``).

    Attributes:
        events: the counted :class:`Event` list, in order.
        label: stamped on every new event (set it to the step index, the phase name, ...).
        ignored: how many reads were skipped as host-side work (:data:`HOST_ANYWHERE`, :data:`HOST_CALLERS`).
    """

    events: list[Event] = field(default_factory=list)
    label: Any = None
    ignored: int = 0
    _saved: dict = field(default_factory=dict)
    _mode: Any = None
    _busy: threading.local = field(default_factory=threading.local)
    _inner: threading.local = field(default_factory=threading.local)

    # ---------------------------------------------------------------------------------------------- recording
    def _record(self, kind: str) -> None:
        if getattr(self._busy, "on", False) or threading.current_thread() is not threading.main_thread():
            return
        self._busy.on = True
        try:
            frame = sys._getframe(2)
            where = None
            host = False
            innermost = True
            while frame is not None:
                path = frame.f_code.co_filename.replace("\\", "/")
                if path == _THIS:
                    frame = frame.f_back
                    continue
                if any(p in path for p in HOST_ANYWHERE) or (innermost and any(p in path for p in HOST_CALLERS)):
                    host = True
                    break
                innermost = False
                if where is None and path != _THIS and "/torch/" not in path:
                    where = f"{path}:{frame.f_lineno}"
                frame = frame.f_back
            if host:
                self.ignored += 1
                return
            self.events.append(Event(kind, where or "<torch>", self.label))
        finally:
            self._busy.on = False

    def _wrap(self, name: str, kind: str | None = None, only_masks: bool = False) -> Any:
        original = getattr(Tensor, name)
        census = self

        def patched(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
            if getattr(census._inner, "on", False):  # called from inside a counted call (e.g. via the mode)
                return original(tensor, *args, **kwargs)
            if not only_masks or (args and _is_mask(args[0])):
                census._record(kind or name)
            census._inner.on = True
            try:
                return original(tensor, *args, **kwargs)
            finally:
                census._inner.on = False

        patched.__name__ = name
        self._saved[name] = Tensor.__dict__.get(name)  # None: inherited from TensorBase (deleted on exit)
        return patched

    # ---------------------------------------------------------------------------------------------- context
    def __enter__(self) -> SyncCensus:
        for name in (*READ_METHODS, *DATA_SIZED_METHODS):
            setattr(Tensor, name, self._wrap(name))
        Tensor.__getitem__ = self._wrap("__getitem__", "mask-index", only_masks=True)
        Tensor.__setitem__ = self._wrap("__setitem__", "mask-assign", only_masks=True)
        self._mode = _FunctionForms(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        for name, original in self._saved.items():
            if original is None:
                delattr(Tensor, name)
            else:
                setattr(Tensor, name, original)
        self._saved.clear()

    # ---------------------------------------------------------------------------------------------- reading
    def count(self, label: Any = ..., kind: str | None = None) -> int:
        """Events with this ``label`` (all when omitted) and ``kind`` (all when None)."""
        return sum(1 for e in self.events if (label is ... or e.label == label) and (kind is None or e.kind == kind))

    def by_label(self) -> Counter:
        """``{label: events}``."""
        return Counter(e.label for e in self.events)

    def summary(self, label: Any = ..., top: int = 8) -> str:
        """The most frequent ``kind @ where`` of the events (with ``label``), one per line, for a failure message."""
        counts = Counter(f"{e.kind} @ {e.where}" for e in self.events if label is ... or e.label == label)
        return "\n".join(f"{n:5d}  {key}" for key, n in counts.most_common(top)) or "(none)"


class _FunctionForms(TorchFunctionMode):
    """The function forms that the Tensor patches cannot see: ``torch.nonzero`` & co., one-argument
    ``torch.where``, and ``torch.tensor`` / ``torch.as_tensor`` of host data with an explicit ``device`` (a blocking
    host-to-device copy on an accelerator)."""

    FUNCTIONS = {
        torch.nonzero: "nonzero",
        torch.masked_select: "masked_select",
        torch.unique: "unique",
        torch.argwhere: "argwhere",
        torch.unique_consecutive: "unique_consecutive",
    }

    def __init__(self, census: SyncCensus) -> None:
        super().__init__()
        self.census = census

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        kind = self.FUNCTIONS.get(func)
        if func is torch.where and len(args) + len(kwargs) == 1:
            kind = "nonzero"
        elif (
            func in (torch.tensor, torch.as_tensor)
            and kwargs.get("device") is not None
            and args
            and not isinstance(args[0], Tensor)
        ):
            kind = "host-to-device"
        if kind is not None:
            self.census._record(kind)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_sync_debug(mode: str = "error") -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode(mode)`` for the block (``"warn"`` or ``"error"``), restored afterwards; a
    no-op without CUDA."""
    if not torch.cuda.is_available():
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
