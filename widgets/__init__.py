"""Qt widgets only: they render state and send intents; the work happens in app/ and app.core."""
import pyqtgraph as pg

# DICOM pixel arrays are (row, column): without this pyqtgraph shows them transposed.
pg.setConfigOptions(imageAxisOrder="row-major", antialias=False)
