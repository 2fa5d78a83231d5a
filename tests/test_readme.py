"""Every command in README.md's code blocks still matches the tool: options parse, files and targets exist.

Commands that need real data, weights, GPUs or a Docker daemon are checked as far as this machine allows:
their arguments go through the real parser, in-process (``--print_config`` stops before anything is loaded).
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, load_benchmark
from tcube_lightning.cli.app import main


def readme_commands() -> list[str]:
    """Each command of README.md's bash blocks, continuation lines joined and comments dropped."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = " ".join(line.split(" #")[0].split())
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


COMMANDS = readme_commands()


def cli_arguments(command: str) -> list[str] | None:
    """The arguments a command hands to main.py (directly, or as the Docker image's entrypoint)."""
    words = shlex.split(command)
    for start, word in enumerate(words):
        if word.endswith("main.py"):
            return words[start + 1 :]
    if words[:2] == ["docker", "run"]:
        return words[words.index("tcube-lightning") + 1 :]
    return None


CLI_COMMANDS = [c for c in COMMANDS if cli_arguments(c) is not None]


def test_the_readme_has_the_commands_this_file_checks():
    assert len(CLI_COMMANDS) >= 6
    others = [c for c in COMMANDS if c not in CLI_COMMANDS]
    assert others == [
        "make test",
        "make demo",
        "python -m tcube_lightning.reporting.paper_table runs/blood runs/breast runs/retina runs/oct runs/pneumonia "
        "--out paper_table",
        ".venv/bin/python benchmarks/bench_merging.py --rows clip-b16:full biomedclip-base:full biomedclip-base:lora "
        "--repeats 5",
        "docker build -t tcube-lightning .",
    ]


@pytest.mark.parametrize("command", CLI_COMMANDS)
def test_readme_command_line_parses(command, capsys, monkeypatch):
    # "my.yaml" stands for the reader's own config: any modality config takes its place here.
    arguments = [a.replace("my.yaml", "configs/blood.yaml") for a in cli_arguments(command)]
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as done:
        main([*arguments, "--print_config"])
    printed = capsys.readouterr()
    assert done.value.code == 0, printed.err[-2000:]
    assert "lambda_min" in printed.out


def test_make_targets_run_what_the_readme_says():
    for target, expected in (("test", "-m pytest -q"), ("demo", "main.py test --config configs/demo.yaml")):
        done = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and expected in done.stdout, done.stdout + done.stderr


def test_benchmark_options_in_the_readme_and_the_gpu_script_exist(capsys):
    (command,) = [c for c in COMMANDS if "bench_merging.py" in c]
    gpu_script = (REPO / "benchmarks" / "gpu_rows.sh").read_text()
    with pytest.raises(SystemExit) as done:
        load_benchmark().main(["--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    options = re.findall(r"--[\w-]+", command + gpu_script)
    assert {"--device", "--bf16", "--compile", "--batch-size"} <= set(options)
    for option in options:
        assert option in help_text, option


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run([str(hadolint), "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_paper_table_command_in_the_readme_has_options_that_exist(capsys):
    from tcube_lightning.reporting import paper_table

    (command,) = [c for c in COMMANDS if "paper_table" in c]
    with pytest.raises(SystemExit) as done:
        paper_table.main(["--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    for option in re.findall(r"--[\w-]+", command):
        assert option in help_text, option
