"""CI: what the README's two commands printed agrees with the README: the demo's summary table, and tests that only skip GPU work.

Usage: python .ci/check_readme_numbers.py README.md DEMO_LOG TESTS_LOG
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

GPU_SKIP = re.compile(r"CUDA|GPU", re.IGNORECASE)


def summary_table(text: str) -> list[str]:
    """The lines from ``LongAttn summary:`` up to (not including) ``wall time:``, stripped of trailing spaces."""
    lines = [line.rstrip() for line in text.splitlines()]
    start = next((i for i, line in enumerate(lines) if line.startswith("LongAttn summary:")), None)
    if start is None:
        return []
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("wall time:")), len(lines))
    return lines[start:end]


def main(readme: str, demo_log: str, tests_log: str) -> int:
    problems = []
    documented, printed = summary_table(Path(readme).read_text()), summary_table(Path(demo_log).read_text())
    if not printed:
        problems.append("the demo printed no summary table")
    elif documented != printed:
        problems.append("the demo's summary table differs from the README's:\n  README:\n    " + "\n    ".join(documented)
                        + "\n  demo:\n    " + "\n    ".join(printed))
    log = Path(tests_log).read_text()
    final = [line for line in log.splitlines() if re.search(r"\d+ passed", line)]
    if not final or re.search(r"\d+ (failed|errors?)\b", final[-1]):
        problems.append(f"the tests did not all pass: {final[-1] if final else 'no pytest summary'}")
    skipped = [line for line in log.splitlines() if line.startswith("SKIPPED")]
    problems += [f"a test skipped for another reason than a missing GPU: {line}" for line in skipped if not GPU_SKIP.search(line)]
    for problem in problems:
        print(f"CI: {problem}", file=sys.stderr)
    if not problems:
        print(f"CI: the demo's table is the README's; tests: {final[-1].strip('= ')}; {len(skipped)} skip(s), all GPU-only")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
