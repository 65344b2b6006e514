"""Pretrained models: list, load, evaluate, export and publish them.

```python
import zoo.hub
print(zoo.hub.list_pretrained())
model = zoo.hub.load_pretrained("digits-ln_lstm")  # eval mode, CPU, model.card, model.config
```

A published model is a directory with ``model.safetensors``, ``config.json`` and ``README.md`` (`zoo.hub.format`);
it is found by name in ``zoo/hub/manifest.json``, or given as a directory, an http(s) URL or ``hf://owner/repo``
(`zoo.hub.sources`). ``python -m zoo.hub --help`` lists the commands (list, table, pull, export, push).
"""

from .format import FILES, FORMAT, HubError, ModelCard
from .load import (
    Published,
    build_published,
    datamodule_for,
    evaluate,
    list_pretrained,
    load_into,
    load_pretrained,
    read_published,
)
from .publish import export, markdown_table, push
from .sources import PretrainedInfo, read_manifest, resolve

__all__ = [
    "FILES",
    "FORMAT",
    "HubError",
    "ModelCard",
    "PretrainedInfo",
    "Published",
    "build_published",
    "datamodule_for",
    "evaluate",
    "export",
    "list_pretrained",
    "load_into",
    "load_pretrained",
    "markdown_table",
    "push",
    "read_manifest",
    "read_published",
    "resolve",
]
