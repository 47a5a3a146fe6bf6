"""Measurement, once for every runner: a device-aware stopwatch, peak memory, the bandwidth floor.

* `Stopwatch`: marks on the device's timeline, CUDA events on a GPU (read with one synchronisation at
  the end, so timing adds no host sync per step) or a wall clock on the CPU.
* `forward_laps`: a stopwatch on a model's forward calls: the first lap is the prefill, every later lap
  one decode step including what runs between two forward calls (sampling, stopping criteria).
* `PeakMemory`: CUDA ``max_memory_allocated``, else the process's peak resident set size.
* `hbm_gbps` and `weight_bytes_per_step`: the bandwidth floor of a decode step, i.e. the bytes it must
  read (weights once, every kept KV byte once) over the measured device copy bandwidth.
"""

from __future__ import annotations

import contextlib
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path


class Stopwatch:
    """Marks on one device's timeline; `time` brackets a call with two marks."""

    def __init__(self, device) -> None:
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._marks: list = []

    def mark(self) -> None:
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def time(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` between two marks (read with `pairs_ms`)."""
        self.mark()
        fn()
        self.mark()

    def _elapsed_ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def _synced(self) -> list:
        if self.cuda and self._marks:
            self._marks[-1].synchronize()
        return self._marks

    def laps_ms(self) -> list[float]:
        """Milliseconds between consecutive marks."""
        marks = self._synced()
        return [self._elapsed_ms(a, b) for a, b in zip(marks[:-1], marks[1:], strict=True)]

    def pairs_ms(self) -> list[float]:
        """Milliseconds of each `time` call (marks taken in pairs)."""
        marks = self._synced()
        return [self._elapsed_ms(marks[i], marks[i + 1]) for i in range(0, len(marks) - 1, 2)]


@contextlib.contextmanager
def forward_laps(model, device) -> Iterator[Stopwatch]:
    """A `Stopwatch` marked before the first forward call of ``model`` and after every call."""
    watch = Stopwatch(device)

    def before(*_):
        if not watch._marks:
            watch.mark()

    handles = [model.register_forward_pre_hook(before), model.register_forward_hook(lambda *_: watch.mark())]
    try:
        yield watch
    finally:
        for handle in handles:
            handle.remove()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values)


class PeakMemory:
    """Peak memory since `reset`: CUDA ``max_memory_allocated``, else the process's peak RSS.

    On Linux the RSS peak (VmHWM) is reset through ``/proc/self/clear_refs``; elsewhere it is the
    peak of the whole process so far (``getrusage``), which in a multi-job process includes earlier jobs.
    """

    def __init__(self, device) -> None:
        self.device = str(device)
        self.cuda = self.device.startswith("cuda")
        self.source = "cuda_max_memory_allocated" if self.cuda else "process_peak_rss"

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")

    def read(self) -> int:
        if self.cuda:
            import torch

            return int(torch.cuda.max_memory_allocated(self.device))
        with contextlib.suppress(OSError):
            match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
            if match:
                return int(match.group(1)) * 1024
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def hbm_gbps(device, gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth in GB/s, bytes read + written (the ceiling a decode step meets)."""
    import torch

    n = int(gib * 2**30) // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    watch = Stopwatch(device)
    for _ in range(10):
        watch.time(lambda: dst.copy_(src))
    return 2 * src.nbytes / (median(watch.pairs_ms()) / 1e3) / 1e9


def weight_bytes_per_step(model) -> int:
    """Parameter bytes a decode step reads: every weight except the input embedding table, of which
    a step reads only one row per sequence (an untied output head is read in full)."""
    embedding = model.get_input_embeddings().weight
    tied = any(p is embedding for name, p in model.named_parameters() if "lm_head" in name)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - embedding.numel() * embedding.element_size()


def floor_ms(weight_bytes: int, kv_bytes: int, gbps: float) -> float:
    """The bandwidth floor of one decode step: weights and every kept KV byte read once."""
    return (weight_bytes + kv_bytes) / (gbps * 1e9) * 1e3


GPU_STATE_FIELDS = (
    "clocks.sm", "clocks.max.sm", "clocks.mem", "temperature.gpu", "power.draw", "clocks_throttle_reasons.active",
)  # fmt: skip


def gpu_state(device, nvidia_smi: str = "nvidia-smi") -> dict | None:
    """The GPU's clocks, temperature, power and active throttle reasons now (``nvidia-smi``), or None
    where there is no CUDA device or no ``nvidia-smi``. A batch-1 decode step is hundreds of short
    kernels and would follow a lowered SM clock, which the copy bandwidth behind the floor does not
    show; recorded so that a step that moves between machines can be read against it (see also
    `inductor_tuning`, the larger cause in docs/measurement-log.md, note 21)."""
    import subprocess

    if device.type != "cuda":
        return None
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    command = [
        nvidia_smi,
        f"--id={index}",
        f"--query-gpu={','.join(GPU_STATE_FIELDS)}",
        "--format=csv,noheader",
    ]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    values = [v.strip() for v in out.strip().splitlines()[0].split(",")] if out.strip() else []
    return dict(zip(GPU_STATE_FIELDS, values, strict=True)) if len(values) == len(GPU_STATE_FIELDS) else None


def inductor_tuning() -> dict:
    """Inductor's cache folder and how many tuned kernel configs (``*.best_config``) it holds.

    With ``compile=true`` inductor picks each generated kernel's block sizes by timing them when it
    compiles, and keeps the choice in this folder; a later compilation of the same kernel reuses it.
    Fresh choices of the same code differ: four fresh compilations on one H200 gave the down product
    31-58 us (docs/measurement-log.md, note 21). A run whose count before equals the count after
    reused every choice; one that started from 0 tuned afresh, and its absolute times can differ
    from another run's by that much (ratios within one run share the kernels). The count covers
    every compilation of the process: with ``hf_baseline=true`` also the HF row's."""
    import os

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    folder = cache_dir()
    count = 0
    for _, _, files in os.walk(folder):
        count += sum(name.endswith(".best_config") for name in files)
    return {"cache_dir": folder, "tuned_configs": count}


def environment(device) -> dict:
    """Versions and the device, recorded with the results."""
    import platform
    import sys

    import torch
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "threads": torch.get_num_threads(), "device": str(device),
           "command": " ".join(sys.argv)}  # fmt: skip
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_state"] = gpu_state(device)  # as the run ends
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env
