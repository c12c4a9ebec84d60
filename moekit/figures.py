"""Matplotlib figures made without pyplot: a figure on its own Agg canvas, and saving it.

matplotlib is an optional dependency (the `plots` extra), imported on first use. Figures
are `matplotlib.figure.Figure` objects drawn on an Agg canvas of their own rather than
made through pyplot, so plotting from moekit never switches the caller's backend (pyplot's
switch closes every open figure, a notebook's included), needs no display, and leaves no
figure behind in pyplot's registry.
"""

from __future__ import annotations

from pathlib import Path

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
    """Write `fig` as a PNG at `path` (parent folders made); tight crops to the drawing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight" if tight else None)
    return path
