"""Write the file names of the images the bundled model was trained and validated on (``cxr evaluate`` warns when
a split holds images so named: the model's metrics on them are no test).

The bundled model was trained on the whole official Kermany train and val splits (5,216 + 16 images, at 224 px, in
``../shared/data/kermany-224``), its validation split carved from them; their file names are the published ones.

    python scripts/bundled_training_names.py ../shared/data/kermany-224
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

from cxr.evaluate import BUNDLED_TRAINING_NAMES


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else "../shared/data/kermany-224")
    names = sorted({f.name for f in root.rglob("*") if f.is_file() and not f.name.startswith(".")})
    # mtime 0: the same names give the same bytes
    with open(BUNDLED_TRAINING_NAMES, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(("\n".join(names) + "\n").encode())
    print(f"{len(names)} names -> {BUNDLED_TRAINING_NAMES}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
