"""Fail CI where TKITrainer stops being a drop-in SFTTrainer on TRL's own SFTTrainer tests.

Reads the results the harness's `run` left (argument: the harness folder, ../shared/tools/trl-sft-suite). Every test
that passes with `trl.SFTTrainer` (baseline) must pass in `tki_off` (TKI switched off), and in `tki_default` pass or
stop at a deliberate refusal (the harness's category a, a documented ValueError). Exits 1 listing the others with
their category (b: crash, c: wrong value, d: timeout; skipped or not run also count).
"""

import sys
from pathlib import Path


sys.path.insert(0, str(Path(sys.argv[1]).resolve() / "lib"))
from analyze import load, suggest  # noqa: E402


ALLOWED = {"tki_off": set(), "tki_default": {"a"}}

baseline = load("baseline")
passing = sorted(test for test, (status, _, _) in baseline.items() if status == "passed")
problems = []
for variant, allowed in ALLOWED.items():
    results = load(variant)
    counts = {"passed": 0, "refused": 0}
    for test in passing:
        status, message, text = results.get(test, ("not run", "", ""))
        category = suggest(message, text)[0] if status in ("failed", "error") else status
        if category == "passed":
            counts["passed"] += 1
        elif category in allowed:
            counts["refused"] += 1
        else:
            problems.append(f"{variant}: [{category}] {test}: {(message.splitlines() or [''])[0][:200]}")
    print(f"{variant}: of {len(passing)} baseline-passing tests, {counts['passed']} pass, {counts['refused']} refused")
if problems:
    print("Baseline-passing tests TKITrainer breaks:", *problems, sep="\n  ")
    sys.exit(1)
