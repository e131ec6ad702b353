"""bnzoo's `models` package under a name no user module shadows (`bnzoo/library_packages.py`).

```python
from bnzoo.models import create_model
```
"""

import sys

from bnzoo.library_packages import load

sys.modules[__name__] = load("models")
