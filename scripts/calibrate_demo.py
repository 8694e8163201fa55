"""Fit the demo model's shipped speculator (src/expertpager/demo_model/speculator.safetensors) on its training
split, never on the held-out text. Run from the repository root (about 8 minutes on 2 cores):

    PYTHONPATH=src python scripts/calibrate_demo.py

Calibration text: training-split standard-library files spread evenly over the sorted list (every n-th, about
380 KB) and all training-split pydoc topics (about 250 KB), the same splits scripts/train_demo.py trains on; then
`expertpager calibrate` with distances 1..3.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

from train_demo import EOS, ROOT, code_documents, prose_documents

CODE_CHARS = 380_000


def spread(docs: list[str], chars: int) -> str:
    """Every n-th document, n chosen so that about `chars` characters are taken from all over the list."""
    step = max(1, sum(map(len, docs)) // chars)
    out, size = [], 0
    for doc in docs[::step]:
        if size >= chars:
            break
        out.append(doc)
        size += len(doc)
    return EOS.join(out)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        code, prose = Path(tmp, "code.txt"), Path(tmp, "prose.txt")
        code.write_text(spread(code_documents()[0], CODE_CHARS), encoding="utf-8")
        prose.write_text(EOS.join(prose_documents()[0]), encoding="utf-8")
        subprocess.run([sys.executable, "-m", "expertpager", "calibrate", str(ROOT / "src/expertpager/demo_model"),
                        "--input", str(code), "--input", str(prose), "--ahead", "3"], check=True)


if __name__ == "__main__":
    main()
