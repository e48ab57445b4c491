"""Test-session set-up shared by every test directory.

Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before any module
that defines kernels is imported, whichever test file pytest happens to import first (the
Triton test modules set it too, but a conftest of another directory may import the server,
and with it the kernels, before them). Without a CUDA device the interpreter is the only way
to run the kernels at all.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
