"""Former name of `ovis_u1.images` + `ovis_u1.prompts` (see `ovis_u1.compat`)."""

from . import images, prompts
from .compat import install

install(__name__, images, prompts)
