"""Per-layer plots for export folders and docs (PNG bytes, drawn with matplotlib's Agg backend)."""

from __future__ import annotations

import io


def layer_bars_png(series: dict[str, list[float]], title: str, ylabel: str = "sparsity") -> bytes:
    """Grouped bars, one group per decoder layer and one bar per series (e.g. attention and MLP)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    layers = max(len(values) for values in series.values())
    width = 0.8 / max(len(series), 1)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.28 * layers + 2), 3.2), dpi=100)
    for position, (name, values) in enumerate(series.items()):
        axes.bar([i - 0.4 + width * (position + 0.5) for i in range(len(values))], values, width, label=name)
    axes.set_xlabel("decoder layer")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.set_xlim(-0.6, layers - 0.4)
    axes.set_ylim(0, 1)
    axes.legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()
