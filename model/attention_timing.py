"""Attention time of every engine step, through the backend's layer hook.

Modes (`ModelRunner.attention_timing`):
- `one`: only the middle layer's attention call is bracketed and the result is scaled by the
  layer count (every layer of a step runs the same kernels on the same shapes). On a GPU
  that is two CUDA events a step; inside a CUDA graph the graph records them itself
  (events captured with it), so graph replays are timed too.
- `all`: every layer's call is bracketed and the times summed. On the CPU, where execution
  is synchronous, this is exact and costs two clock reads a layer, so it is the CPU
  default. On a GPU it is the reference that `one` is checked against
  (bench/metrics_timing_overhead.py): steps run eagerly, and the runner holds the GPU back
  until the host has queued the whole step, so that each window is the kernels' time and
  not the host's launch gaps (which made eager per-layer windows of a host-bound decode
  step 4-7x the kernels' time on the H100, docs/metrics.md).
- `off`: nothing is measured (the baseline of the overhead benchmark).
"""

from __future__ import annotations

import time
from typing import Literal

import torch

HOLD_GPU_CYCLES = 100_000_000  # ~50-60 ms of GPU clock: longer than a step takes to launch
TimingMode = Literal["one", "all", "off"]
TIMING_MODES: tuple[TimingMode, ...] = ("one", "all", "off")


def default_timing_mode(device: torch.device) -> TimingMode:
    return "one" if device.type == "cuda" else "all"


class LayerTimer:
    """A `LayerHook` that times the attention calls of `layer` (None: every layer) and
    reports their sum times `scale`. `external` events are recorded by a CUDA graph that is
    captured while the hook is active, on every replay. With `hold_gpu`, `start_step` makes
    the GPU wait until the host has queued the whole step, so each window holds the kernels
    alone, not the host's launch gaps (the `all` reference on a GPU)."""

    def __init__(self, device: torch.device, layer: int | None, scale: float = 1.0,
                 external: bool = False, hold_gpu: bool = False) -> None:
        self.on_gpu = device.type == "cuda"
        self.hold_gpu = hold_gpu and self.on_gpu
        self.layer = layer
        self.scale = scale
        self.external = external
        self.cpu_s = 0.0
        self._t0 = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start_step(self) -> None:
        """Before an eager step's forward pass."""
        if self.hold_gpu:
            torch.cuda._sleep(HOLD_GPU_CYCLES)

    def _event(self) -> torch.cuda.Event:
        return torch.cuda.Event(enable_timing=True, external=self.external)

    def begin(self, layer: int) -> None:
        if self.layer is not None and layer != self.layer:
            return
        if self.on_gpu:
            start = self._event()
            start.record()
            self.events.append((start, self._event()))
        else:
            self._t0 = time.perf_counter()

    def end(self, layer: int) -> None:
        if self.layer is not None and layer != self.layer:
            return
        if self.on_gpu:
            self.events[-1][1].record()
        else:
            self.cpu_s += time.perf_counter() - self._t0

    def layer_times_s(self) -> list[float]:
        """Each bracketed call's time, unscaled (GPU; call once the step has completed)."""
        return [s.elapsed_time(e) / 1000.0 for s, e in self.events]

    def elapsed_s(self) -> float:
        """Call once the step's work has completed (its tokens were read)."""
        if self.on_gpu:
            return self.scale * sum(s.elapsed_time(e) for s, e in self.events) / 1000.0
        return self.scale * self.cpu_s


def step_timer(mode: TimingMode, device: torch.device, num_layers: int,
               external: bool = False) -> LayerTimer | None:
    """The hook for one step (or one captured graph) in `mode`."""
    if mode == "off":
        return None
    if mode == "all":  # the reference; eager only, never captured in a graph
        return LayerTimer(device, None, 1.0, external, hold_gpu=True)
    return LayerTimer(device, num_layers // 2, float(num_layers), external)
