"""Diagnostics: the model explained stage by stage (:mod:`.trace` records it, :mod:`.figures` draws it),
for ``tools/explain.py``. Nothing else in the package imports these."""
