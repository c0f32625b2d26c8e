"""The scan viewer: MPR slice views, overlays, lesion list, series browser.

pyqtgraph must index images (row, column) as DICOM and numpy do, or every slice would appear
transposed; importing this package sets that once for the whole application.
"""
import pyqtgraph as pg

pg.setConfigOptions(imageAxisOrder="row-major", antialias=False)

from widgets.viewer.series_browser import SeriesBrowser  # noqa: E402
from widgets.viewer.viewer_panel import ViewerPanel  # noqa: E402

__all__ = ["SeriesBrowser", "ViewerPanel"]
