"""The pixels of one object of the video world (``livekv.vlm.world``): a shape filled in one colour inside its cell
of the 3 x 3 grid, with a margin of an eighth of the cell."""

from __future__ import annotations

from PIL import ImageDraw


def cell_box(index: int, size: int) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of the pixels of cell ``index`` (row-major, 0-8) in a ``size`` x ``size`` frame, end
    exclusive."""
    row, col = divmod(index, 3)
    return col * size // 3, row * size // 3, (col + 1) * size // 3, (row + 1) * size // 3


def draw_shape(draw: ImageDraw.ImageDraw, index: int, shape: str, colour: tuple[int, int, int], size: int) -> None:
    """Draw ``shape`` (circle, square, triangle or cross) in ``colour`` (RGB) in cell ``index``."""
    x0, y0, x1, y1 = cell_box(index, size)
    side = min(x1 - x0, y1 - y0)
    m = max(1, round(side / 8))  # margin: 2 px in a 16 px cell
    left, top, right, bottom = x0 + m, y0 + m, x1 - 1 - m, y1 - 1 - m  # PIL boxes include their end
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=colour)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=colour)
    elif shape == "triangle":
        draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=colour)
    else:  # cross: a plus sign, two bars of a quarter of the cell
        width = max(1, round(side / 4))
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.rectangle((left, cy - width / 2, right, cy + width / 2 - 1), fill=colour)
        draw.rectangle((cx - width / 2, top, cx + width / 2 - 1, bottom), fill=colour)
