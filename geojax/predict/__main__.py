"""``python -m geojax.predict ...`` is ``geojax predict ...``."""

import sys

from geojax.predict.cli import main

sys.exit(main())
