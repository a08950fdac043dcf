"""Former name of `ovis_u1.generation` + `ovis_u1.chat` (see `ovis_u1.compat`)."""

from . import chat, generation
from .compat import install

install(__name__, generation, chat)
