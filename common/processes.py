"""How the engines start processes: worker ranks, a server's engine process, replicas.

Python has three ways to start one. ``fork`` copies the running parent, with
whatever CUDA state and threads it holds, which CUDA does not survive.
``spawn`` starts a fresh interpreter, which is safe but must import torch
again: 2-3 s of CPU for every rank, engine process and restarted replica.
``forkserver`` starts one fresh interpreter (the server) the first time it is
needed and forks every later process from it. The server imports torch and
nothing else (it never touches CUDA or starts a thread), so each process still
begins clean, but its imports are already done: a rank is ready in
milliseconds instead of seconds.
"""

import torch.multiprocessing as mp

PRELOADED = ["torch"]  # what the server imports once for every process forked from it


def process_context():
    """The multiprocessing context every engine process is started from."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED)
    return context
