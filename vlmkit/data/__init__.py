"""Data: procedurally generated scenes with ground truth (see :mod:`vlmkit.data.scenes`)."""
from vlmkit.data.scenes import (COLORS, PRIOR, SHAPES, STYLES, Scene, SceneObject, generate_scene, load_annotations,
                                object_frequencies, save_scenes)

__all__ = ["COLORS", "PRIOR", "SHAPES", "STYLES", "Scene", "SceneObject", "generate_scene", "load_annotations",
           "object_frequencies", "save_scenes"]
