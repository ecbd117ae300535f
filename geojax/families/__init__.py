"""The built-in model families; importing this package registers them.

Each module here is one family: it builds a :class:`geojax.models.registry.Family` from its
network (:mod:`geojax.models`), converter (:mod:`geojax.convert`), objective
(:mod:`geojax.losses`) and inference code, and registers it. Nothing outside its module names
it: ``geojax predict``, ``evaluate.py``, ``train.py``, ``demo.py`` and the benches look it up in
the registry. To add a family, add a module here (and its import below), or register it from
another package through the ``geojax.families`` entry-point group.
"""

from geojax.families import d4rt  # noqa: F401
from geojax.families import da3  # noqa: F401
from geojax.families import dage  # noqa: F401
from geojax.families import pi3  # noqa: F401
from geojax.families import ppd  # noqa: F401
from geojax.families import urgt  # noqa: F401
