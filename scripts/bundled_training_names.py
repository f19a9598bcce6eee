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
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[0])
    # Run elsewhere, a default folder that was not there had written an empty list: evaluate's warning switched off.
    names = sorted({f.name for f in root.rglob("*") if f.is_file() and not f.name.startswith(".")})
    if not (root / "train").is_dir() or len(names) < 5000:
        print(f"{root}: not the Kermany 224 data set (train/ and val/, 5,232 images); the list is unchanged",
              file=sys.stderr)
        return 2
    # mtime 0: the same names give the same bytes
    with open(BUNDLED_TRAINING_NAMES, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(("\n".join(names) + "\n").encode())
    print(f"{len(names)} names -> {BUNDLED_TRAINING_NAMES}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
