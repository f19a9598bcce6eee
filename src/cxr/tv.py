"""Import torchvision without paying for ``torch._dynamo`` at start-up.

Of everything ``import torchvision`` loads, ``torch._dynamo`` is the most expensive part: about 1 s of a 3 s
``cxr predict`` start-up on a 2-core CPU (BENCHMARKS.md, figure 4b). torchvision imports it for one name only,
``torch._dynamo.utils.is_compile_supported``, which ``torchvision.ops.roi_align`` calls when that op runs without
torchvision's compiled kernels. cxr never runs that op.

:func:`import_torchvision` lets that one import find a stand-in module whose ``is_compile_supported`` imports and
calls the real function, and whose every other attribute comes from the real module. The stand-in is removed as soon
as torchvision is imported, so ``torch.compile``, ``torch.onnx`` and any later ``import torch._dynamo`` load the real
thing. If torch._dynamo or torchvision is already imported, it is a plain import.
"""

from __future__ import annotations

import importlib
import sys
import types

_NAME = "torch._dynamo.utils"


def _real_module() -> types.ModuleType:
    stub = sys.modules.get(_NAME)
    if isinstance(stub, _StandIn):
        del sys.modules[_NAME]
    return importlib.import_module(_NAME)


def _is_compile_supported(device_type):
    return _real_module().is_compile_supported(device_type)


class _StandIn(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(_real_module(), attr)


def import_torchvision() -> types.ModuleType:
    """``import torchvision``, without importing ``torch._dynamo`` (see the module docstring); returns the module."""
    if "torchvision" in sys.modules or "torch._dynamo" in sys.modules or _NAME in sys.modules:
        import torchvision

        return torchvision
    stand_in = _StandIn(_NAME, "stand-in for torch._dynamo.utils while torchvision is imported (cxr.tv)")
    stand_in.is_compile_supported = _is_compile_supported
    sys.modules[_NAME] = stand_in
    try:
        import torchvision
    finally:
        if sys.modules.get(_NAME) is stand_in:
            del sys.modules[_NAME]
    return torchvision
