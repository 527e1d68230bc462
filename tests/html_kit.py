"""A parsed HTML page for the report tests: its start tags, images and scripts (attributes and text)."""

import json
from html.parser import HTMLParser

from cerebrum_jax.report import surface_viewer


class Page(HTMLParser):
    """tags [(tag, attrs)], scripts [(attrs, text)] of a page, fed whole."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[tuple[dict, str]] = []
        self._script: dict | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._script = dict(attrs)
            self.scripts.append((self._script, ""))

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None

    def handle_data(self, data):
        if self._script is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)


def viewer_of(page: Page) -> dict | None:
    """The 3-D viewer's data of a page, after checking that its scripts are the viewer's and nothing
    else: none loaded from a URL, one JSON block, then plotly.js and the viewer script, each whole (an
    unescaped ``</script>`` in the data would split them); None for a page without scripts."""
    if not page.scripts:
        return None
    assert all("src" not in attrs for attrs, _ in page.scripts)
    (data_attrs, data), (_, plotly), (_, viewer) = page.scripts
    assert data_attrs == {"type": "application/json", "id": "cj-viewer-data"}
    assert plotly == surface_viewer.plotly_js() and viewer == surface_viewer.VIEWER_JS
    return json.loads(data)
