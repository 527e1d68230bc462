"""Figures and pages: ``figures`` (training curves, slices, report.md, the cross-validation summary),
``panels``, ``html_report``, ``surface_report`` (the surfaces' files and tables), ``surface_views``
(PNG/GIF, nilearn), ``surface_viewer`` (report.html's 3-D viewer).

``cerebrum_jax.report.NAME`` also reads the names of the old top-level module ``cerebrum_jax.report`` (now
``figures``), imported on first use.
"""

from cerebrum_jax._moved import forward

__getattr__ = forward(__name__, ("figures",))
