"""A server's start-up: the front end's own work overlaps the engine process's (stage 11 on).

The engine process takes seconds to build its engine; the front end's one
slow start-up job, importing transformers' tokenizer code, runs meanwhile on a
thread (as SGLang's front end loads its tokenizer beside the model loading),
so only the tokenizer file's parse is left once the engine is ready.
"""

import importlib
import subprocess
import sys

import pytest

from common.tokenizer import import_in_background
from conftest import ROOT, SERVER_STAGES


@pytest.mark.parametrize("server_stage", SERVER_STAGES)
def test_the_tokenizer_code_imports_while_the_engine_process_starts(server_stage, builtin_folder, monkeypatch):
    manager_module = importlib.import_module(f"{server_stage}.tokenizer_manager")
    ready_class = importlib.import_module(f"{server_stage}.engine_process").EngineReady
    events = []

    def importing():
        events.append("import started")
        return import_in_background()

    class StartingEngines:
        """Stands in for the engine processes: being waited on is all it does."""

        def __init__(self, *args, **kwargs):
            events.append("engine process started")

        def wait_ready(self):
            events.append("waited for the engine")
            return ready_class(model_folder=str(builtin_folder), context_length=64)

    monkeypatch.setattr(manager_module, "import_in_background", importing)
    for name in ("EngineSupervisor", "DataParallelController"):  # stage 16 on: the replicas' controller
        if hasattr(manager_module, name):
            monkeypatch.setattr(manager_module, name, StartingEngines)
    manager = manager_module.TokenizerManager({"device": "cpu"})
    assert events == ["engine process started", "import started", "waited for the engine"]
    assert manager.tokenizer.encode("Paris") and manager.context_length == 64
    manager.tokenizer_threads.shutdown()


def test_the_background_import_leaves_what_the_tokenizer_load_needs_imported():
    """In a fresh interpreter (this one imported transformers long ago)."""
    script = ("import sys; from common.tokenizer import import_in_background\n"
              "before = 'transformers.models.auto.tokenization_auto' in sys.modules\n"
              "thread = import_in_background(); thread.join()\n"
              "print(before, thread.daemon, 'transformers.models.auto.tokenization_auto' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.stdout.split() == ["False", "True", "True"], result.stderr[-2000:]
