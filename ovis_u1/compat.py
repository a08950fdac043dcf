"""Old module names kept working: `ovis_u1.inference` (now `generation` + `chat`) and `ovis_u1.processing`
(now `images` + `prompts`), for code written before the split by concern (users' scripts, the parity kit).

Each old name is a view onto its new modules: reading an attribute finds it in the first module that has it,
and setting one (a test's monkeypatch) sets it where it is defined, so the new code sees it.
"""

from __future__ import annotations

import sys
import types


class ForwardingModule(types.ModuleType):
    def __init__(self, name: str, *targets: types.ModuleType):
        super().__init__(name, f"the former {name}: see {', '.join(t.__name__ for t in targets)}")
        object.__setattr__(self, "_targets", targets)

    def _owner(self, attr: str) -> types.ModuleType:
        for module in self._targets:
            if hasattr(module, attr):
                return module
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")

    def __getattr__(self, attr: str):
        return getattr(self._owner(attr), attr)

    def __setattr__(self, attr: str, value) -> None:
        setattr(self._owner(attr), attr, value)


def install(name: str, *targets: types.ModuleType) -> None:
    sys.modules[name] = ForwardingModule(name, *targets)
