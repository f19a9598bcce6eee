"""Rebuild the bundled demo sample (src/cxr/sample/kermany-mini) from ../shared/data/kermany-224.

150 NORMAL and 150 PNEUMONIA training images, one per patient, drawn with a fixed seed from the official
train split; the 16 official val images serve as the demo's held-out test folder. Images are copied byte for byte.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from cxr.data import patient_id  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "kermany-224"
DST = Path(__file__).resolve().parents[1] / "src" / "cxr" / "sample" / "kermany-mini"
PER_CLASS = 150


def main() -> None:
    # Parsed first, so that `--help` (or a stray argument) prints and stops instead of rebuilding the sample.
    argparse.ArgumentParser(description=__doc__).parse_args()
    if not (SRC / "train").is_dir():
        sys.exit(f"{SRC}/train: not found; the sample is left as it is")
    rng = random.Random(0)
    if DST.exists():
        shutil.rmtree(DST)
    for cls in ("NORMAL", "PNEUMONIA"):
        by_patient: dict[str, list[Path]] = {}
        for f in sorted((SRC / "train" / cls).glob("*.jpeg")):
            by_patient.setdefault(patient_id(f.name), []).append(f)
        patients = sorted(by_patient)
        rng.shuffle(patients)
        for p in patients[:PER_CLASS]:
            f = rng.choice(by_patient[p])
            (DST / "train" / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, DST / "train" / cls / f.name)
        (DST / "test" / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((SRC / "val" / cls).glob("*.jpeg")):
            shutil.copy2(f, DST / "test" / cls / f.name)


if __name__ == "__main__":
    main()
