"""A parsed HTML page for the report tests: its start tags, images, links, table cells and scripts."""

import json
from html.parser import HTMLParser

from cerebrum_jax.report import surface_viewer


class Page(HTMLParser):
    """Of a page, fed whole: tags [(tag, attrs)], imgs [src], links [href or src of any other tag], cells
    [text right after a <td>], scripts [(attrs, text)]."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.cells: list[str] = []
        self.scripts: list[tuple[dict, str]] = []
        self._script: dict | None = None
        self._in_td = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "img":
            self.imgs.append(attrs.get("src", ""))
        else:
            self.links += [attrs[key] for key in ("href", "src") if key in attrs]
        self._in_td = tag == "td"
        if tag == "script":
            self._script = attrs
            self.scripts.append((self._script, ""))

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None

    def handle_data(self, data):
        if self._in_td:
            self.cells.append(data)
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
