"""Matplotlib figures made without pyplot: a figure on its own Agg canvas, and saving it.

matplotlib is an optional dependency (the `plots` extra), imported on first use. Figures
are `matplotlib.figure.Figure` objects drawn on an Agg canvas of their own rather than
made through pyplot, so plotting from moekit never switches the caller's backend (pyplot's
switch closes every open figure, a notebook's included), needs no display, and leaves no
figure behind in pyplot's registry.
"""

from __future__ import annotations

import math
from pathlib import Path

from moekit.atomic import replacing
from moekit.errors import MissingDependency

INSTALL_HINT = "pip install 'moekit[plots]'"


def have_matplotlib() -> bool:
    """Whether figures can be drawn; training skips its plots, with a warning, when not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def new_figure(
    width: float, height: float, nrows: int = 1, ncols: int = 1, layout: str | None = None
):
    """(figure, axes) with axes always a nested list [nrows][ncols]; sizes in inches."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise MissingDependency(f"plots need matplotlib: {INSTALL_HINT}") from err
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [list(row) for row in axes]


def save_figure(fig, path: str | Path, dpi: int, tight: bool = False) -> Path:
    """Write `fig` as a PNG at `path` (parent folders made), whole or not at all (an
    earlier figure there stays if drawing fails); tight crops to the drawing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    return path


MAX_TALL = 60.0
"""Inches: the tallest figure of many rows of panels (a 58-layer model's)."""


def panel_grid(n: int, min_height: float) -> tuple[int, int]:
    """(rows, cols) of n panels: two columns, more where rows of min_height inches would
    pass MAX_TALL."""
    max_rows = max(1, int(MAX_TALL // min_height))
    cols = min(n, max(2, math.ceil(n / max_rows)))
    return math.ceil(n / cols), cols


TICK_INCHES = 0.35
"""Room one integer tick label takes along an axis (three digits at matplotlib's default
size, with a gap): labels closer than this run into each other."""


def tick_step(count: int, inches: float) -> int:
    """Step between labelled ticks of `count` integer positions along `inches` of axis:
    a power of two (experts and layers come in powers of two) leaving each label room."""
    fits = max(2, int(inches / TICK_INCHES))
    step = 1
    while math.ceil(count / step) > fits:
        step *= 2
    return step
