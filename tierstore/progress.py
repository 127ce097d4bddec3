"""Progress-bar columns that count bytes as the tables do (KiB/MiB/GiB, via ``format_size``).

rich's own ``DownloadColumn``/``TransferSpeedColumn`` count decimal MB by default (the speed
column always), so a bar said "31.5 MB" where the table beside it said "30.0 MiB".
"""

from __future__ import annotations

from rich.progress import ProgressColumn, Task
from rich.text import Text

from .config import format_size

__all__ = ["BytesColumn", "SpeedColumn"]


class BytesColumn(ProgressColumn):
    """``done / total`` in binary units (``done`` alone while the total is unknown)."""

    def render(self, task: Task) -> Text:
        done = format_size(task.completed)
        text = done if task.total is None else f"{done} / {format_size(task.total)}"
        return Text(text, style="progress.download")


class SpeedColumn(ProgressColumn):
    """Bytes per second in binary units."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{format_size(speed)}/s", style="progress.data.speed")
