"""`fastddpm.kernels` in a source tree: the repository's top-level `kernels/` folder under fastddpm's name.

The Triton kernels live in the repository's top-level ``kernels/`` folder, but they are imported as
``fastddpm.kernels`` (PyPI's ``kernels`` package owns the top-level name). A built wheel holds them at
``fastddpm/kernels/`` (setup.py maps the package there) and never contains this file. Where fastddpm
is imported from a clone (``pip install -e .``, or a script that puts the clone on sys.path), Python
finds this file instead; it loads ``<clone>/kernels/__init__.py`` as this package, so
``fastddpm.kernels.<module>`` is read from ``<clone>/kernels/`` in both cases and nothing is ever
imported under the top-level name ``kernels``. This file imports only the standard library.
"""
import importlib.util
import os
import sys

_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "kernels")
_INIT = os.path.join(_SOURCE, "__init__.py")
if not os.path.isfile(_INIT):
    raise ImportError(f"fastddpm.kernels: the kernels folder {_SOURCE} is missing; fastddpm/ must sit in a "
                      f"fastddpm clone beside kernels/, or be installed with `pip install .`")
_spec = importlib.util.spec_from_file_location(__name__, _INIT, submodule_search_locations=[_SOURCE])
_module = importlib.util.module_from_spec(_spec)
# The import system returns what sys.modules holds once this file has run: the real package replaces this one.
sys.modules[__name__] = _module
_spec.loader.exec_module(_module)
