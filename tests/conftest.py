"""Suite-wide settings: the tests use tiny models, for which one torch thread is fastest.

Two threads per process buy nothing at these sizes and, on a shared 2-core machine, make
every op wait for a core; with one, the suite runs several times faster.
"""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by subprocesses the tests start
torch.set_num_threads(1)
