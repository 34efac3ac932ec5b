"""SGLang's ``/start_profile`` and ``/stop_profile``: a torch.profiler trace of the engine's steps.

The engine process runs the profiler over the steps it takes between the two calls (or over the
next ``num_steps`` steps), then writes a Chrome trace, one file per engine process, to
``output_dir`` (default: ``$SGLANG_TORCH_PROFILER_DIR``, else the temporary folder). Open it in
Perfetto or ``chrome://tracing``: every op on the CPU and, on CUDA, every kernel, so a user sees
where a served step goes without writing a script (``benchmarks/step_profile.py`` does the same
for a scripted workload).
"""

import os
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


class StepProfiler:
    """At most one profile at a time; ``stepped()`` after each engine step ends a counted one."""

    def __init__(self):
        self.running: profile | None = None
        self.folder, self.steps_left = Path(), None

    def start(self, output_dir: str | None = None, num_steps: int | None = None) -> None:
        if self.running is not None:
            raise ValueError("a profile is already running; POST /stop_profile first")
        self.folder = Path(output_dir or os.environ.get("SGLANG_TORCH_PROFILER_DIR") or tempfile.gettempdir())
        self.folder.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.running, self.steps_left = profile(activities=activities), num_steps
        self.running.__enter__()

    def stepped(self) -> None:
        if self.running is not None and self.steps_left is not None:
            self.steps_left -= 1
            if self.steps_left <= 0:
                self.stop()

    def stop(self) -> str:
        """End the profile and write its trace; returns the file's path."""
        if self.running is None:
            raise ValueError("no profile is running; POST /start_profile first")
        running, self.running = self.running, None
        running.__exit__(None, None, None)
        path = self.folder / f"qwen3-ladder-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.trace.json"
        running.export_chrome_trace(str(path))
        return str(path)
