"""A progress bar fed by a query's `progress` (0 → 1), drawn with tqdm (`tqdm.auto`: a widget in
notebooks, text in terminals); a no-op when progress is off."""

from __future__ import annotations

from typing import Any

from attribution_client.models import Query

_STEPS = 1000


class QueryProgress:
    def __init__(self, enabled: bool, query_id: str, **tqdm_options: Any) -> None:
        self._bar: Any = None
        self._label = f"query {query_id[:12]}"
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=_STEPS, desc=self._label, leave=True,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}]", **tqdm_options)

    def update(self, query: Query) -> None:
        if self._bar is None:
            return
        done = _STEPS if query.status == "succeeded" else round(min(max(query.progress, 0.0), 1.0) * _STEPS)
        self._bar.set_description_str(f"{self._label} {query.status}", refresh=False)
        self._bar.update(max(done - self._bar.n, 0))
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
