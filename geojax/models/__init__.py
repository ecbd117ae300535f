"""Model families: one file per system, each a composition of :mod:`geojax.nn` blocks."""
