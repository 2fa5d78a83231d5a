"""The documentation (README.md and the site in docs/) still matches the tool: the site builds strictly, every
command in a fenced shell block runs in the suite or says what it needs, every command line and option it names
parses, Python snippets run, every image a page shows exists, and README fits on two screens.

Commands that need real data, weights, GPUs or a Docker daemon are checked as far as this machine allows: their
arguments go through the real parser, in-process (``--print_config`` stops before anything is loaded).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, cli_arguments, load_benchmark, shell_blocks
from tcube_lightning.cli import inspect_command
from tcube_lightning.cli.entry import main

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN_BY_THE_SUITE = {
    "make test": "the suite itself (CI runs it)",
    "make demo": "test_make_targets_run_what_the_pages_say; both demo configs run in tests/data/test_demo.py",
    ".venv/bin/python main.py test --config configs/demo.yaml": "tests/data/test_demo.py, on a tiny build",
    "python main.py --help": "test_help_commands_print_the_options",
    "python main.py test --help": "test_help_commands_print_the_options",
    "python main.py predict --help": "test_help_commands_print_the_options",
    "python main.py inspect --help": "test_help_commands_print_the_options",
    "python main.py predict --config configs/demo.yaml --data.root clinic --data.sources '{scans: scans}' "
    "--model.results_dir my_predictions": "tests/data/test_demo.py, with the tiny build's models",
}
"""The commands of unmarked blocks and the test that runs each."""
DELIBERATE = {"--model.gamm"}
"""Options a page names to show what happens to a wrong one."""


COMMANDS = [(path, marked, c) for path in PAGES for marked, commands in shell_blocks(path) for c in commands]


CLI_COMMANDS = sorted({c for _, _, c in COMMANDS if cli_arguments(c) is not None})


def test_the_site_builds_strictly(tmp_path):
    """Broken links and anchors, pages missing from the navigation, bad API references: each fails the build."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    config = load_config(str(REPO / "mkdocs.yml"), strict=True, site_dir=str(tmp_path / "site"))
    build(config)
    cli_page = (tmp_path / "site" / "cli" / "index.html").read_text()
    assert "--model.k_experts.rule" in cli_page and "--data.expert_of" in cli_page  # generated from the parser
    assert cli_page.index("--model.arch") < cli_page.index("--trainer.devices")  # our options before the Trainer's
    assert "ExpertStore" in (tmp_path / "site" / "api" / "index.html").read_text()
    for page in (tmp_path / "site").rglob("*.html"):
        html = page.read_text()
        runs_on = [p[:60] for p in re.findall(r"<p>(.*?)</p>", html, flags=re.S) if re.search(r"(^|\n)- ", p)]
        assert not runs_on, f"{page}: list items rendered as a paragraph (a blank line is missing): {runs_on}"
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", html), f"{page}: a control byte"
        for image in re.findall(r'<img [^>]*src="([^"]+\.png)"', html):
            assert f'href="{image}"' in html, f"{page}: {image} does not open at full size"
    methods = (tmp_path / "site" / "methods" / "index.html").read_text()
    assert "γ gamma" in methods  # searching "gamma" finds the pages that write γ
    # Widths: a code line longer than its block scrolls in it, identifiers in table cells do not break mid-word.
    style = (tmp_path / "site" / "stylesheets" / "extra.css").read_text()
    assert re.search(r"pre > code \{[^}]*overflow-x: auto", style)
    assert re.search(r"td code[^{]*\{[^}]*white-space: nowrap", style)
    for page in (tmp_path / "site").rglob("index.html"):
        assert "stylesheets/extra.css" in page.read_text(), f"{page}: without the width rules"


def test_every_command_runs_in_the_suite_or_says_what_it_needs():
    unmarked = {command for _, marked, command in COMMANDS if not marked}
    assert unmarked <= set(RUN_BY_THE_SUITE), unmarked - set(RUN_BY_THE_SUITE)
    assert len(CLI_COMMANDS) >= 8


@pytest.mark.parametrize("command", CLI_COMMANDS)
def test_every_command_line_parses(command, capsys, monkeypatch):
    # "my.yaml" stands for the reader's own config: any modality config takes its place here.
    arguments = [a.replace("my.yaml", "configs/blood.yaml") for a in cli_arguments(command) if a != "--help"]
    monkeypatch.chdir(REPO)
    if arguments[:1] in ([], ["inspect"]) and "--help" in command:  # test_help_commands_print_the_options
        assert cli_help(arguments[0] if arguments else None, capsys)
        return
    if arguments[0] == "inspect":  # its own parser, which reads files only when run
        inspect_command.parser().parse_args(arguments[1:])
        return
    with pytest.raises(SystemExit) as done:
        main([*arguments, "--print_config"])
    printed = capsys.readouterr()
    assert done.value.code == 0, printed.err[-2000:]
    assert "lambda_min" in printed.out


def cli_help(command: str | None, capsys) -> str:
    """What ``main.py <command> --help`` prints (``main.py --help`` without a command)."""
    with pytest.raises(SystemExit) as done:
        main([command, "--help"] if command else ["--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_help_commands_print_the_options(capsys):
    for subcommand in ("test", "predict"):
        assert "--model.lambda_weights" in cli_help(subcommand, capsys)
    assert "--generalist" in cli_help("inspect", capsys)
    assert all(f"\n  {name} " in cli_help(None, capsys) for name in ("test", "predict", "inspect"))


def test_every_option_a_page_names_exists(capsys):
    known = cli_help("test", capsys) + cli_help("predict", capsys)
    named = {option for path in PAGES for option in re.findall(r"--(?:model|data|trainer)\.[\w.]+", path.read_text())}
    missing = sorted(
        option
        for option in named - DELIBERATE
        if option.rstrip(".") + (" " if not option.endswith(".") else ".") not in known
    )
    assert not missing, missing


def test_python_snippets_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    snippets = [(path, s) for path in PAGES for s in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)]
    assert snippets
    for path, snippet in snippets:
        exec(compile(snippet, str(path), "exec"), {"__name__": "__snippet__"})


def test_every_image_a_page_shows_exists():
    shown = [(path, image) for path in PAGES for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", path.read_text())]
    assert len(shown) >= 7
    for path, image in shown:
        assert (path.parent / image).is_file(), f"{path.name}: {image}"


def test_readme_fits_on_two_screens_and_the_changelog_keeps_its_form():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert changelog.startswith("# Changelog") and "## [Unreleased]" in changelog and "### Added" in changelog


def test_make_targets_run_what_the_pages_say():
    targets = {
        "test": ["-m pytest -q"],
        "demo": ["main.py test --config configs/demo.yaml", "main.py test --config configs/demo_experts.yaml"],
        "docs": ["-m mkdocs build --strict"],
        "docs-serve": ["-m mkdocs serve"],
    }
    for target, expected in targets.items():
        done = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and all(e in done.stdout for e in expected), done.stdout + done.stderr


@pytest.mark.parametrize("script", ["bench_merging", "bench_merge_passes"])
def test_benchmark_options_in_the_pages_and_the_gpu_script_exist(script, capsys):
    gpu_lines = (REPO / "benchmarks" / "gpu_rows.sh").read_text().replace("\\\n", " ").splitlines()
    passes = [line for line in gpu_lines if "bench_merge_passes.py" in line]  # the rest is the rows' loop
    gpu = {"bench_merge_passes": passes, "bench_merging": [line for line in gpu_lines if line not in passes]}
    commands = [c for _, _, c in COMMANDS if f"{script}.py" in c] + gpu[script]
    with pytest.raises(SystemExit) as done:
        load_benchmark(script).main(["--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    options = re.findall(r"--[\w-]+", " ".join(commands))
    assert {"--device"} <= set(options)
    if script == "bench_merging":
        assert {"--bf16", "--compile", "--batch-size", "--rows"} <= set(options)
    for option in options:
        assert option in help_text, option


def test_the_paper_table_command_has_options_that_exist(capsys):
    from tcube_lightning.reporting import paper_table

    (command,) = [c for _, _, c in COMMANDS if "paper_table" in c]
    with pytest.raises(SystemExit) as done:
        paper_table.main(["--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    for option in re.findall(r"--[\w-]+", command):
        assert option in help_text, option


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run([str(hadolint), "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_file_of_the_project_a_page_names_exists():
    pattern = r"\b((?:configs|benchmarks|docs|tests|tcube_lightning)/[\w./-]*\.(?:yaml|py|sh|md|json))\b"
    named = {(path.name, file) for path in PAGES for file in re.findall(pattern, path.read_text())}
    assert len(named) >= 10
    missing = sorted((page, file) for page, file in named if not (REPO / file).exists())
    assert not missing, missing
