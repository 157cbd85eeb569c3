"""Print the N-th ```bash block (0: main job, 1: tests) of the README's Quick start section."""

import re
import sys
from pathlib import Path


section = re.search(r"^## Quick start\n(.*?)(?=^## )", Path("README.md").read_text(), re.S | re.M).group(1)
blocks = re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M)
if len(blocks) != 2:
    sys.exit(f"README's Quick start holds {len(blocks)} bash blocks, expected 2")
print(blocks[int(sys.argv[1])])
