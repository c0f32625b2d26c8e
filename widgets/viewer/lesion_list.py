"""The lesion list: one row per lesion, sortable, a click takes every view to the lesion.

The measurements come from app.core.lesions (the one lesion rule, shared with evaluation);
this widget only shows them.
"""
from __future__ import annotations

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt, Signal
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QLabel, QTableView, QVBoxLayout, QWidget

from widgets.viewer.annotations import AI_MARKER


def _image_numbers(k_first: int, k_last: int) -> str:
    """Slice range as the image numbers the viewer shows (k + 1)."""
    return str(k_first + 1) if k_first == k_last else f"{k_first + 1}–{k_last + 1}"

# (header, tooltip, text of a lesion, number to sort by)
COLUMNS = [
    ("#", "Lesion number (largest first)", lambda l: str(l.lesion_id), lambda l: l.lesion_id),
    ("Size mm", "Lung-RADS size: mean of long and short axis on the axial slice of greatest extent",
     lambda l: f"{l.mean_diameter_mm:.1f}", lambda l: l.mean_diameter_mm),
    ("Vol mL", "Volume in millilitres", lambda l: f"{l.volume_ml:.3f}", lambda l: l.volume_ml),
    ("Mean HU", "Mean attenuation, padding excluded",
     lambda l: "—" if l.mean_hu is None else f"{l.mean_hu:.0f}",
     lambda l: float("-inf") if l.mean_hu is None else l.mean_hu),
    ("Slices", "First–last slice (image numbers)",
     lambda l: _image_numbers(*l.slice_range), lambda l: l.slice_range[0]),
    ("Long × short", "Long and short axis (mm) on that slice",
     lambda l: f"{l.long_axis_mm:.1f} × {l.short_axis_mm:.1f}", lambda l: l.long_axis_mm),
    ("Centre L/P/S mm", "Centre of the lesion in patient coordinates",
     lambda l: "({:.0f}, {:.0f}, {:.0f})".format(*l.centre_lps), lambda l: l.centre_lps[2]),
    ("Class", "Label value in the label map", lambda l: str(l.label), lambda l: l.label),
]
SORT_ROLE = Qt.ItemDataRole.UserRole + 1
LESION_ROLE = Qt.ItemDataRole.UserRole + 2


class LesionTableModel(QAbstractTableModel):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.lesions: list = []

    def set_lesions(self, lesions) -> None:
        self.beginResetModel()
        self.lesions = list(lesions)
        self.endResetModel()

    def rowCount(self, parent=QModelIndex()):
        return 0 if parent.isValid() else len(self.lesions)

    def columnCount(self, parent=QModelIndex()):
        return 0 if parent.isValid() else len(COLUMNS)

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        lesion = self.lesions[index.row()]
        _, _, text, number = COLUMNS[index.column()]
        if role == Qt.ItemDataRole.DisplayRole:
            return text(lesion)
        if role == SORT_ROLE:
            return number(lesion)
        if role == LESION_ROLE:
            return lesion
        if role == Qt.ItemDataRole.TextAlignmentRole:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):
        if orientation != Qt.Orientation.Horizontal:
            return None
        if role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section][0]
        if role == Qt.ItemDataRole.ToolTipRole:
            return COLUMNS[section][1]
        return None


class LesionList(QWidget):
    """Title (source, AI marker), then the sortable table. Emits the lesion the user picked."""

    lesion_activated = Signal(object)  # app.core.lesions.Lesion

    def __init__(self, parent=None):
        super().__init__(parent)
        self.title = QLabel("Lesions")
        self.title.setWordWrap(True)
        self.model = LesionTableModel(self)
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setSortRole(SORT_ROLE)
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().hide()
        self.table.verticalHeader().setDefaultSectionSize(22)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.clicked.connect(self._on_clicked)
        self.table.activated.connect(self._on_clicked)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.title)
        layout.addWidget(self.table)

    def set_lesions(self, lesions, source: str = "", is_ai: bool = False) -> None:
        self.model.set_lesions(lesions)
        where = f" — {source}" if source else ""
        marker = f"<br><span style='background:#ffb000; color:#202020'>&nbsp;{AI_MARKER}&nbsp;</span>" if is_ai else ""
        self.title.setText(f"<b>Lesions ({len(self.model.lesions)})</b>{where}{marker}")

    def row_of(self, lesion_id: int) -> int:
        """Row (as sorted now) showing a lesion, or -1."""
        for row in range(self.proxy.rowCount()):
            if self.proxy.index(row, 0).data(LESION_ROLE).lesion_id == lesion_id:
                return row
        return -1

    def _on_clicked(self, index) -> None:
        lesion = index.data(LESION_ROLE)
        if lesion is not None:
            self.lesion_activated.emit(lesion)
