"""Grounding: VL-SAM open-ended detection and segmentation (attention flow -> point prompts -> SAM).

``vlmkit.detect(image)`` is :func:`vlmkit.grounding.vlsam.detect`; segmenter backends live in
:mod:`vlmkit.grounding.segmenters`, the attention flow in :mod:`vlmkit.grounding.flow`.
"""

from vlmkit.grounding.vlsam import Detection, detect, draw_detections, to_coco

__all__ = ["Detection", "detect", "draw_detections", "to_coco"]
