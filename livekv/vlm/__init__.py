"""The embedded default video-language model, trained from scratch on the synthetic world (see ``model.py``)."""

from livekv.vlm.model import WEIGHTS, DefaultVLMAdapter, load_default_vlm

__all__ = ["WEIGHTS", "DefaultVLMAdapter", "load_default_vlm"]
