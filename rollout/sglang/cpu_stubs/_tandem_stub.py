"""Import-time stand-ins for CUDA-only packages that SGLang imports on its CPU path.

Only `rollout/sglang/cpu.py` puts this directory on PYTHONPATH, and only when the rollout device is
CPU. Any attribute of a stub module (and any submodule) resolves to a `Stub`; *calling* a stub
raises NotImplementedError and appends the name to $TANDEM_CPU_STUB_LOG, so tests can assert that
no stand-in was ever used by generation, logprobs or weight updates.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types


def _record(name: str) -> None:
    path = os.environ.get("TANDEM_CPU_STUB_LOG")
    if path:
        with open(path, "a") as f:
            f.write(name + "\n")


class Stub:
    def __init__(self, name: str):
        self.__name__ = self.__qualname__ = name.rsplit(".", 1)[-1]
        self._stub_name = name

    def __getattr__(self, attr: str) -> "Stub":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Stub(f"{self._stub_name}.{attr}")

    def __call__(self, *args, **kwargs):
        _record(self._stub_name)
        raise NotImplementedError(f"{self._stub_name} is a CPU stand-in (tandem rollout/sglang/cpu_stubs) and cannot run")

    def __mro_entries__(self, bases):  # allow `class X(stub_base):` at import time
        return (object,)

    def __repr__(self) -> str:
        return f"<tandem CPU stub {self._stub_name}>"


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Stub(f"{self.__name__}.{attr}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, root: str):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(self.root + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install(package: types.ModuleType) -> None:
    """Turn an (empty) stand-in package into one whose attributes and submodules are all stubs."""
    package.__class__ = _StubModule
    sys.meta_path.insert(0, _Finder(package.__name__))
