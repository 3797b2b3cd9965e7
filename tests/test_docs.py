"""The README, the help texts and the messages say what the code does: flags that exist, keys that exist, defaults as set.

Run: ``python -m pytest -q tests/test_docs.py`` (no model; a few seconds).
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from hf_longattn.cli import STEP_HELP, build_parser
from hf_longattn.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
OTHER_TOOLS = {  # flags of the commands the README and messages show beside ours (accelerate, torchrun, pip, ray, git, the official LADM and ProLong scripts)
    "--num_processes", "--multi_gpu", "--cpu", "--standalone", "--nproc_per_node", "--no-deps", "--index-url",
    "--num-gpus-per-actor", "--concurrency", "--address", "--working-dir", "--tasks", "--workers", "--executor",
    "--partition", "--time", "--gpus-per-task", "--cpus-per-task", "--mem-per-cpu-gb", "--env-command",
    "--write-selected", "--logging-dir", "--device", "--hypothesis-show-statistics", "--num-gpus", "--head",
    "--ablation", "--chunk_size", "--sample_size", "--dlt_ppl_threshold", "--window_size",  # LADM's, ProLong's run.py
    "--git-dir",
}


def our_flags() -> dict[str, set[str]]:
    parser = build_parser()
    return {name: set(sub._option_string_actions) for name, sub in parser.commands.items()}


def test_every_hf_longattn_flag_in_the_readme_exists():
    flags = our_flags()
    for line in README.splitlines():
        match = re.search(r"hf-longattn (run|windows|score|select|export|push|probe|config)\b(.*)", line)
        if match:
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", match.group(2)):
                assert flag in flags[match.group(1)], f"README: `hf-longattn {match.group(1)}` has no {flag}: {line}"


def test_every_flag_our_messages_name_exists():
    """A flag named in a message or help text of the package is a real flag of some subcommand (or of another tool)."""
    known = set().union(*our_flags().values()) | set(build_parser()._option_string_actions) | OTHER_TOOLS
    for path in sorted((ROOT / "hf_longattn").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", node.value):
                    assert flag in known, f"{path.relative_to(ROOT)} names {flag}, which no command has"


def test_the_config_keys_the_readme_lists_are_the_config_keys():
    paragraph = README.split("A config is YAML with these keys", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"`([a-z_]+)`", paragraph.split("):", 1)[1])
    keys = RunConfig.keys()
    assert [k for k in listed if k in keys] == [k for k in keys if k in listed]
    assert set(keys) <= set(listed), f"README's key list misses {sorted(set(keys) - set(listed))}"


def test_the_probe_default_is_the_one_the_readme_states():
    from hf_longattn.probe import probe
    from hf_longattn.probe.sampling import probe_samples

    default = RunConfig.__dataclass_fields__["probe_num_windows"].default
    assert inspect.signature(probe).parameters["num_windows"].default == default
    assert inspect.signature(probe_samples).parameters["num_windows"].default == default
    assert f"±0.07 at N = {default} (the\n  default)" in README or f"N = {default} (the default)" in README
    assert f"`--probe-num-windows` ({default} by default)" in README


@pytest.mark.parametrize("command", sorted(STEP_HELP))
def test_help_texts_name_only_real_config_keys(command):
    """A snake_case word in a command's help that looks like a setting is a config key."""
    keys = set(RunConfig.keys())
    text = re.sub(r"`[^`]*`", "", " ".join(STEP_HELP[command]))  # a quoted command line is not a setting
    words = set(re.findall(r"\b[a-z]+_[a-z_]+\b", text))
    settings = {w for w in words if not w.startswith(("longattn_", "output_dir/", "windows_")) and "." not in w}
    unknown = {w for w in settings if w not in keys and w not in {"load_dataset", "selector_json", "status_detail"}}
    assert not unknown, f"`hf-longattn {command} --help` names {sorted(unknown)}, which are not config keys"
