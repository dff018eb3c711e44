"""Test setup, before any test module loads:
* without a GPU, Triton kernels run in the interpreter (TRITON_INTERPRET=1 must be set before triton
  is first imported);
* a torchvision whose compiled operators cannot load beside this torch (the CUDA torchvision 0.28
  next to the CPU torch 2.13 the test extra installs) is made importable, for timm and transformers.
"""

import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from scatterattn.integrations import ensure_torchvision_importable  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # its warning says what test_integrations_timm says
    ensure_torchvision_importable()
