"""The AI labeler: templates, backends, and the judge that turns them into preferences."""
from .backends import FunctionBackend, GroupBackend, HTTPBackend, LabelerError
from .judge import Labeler, gold_of, report
from .templates import PRESETS, LabelTemplate

__all__ = ["FunctionBackend", "GroupBackend", "HTTPBackend", "LabelerError", "Labeler", "gold_of",
           "report", "PRESETS", "LabelTemplate"]
