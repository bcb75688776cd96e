"""Diagnostics: the model explained stage by stage (:mod:`.trace` records it, :mod:`.figures` draws it) and
its speed against torchvision's (:mod:`.benchmark`). Nothing else in the package imports these."""
