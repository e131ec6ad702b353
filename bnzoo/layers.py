"""bnzoo's `layers` package under a name no user module shadows (`bnzoo/library_packages.py`).

```python
from bnzoo.layers import BatchNormalization
```
"""

import sys

from bnzoo.library_packages import load

sys.modules[__name__] = load("layers")
