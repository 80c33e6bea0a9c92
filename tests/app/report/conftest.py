import json
import re


def page_data(path) -> dict:
    """The JSON the page embeds (episodes, images, curves, patterns)."""
    m = re.search(r'<script id="acrl-data" type="application/json">(.*?)</script>', path.read_text(), re.S)
    assert m, f"no embedded data in {path}"
    return json.loads(m.group(1))
