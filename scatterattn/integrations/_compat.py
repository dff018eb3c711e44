"""Work-around for a torchvision wheel whose compiled operators cannot load beside this torch.

Seen on a CPU-only torch (e.g. ``torch==2.13.0+cpu``) with the PyPI torchvision built for CUDA
(``torchvision==0.28.0``): its ``_C`` extension fails to load (``libc10_cuda.so`` is missing), which
torchvision tolerates everywhere except in ``torchvision/_meta_registrations.py``, where the fake
kernels of ``torchvision::nms`` and ``torchvision::qnms`` are registered unconditionally, so
``import torchvision`` raises ``RuntimeError: operator torchvision::nms does not exist``. timm imports
torchvision at import time (``timm/layers/create_norm.py``), and transformers imports it when it is
installed, so with such a torchvision neither timm nor the transformers model classes import.

`ensure_torchvision_importable()` declares the schemas of those two operators (no kernels: calling
them still fails, as it would have anyway) and imports torchvision again. It does nothing when
torchvision is absent or imports normally. It changes global state (the ``torchvision`` operator
namespace), so the package never calls it by itself; the tests and examples call it before
importing timm or transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_FRAGMENT: torch.library.Library | None = None  # kept alive: a fragment's definitions die with it


def _has_op(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except Exception:  # RuntimeError when absent (AttributeError if that private API ever goes away)
        return False


def _forget_torchvision() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision_importable() -> bool:
    """Make ``import torchvision`` work when only its compiled operators are broken.

    Returns True when the work-around was applied (a RuntimeWarning says so), False when nothing
    was needed (torchvision absent, or it imports). Other import errors propagate unchanged.
    """
    global _FRAGMENT
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision")
        return False
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        reason = str(err)
    _forget_torchvision()
    if _FRAGMENT is None:
        _FRAGMENT = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        if not _has_op(name):
            try:
                _FRAGMENT.define(schema)
            except RuntimeError:  # defined meanwhile
                pass
    importlib.import_module("torchvision")
    warnings.warn(
        f"torchvision's compiled operators do not load beside torch {torch.__version__} ({reason}); "
        "declared the schemas of torchvision::nms/qnms so that its Python modules import. "
        "torchvision's C++ operators (nms, roi_align, ...) stay unavailable; install a torchvision "
        "built for this torch to remove this warning.",
        RuntimeWarning,
        stacklevel=2,
    )
    return True
