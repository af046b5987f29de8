"""Child-process entry of an isolated cell: read the cell's config, execute it, write the result.

    python -m pipeline.worker cell.json result.json     (started by pipeline.isolation, not by hand)
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pipeline.execute import execute


def main(argv: list[str]) -> int:
    cell_file, result_file = Path(argv[0]), Path(argv[1])
    result = execute(json.loads(cell_file.read_text()))
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        # Lightning's DDP launcher re-runs this command for every other rank: rank 0 reports
        return 0
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.to_dict(), default=str))
    tmp.replace(result_file)  # atomic: a result file is either whole or absent
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
