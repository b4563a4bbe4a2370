"""Progress bars (tqdm on stderr), silent when disabled (tests, API use with progress=False)."""

from __future__ import annotations

from contextlib import contextmanager

from tqdm.auto import tqdm


class Progress:
    """Makes the bars of one run: `make` returns a bar to update and close; `bar` is the scoped form."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def make(self, description: str, total: int, unit: str):
        return tqdm(total=total, desc=description, unit=unit, disable=not self.enabled, leave=False,
                    dynamic_ncols=True)

    @contextmanager
    def bar(self, description: str, total: int, unit: str):
        bar = self.make(description, total, unit)
        try:
            yield bar.update
        finally:
            bar.close()
