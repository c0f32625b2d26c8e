"""A synthetic chest CT phantom: anatomy, vessel and airway trees, lung nodules, and writers.

Everything here is generated from a seed with numpy (no real person's data), for research and
demonstration only. :mod:`app.core.demo_data` assembles it into DICOM studies with ground truth.
"""
