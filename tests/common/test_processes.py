"""Engine processes start from a forkserver that has imported torch (common/processes.py)."""

import os

from common.processes import process_context


def test_a_process_starts_with_torch_imported_and_forked_by_the_server_not_by_us():
    context = process_context()
    queue = context.Queue()
    report = "import os, sys; queue.put(('torch' in sys.modules, os.getppid()))"  # the child's first act
    process = context.Process(target=exec, args=(report, {"queue": queue}))
    process.start()
    torch_imported, parent = queue.get(timeout=120)
    process.join(timeout=60)
    assert process.exitcode == 0
    assert torch_imported, "the child had to import torch itself"
    assert parent != os.getpid(), "the child was started by this process, not forked by the server"
