"""bnzoo's `layers` package, imported as this package's sibling rather than by its bare name.

In a checkout and in a plain install, `models` and `layers` are top-level packages. A user whose
project has its own `layers.py` imports bnzoo's through `bnzoo.layers` and `bnzoo.models`
(`bnzoo/library_packages.py`), which load both under those names; `import layers` would then
give the user's module. So `models` reaches `layers` under the name its own package has:
`layers` beside `models`, `bnzoo.layers` beside `bnzoo.models`.
"""

import importlib

_PARENT = __package__.rpartition(".")[0]

layers = importlib.import_module(f"{_PARENT}.layers" if _PARENT else "layers")
