"""CPU stand-in for `torchvision` (see ../_tandem_stub.py)."""
import sys as _sys

from _tandem_stub import install as _install

__version__ = "0.0.0+tandem.cpu.stub"  # SGLang parses it; transformers then reports the package present

_install(_sys.modules[__name__])
