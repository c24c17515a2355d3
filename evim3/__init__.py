"""evim3: E-ViM3 (Mamba-3D masked video autoencoder) for echocardiography, from training to the edge.

Layers, one way only::

    evim3.runtime  (numpy, PyAV, pydicom, onnxruntime/TensorRT; never torch)
        <- evim3   (torch: ops, modules, models, data, train)
        <- evim3.export
        <- evim3.cli

Importing ``evim3`` itself imports nothing heavy, so the edge runtime can live under it.
"""

from __future__ import annotations

import os as _os

# In a source checkout the sub-packages export/, runtime/ and cli/ sit beside evim3/ (pyproject maps them
# to evim3.export, evim3.runtime, evim3.cli). When Python finds this folder straight from the repo root
# rather than through the installed mapping, let the import system look beside it too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "runtime", "__init__.py")) and _root not in __path__:
    __path__.append(_root)

from evim3.runtime.version import __version__  # noqa: F401 -- after the path set-up above: one value for every layer
