"""The README stays a user's page: short, its two commands the ones CI runs, every stage in its tables and in the
command line's help, every command and link it names real."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

from llama2_hf.cli import COMMANDS, OTHER_COMMANDS, STAGE_HELP
from llama2_hf.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
MAX_README_LINES = 250


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    """The text of the `## heading...` section, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README has no section '## {heading}'"
    return match.group(1)


def _first_column(section: str) -> list[str]:
    """The commands named in the first cell of each row of the section's tables (`a`, `b` -> [a, b])."""
    names = []
    for line in section.splitlines():
        if line.startswith("| `"):
            names += re.findall(r"`([^`]+)`", line.split("|")[1])
    return names


def test_readme_is_short():
    lines = len(_readme().splitlines())
    assert lines < MAX_README_LINES, f"README.md has {lines} lines; keep it under {MAX_README_LINES}"


def test_readme_commands_are_what_ci_runs():
    ci = CI_RUN.read_text(encoding="utf-8")
    torch_pin = re.search(r'install -q "torch==([^"]+)"', ci).group(1)
    assert 'pip install -q -e ".[test]"' in ci
    ci_test = [line for line in ci.splitlines() if line.startswith("python -m pytest")][-1]

    block = re.search(r"```bash\n(.*?)```", _section(_readme(), "Set-up and the two commands"), re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    install = f'pip install torch=={torch_pin} && pip install -e ".[test]"'
    assert commands == [f"{install} && llama2-hf quickstart", f"{install} && {ci_test}"]

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    scripts = config["options.entry_points"]["console_scripts"]
    assert re.search(r"^llama2-hf\s*=\s*llama2_hf\.cli:main$", scripts, re.M), scripts
    assert "quickstart" in OTHER_COMMANDS


def test_every_stage_has_a_help_line():
    assert set(STAGE_HELP) == set(STAGES)
    assert all(STAGE_HELP[name].strip() for name in STAGES)


def test_every_stage_is_in_the_readme_tables():
    text = _readme()
    assert sorted(_first_column(_section(text, "The pipeline, stage by stage"))) == sorted(STAGES)
    in_errors_table = set(_first_column(_section(text, "Errors and resuming")))
    assert set(STAGES) <= in_errors_table, sorted(set(STAGES) - in_errors_table)


def test_commands_named_in_the_docs_exist():
    for doc in (README, ROOT / "docs" / "quickstart.md"):
        text = doc.read_text(encoding="utf-8")
        named = set(re.findall(r"\bllama2-hf ([a-z][a-z-]*)", text)) | set(re.findall(r"-m llama2_hf\.cli ([a-z-]+)",
                                                                                    text))
        assert named, doc
        assert named <= set(COMMANDS), f"{doc.name}: unknown commands {sorted(named - set(COMMANDS))}"


def test_quickstart_flags_in_its_document_exist():
    from dataclasses import fields

    from llama2_hf.quickstart.pipeline import QuickstartConfig

    flags = set(re.findall(r"`--([a-z_]+)", (ROOT / "docs" / "quickstart.md").read_text(encoding="utf-8")))
    known = {f.name for f in fields(QuickstartConfig)} | {"no_quiet"}
    assert flags and flags <= known, sorted(flags - known)


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#]+)\)", _readme()):
        if "://" not in target:
            assert (ROOT / target).exists(), target
