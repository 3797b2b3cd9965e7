"""Tests of README.md: its layout section mirrors every module's one-line docstring; two set-up commands at the top, run by CI."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_layout_lists_every_module_with_its_docstring():
    layout = README.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = []
    for path in sorted((ROOT / "hf_longattn").rglob("*.py")):
        first = (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").strip().splitlines()
        width = 17 if path.parent.name in ("probe", "run", "scorers") else 19
        line = f"{path.name:<{max(width, len(path.name) + 1)}}"  # a name longer than the column: one space
        if not first or f"{line}{first[0]}" not in layout:
            missing.append(f"{path.relative_to(ROOT)}: {first[0] if first else '(no docstring)'}")
    assert missing == []


def test_two_setup_commands_near_the_top():
    head = README.split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", head, re.S).group(1)
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    assert "hf-longattn run" in commands[0] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command" in ci and "pip install" not in ci  # CI installs and tests only through these two lines
    assert all('pip install "torch==2.13.0"' in command and "python3 -m venv .venv" in command for command in commands)
    pins = set(re.findall(r"torch==[\d.]+", README + ci))
    assert pins == {"torch==2.13.0"}, f"one torch pin everywhere, got {pins}"
