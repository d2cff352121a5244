"""The tracker's clock: the time stamp of every mark the ledger makes and of each step's start and end.

Three clocks, chosen when tracking starts: the wall clock less the time memprof itself spends (the ledger's
``overhead``, never stepping backwards); CUDA events on the current stream when CUDA runs, so module times
measure the GPU's work; or a given function of seconds (the estimator's modelled time), used as it is.

Limits: CUDA events are recorded on the stream current at each mark (streams of other threads are not
followed), and turning them into times needs a device synchronisation (:meth:`Timer.sync`, at step ends and
replays only). Without CUDA at start, a CUDA device met later is timed by the host's wall clock.
"""

from __future__ import annotations

from time import perf_counter

import torch

__all__ = ["Timer"]


class Timer:
    """Wall clock on CPU; CUDA events when CUDA runs, so module times measure the GPU's work; or a given
    clock (the estimator's modelled time)."""

    def __init__(self, cuda: bool, clock=None) -> None:
        self.cuda = cuda and clock is None
        self.clock = clock or perf_counter
        self.ledger = None  # wall-clock times leave out the time memprof itself spends (ledger.overhead)
        self.corrected = clock is None
        self._last = float("-inf")
        self._streams: dict = {}  # (device, raw stream handle) -> torch.cuda.Stream

    def _stream(self):
        """The current CUDA stream, as ``torch.cuda.current_stream()`` gives it, without building a Stream
        object for each of the hundreds of events a step records."""
        try:
            dev = torch._C._cuda_getDevice()
            key = (dev, torch._C._cuda_getCurrentRawStream(dev))
        except AttributeError:  # private API gone in some release: the public, slower way
            return torch.cuda.current_stream()
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = torch.cuda.current_stream(dev)
        return stream

    def __call__(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(self._stream())
            return ev
        if self.corrected and self.ledger is not None:
            # A hook's own time is subtracted when it ends, after marks it made: never step backwards.
            self._last = max(self._last, self.clock() - self.ledger.overhead)
            return self._last
        return self.clock()

    def bind(self, origin):
        if not self.cuda:
            return lambda t: t
        return lambda t: origin.elapsed_time(t) / 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
