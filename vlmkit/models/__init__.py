"""Family adapters (one module per family) and the :class:`~vlmkit.models.vlm.VLM` wrapper."""

from vlmkit.models import llava, qwen2_vl  # noqa: F401  (register adapters)
from vlmkit.models import idefics3, llava_next  # noqa: F401  (register adapters)
from vlmkit.models._adapter import FamilyAdapter, adapter_class, register_adapter, supported_model_types
from vlmkit.models._layout import ImageLayout, Layout, View

__all__ = ["FamilyAdapter", "ImageLayout", "Layout", "View", "adapter_class", "register_adapter",
           "supported_model_types"]
