"""torchvision, imported without importing ``torch._dynamo`` (the only way rcnn_cli imports it).

``torchvision.ops.roi_align`` imports ``is_compile_supported`` from ``torch._dynamo.utils`` at
module level, and every ``import torchvision`` reaches it (``torchvision.models`` imports
``torchvision.ops``). That import loads the whole TorchDynamo compiler stack (sympy,
torch.fx's symbolic shapes, ...): 2.8 of torchvision's 3.5 s of import here, paid by every CNN
process (``rcnn detect``'s driver and its pool's server, ``extract``, ``train-svm``,
``demo``, each test process). The function is only called inside ``roi_align`` when
torchvision's compiled C++ ops are missing, or when deterministic algorithms are requested on
a GPU. torchvision's own maintainers avoid importing dynamo eagerly for eager-mode users
(pytorch/vision#8436, which made the compiled fallback lazy); this module does the same for
the one name: while torchvision is imported, ``torch._dynamo.utils`` resolves to a stand-in
whose ``is_compile_supported`` imports the real function on its first call; then the
stand-in is removed, so any later ``import torch._dynamo`` (``torch.optim`` steps import it)
loads the real package. If torchvision is already imported, or anything in this import
fails (say, a torchvision version that needs more of dynamo), it is imported the usual way.
A test checks, in a fresh interpreter, that dynamo stays unloaded and that roi_align, the
real dynamo and an optimizer step still work afterwards.
"""
from __future__ import annotations

import sys
import types

import torch  # noqa: F401 - torch first, as torchvision itself does

_NAME = "torch._dynamo.utils"


def _is_compile_supported(device_type: str) -> bool:
    """``torch._dynamo.utils.is_compile_supported``, imported on first use."""
    from torch._dynamo.utils import is_compile_supported

    return is_compile_supported(device_type)


def _import_without_dynamo() -> None:
    if "torchvision" in sys.modules or _NAME in sys.modules or "torch._dynamo" in sys.modules:
        return
    stand_in = types.ModuleType(_NAME, "stand-in while torchvision is imported "
                                       "(rcnn_cli._torchvision)")
    stand_in.is_compile_supported = _is_compile_supported  # type: ignore[attr-defined]
    sys.modules[_NAME] = stand_in
    try:
        import torchvision.models
        import torchvision.ops  # noqa: F401
    except Exception:  # noqa: BLE001 - fall back to the plain import below
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith(
                ("torchvision.", "torch._dynamo"))]:
            del sys.modules[name]
    finally:
        if sys.modules.get(_NAME) is stand_in:
            del sys.modules[_NAME]


_import_without_dynamo()

import torchvision
from torchvision import models
from torchvision.ops import batched_nms, roi_align

__all__ = ["batched_nms", "models", "roi_align", "torchvision"]
