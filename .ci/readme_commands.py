#!/usr/bin/env python3
"""Print one of README.md's two set-up commands verbatim: `main` (the first ```sh block) or `test` (the second).

.ci/run executes exactly this text, so CI runs what a newcomer copies from the README.
"""
import re, sys
from pathlib import Path

blocks = re.findall(r"```sh\n(.*?)\n```", (Path(__file__).resolve().parent.parent / "README.md").read_text(), re.S)
which = {"main": 0, "test": 1}[sys.argv[1]]
if len(blocks) < 2 or "\n" in blocks[which].strip():
    sys.exit("README.md must open with two one-line ```sh blocks: the main job, then the test suite")
print(blocks[which].strip())
