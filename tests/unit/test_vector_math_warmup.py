"""A fresh worker process's first parallel tanh equals a one-thread run bit for bit once `warm_vector_math` ran.

Without the warm-up, about 4 in 1000 fresh processes computed one parallel chunk of their first tanh (MKL's
vector math, set up lazily by two threads at once) with a less exact kernel. Each child here is a fresh fork of a
process that imported torch but never ran its vector math, as a forkserver's worker is.
"""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = r"""
import os, pickle, sys
import torch
from tether.runtime.numerics import warm_vector_math

x = torch.randn(9, 256, generator=torch.Generator().manual_seed(0)) * 0.3  # a GELU's 2304 values: two chunks

def first_tanh(threads):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        torch.set_num_threads(threads)
        warm_vector_math()
        torch.addmm(torch.zeros(256), x[:, :64], torch.ones(64, 256))  # MKL's GEMM first, as in a model
        os.write(w, pickle.dumps(torch.tanh(x)))
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return pickle.loads(data)

serial = first_tanh(1)
print(sum(not torch.equal(first_tanh(2), serial) for _ in range(int(sys.argv[1]))))
"""


def test_a_fresh_process_first_parallel_tanh_equals_the_one_thread_run():
    done = subprocess.run([sys.executable, "-c", _SCRIPT, "300"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0", f"{done.stdout.strip()} of 300 fresh processes differed"
