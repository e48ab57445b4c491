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
  `one` on an eager GPU step meets the same problem at its one window; a `LaunchGapGuard`
  handles it there without holding the whole step (see its docstring).
- `off`: nothing is measured (the baseline of the overhead benchmark).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

import torch

HOLD_GPU_CYCLES = 100_000_000  # ~50-60 ms of GPU clock: longer than a step takes to launch
TimingMode = Literal["one", "all", "off"]
TIMING_MODES: tuple[TimingMode, ...] = ("one", "all", "off")


def default_timing_mode(device: torch.device) -> TimingMode:
    return "one" if device.type == "cuda" else "all"


class LaunchGapGuard:
    """Keeps the host's launch time out of an eager step's timed window on a GPU.

    When the GPU has caught up with the host (a probe event recorded one layer before the
    timed one has completed), the window's start event would fire at once and the window
    would include the host's time to launch the kernels it brackets. Then a GPU sleep of
    about that launch time is queued before the start event, so the host has queued the
    kernels when the window opens. When the GPU is behind, nothing is added; when it has
    caught up, the sleep spends GPU time that the host-bound step would idle anyway. The
    launch time is the host time of the last timed window, kept from step to step."""

    MARGIN = 1.5  # sleep this multiple of the last window's host time (GPU clocks vary)

    def __init__(self, device: torch.device) -> None:
        self.host_window_s = 200e-6  # until the first window is measured
        self.holds = 0  # windows that were held (for the benchmark)
        self.windows = 0
        self._cycles_per_s = _sleep_cycles_per_second(device)

    def hold(self) -> None:
        self.holds += 1
        torch.cuda._sleep(int(self.MARGIN * self.host_window_s * self._cycles_per_s) + 10_000)

    def record_window(self, host_s: float) -> None:
        self.windows += 1
        self.host_window_s = host_s


def _sleep_cycles_per_second(device: torch.device, cycles: int = 4_000_000) -> float:
    """`torch.cuda._sleep` counts GPU clock cycles: its rate, measured once."""
    with torch.cuda.device(device):
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        torch.cuda._sleep(cycles // 4)  # the clock ramps up
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / (start.elapsed_time(end) / 1000.0)


class LayerTimer:
    """A `LayerHook` that times the attention calls of `layer` (None: every layer) and
    reports their sum times `scale`. With `kinds` (each model layer's attention kind, e.g.
    softmax and linear in a hybrid model) a one-layer timer times the middle layer of each
    kind and scales it by that kind's layer count, and `elapsed_by_kind` splits the time.
    `external` events are recorded by a CUDA graph that is captured while the hook is
    active, on every replay. With `hold_gpu`, `start_step` makes the GPU wait until the
    host has queued the whole step, so each window holds the kernels alone, not the host's
    launch gaps (the `all` reference on a GPU)."""

    def __init__(self, device: torch.device, layer: int | None, scale: float = 1.0,
                 external: bool = False, hold_gpu: bool = False,
                 guard: LaunchGapGuard | None = None, kinds: Sequence[str] | None = None) -> None:
        self.on_gpu = device.type == "cuda"
        self.hold_gpu = hold_gpu and self.on_gpu
        self.layer = layer
        self.scale = scale
        self.external = external
        self.kinds = list(kinds) if kinds is not None else None
        # timed layer -> its scale; None: every layer, each at `scale`
        self.timed: dict[int, float] | None = None
        if layer is not None:
            self.timed = representative_layers(self.kinds) if self.kinds else {layer: scale}
        self.cpu_s: dict[str, float] = {}
        self._t0 = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._event_layers: list[int] = []
        # eager one-layer windows only: a captured graph launches no kernels on replay
        self.guard = guard if self.on_gpu and self.timed is not None and not external else None
        self._probe: torch.cuda.Event | None = None

    def kind_of(self, layer: int) -> str:
        return self.kinds[layer] if self.kinds is not None else "softmax"

    def _scale_of(self, layer: int) -> float:
        return self.scale if self.timed is None else self.timed[layer]

    def start_step(self) -> None:
        """Before an eager step's forward pass."""
        if self.hold_gpu:
            torch.cuda._sleep(HOLD_GPU_CYCLES)

    def _event(self) -> torch.cuda.Event:
        return torch.cuda.Event(enable_timing=True, external=self.external)

    def begin(self, layer: int) -> None:
        timed = self.timed
        if self.guard is not None and timed is not None and layer + 1 in timed:
            self._probe = torch.cuda.Event()
            self._probe.record()
        if timed is not None and layer not in timed:
            return
        if self.guard is not None:
            if layer > 0 and self._probe is not None and self._probe.query():
                self.guard.hold()
            self._probe = None
            self._t0 = time.perf_counter()
        if self.on_gpu:
            start = self._event()
            start.record()
            self.events.append((start, self._event()))
            self._event_layers.append(layer)
        else:
            self._t0 = time.perf_counter()

    def end(self, layer: int) -> None:
        if self.timed is not None and layer not in self.timed:
            return
        if self.on_gpu:
            self.events[-1][1].record()
            if self.guard is not None:
                self.guard.record_window(time.perf_counter() - self._t0)
        else:
            kind = self.kind_of(layer)
            elapsed = (time.perf_counter() - self._t0) * self._scale_of(layer)
            self.cpu_s[kind] = self.cpu_s.get(kind, 0.0) + elapsed

    def layer_times_s(self) -> list[float]:
        """Each bracketed call's time, unscaled (GPU; call once the step has completed)."""
        return [s.elapsed_time(e) / 1000.0 for s, e in self.events]

    def elapsed_by_kind(self) -> dict[str, float]:
        """Scaled seconds per attention kind; call once the step's work has completed."""
        if not self.on_gpu:
            return dict(self.cpu_s)
        out: dict[str, float] = {}
        for (s, e), layer in zip(self.events, self._event_layers, strict=True):
            kind = self.kind_of(layer)
            seconds = s.elapsed_time(e) / 1000.0 * self._scale_of(layer)
            out[kind] = out.get(kind, 0.0) + seconds
        return out

    def elapsed_s(self) -> float:
        """Call once the step's work has completed (its tokens were read)."""
        return sum(self.elapsed_by_kind().values())


def representative_layers(kinds: Sequence[str]) -> dict[int, float]:
    """The middle layer of each attention kind -> that kind's layer count (mode `one`)."""
    by_kind: dict[str, list[int]] = {}
    for i, kind in enumerate(kinds):
        by_kind.setdefault(kind, []).append(i)
    return {layers[len(layers) // 2]: float(len(layers)) for layers in by_kind.values()}


def step_timer(mode: TimingMode, device: torch.device, num_layers: int,
               external: bool = False, guard: LaunchGapGuard | None = None,
               kinds: Sequence[str] | None = None) -> LayerTimer | None:
    """The hook for one step (or one captured graph) in `mode`; `guard` (eager `one` steps on
    a GPU) keeps the host's launch gaps out of the window; `kinds`: each layer's attention
    kind, for a model that mixes them."""
    if mode == "off":
        return None
    if mode == "all":  # the reference; eager only, never captured in a graph
        return LayerTimer(device, None, 1.0, external, hold_gpu=True, kinds=kinds)
    return LayerTimer(device, num_layers // 2, float(num_layers), external, guard=guard,
                      kinds=kinds)
