"""Ovis-U1: a compact, faithful, trainable implementation of the unified understanding/generation model.

`from ovis_u1 import OvisU1` is resolved lazily, so importing the package (or a light submodule such as
`ovis_u1.shapes`) does not pull in transformers and diffusers.
"""

__all__ = ["ChatSession", "EditSession", "OvisU1", "OvisU1Config", "get_preset", "load_model"]


def __getattr__(name):
    if name == "OvisU1":
        from .model import OvisU1
        return OvisU1
    if name == "ChatSession":
        from .chat import ChatSession
        return ChatSession
    if name == "EditSession":
        from .generation import EditSession
        return EditSession
    if name == "load_model":
        from .checkpoint import load_model
        return load_model
    if name in ("OvisU1Config", "get_preset"):
        from . import config
        return getattr(config, name)
    raise AttributeError(f"module 'ovis_u1' has no attribute {name!r}")
