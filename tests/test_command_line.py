"""`--help` of every algorithm: the program as `python -m algos.<name>`, the
docstring's first paragraph and the commands of its Run: block."""

import contextlib
import importlib
import io
from pathlib import Path

import gymnasium
import mujoco
import pytest

from common.command_line import cli, help_text, mujoco_log_to

ALGOS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "algos").glob("*.py") if p.stem != "__init__")

DOC = """Title line of the module,
continued here.

Papers: something long that --help leaves out.

Run:
    python -m algos.demo                  # quick try
    python -m algos.demo --paper          # the paper's setting

Algorithm:
    [1] not an example
"""


def test_help_text_is_the_first_paragraph_and_the_run_commands():
    text = help_text(DOC, "algos.demo")
    lines = text.splitlines()
    assert lines[0] == "Title line of the module, continued here."
    assert lines[1:5] == ["", "Examples:", "    python -m algos.demo                  # quick try",
                          "    python -m algos.demo --paper          # the paper's setting"]
    assert "Papers" not in text and "[1]" not in text
    assert "docs/demo.md" in text and "algos/demo.py" in text
    assert help_text("Just a title.", None) == "Just a title."  # no Run: block, no docs pointer
    assert help_text(None) is None


@pytest.mark.parametrize("name", ALGOS)
def test_every_algorithms_help_shows_its_program_summary_and_examples(name):
    module = importlib.import_module(f"algos.{name}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        cli(module.Args, module.main, argv=["--help"])
    assert exc.value.code in (0, None)
    text = out.getvalue()
    assert text.startswith(f"usage: python -m algos.{name} ")
    first = " ".join(module.__doc__.split("\n\n")[0].split())
    assert first in " ".join(text.split())
    examples = text.split("Examples:", 1)[1].split("\n\n")[0].splitlines()[1:]
    assert len(examples) >= 2 and all(e.strip().startswith(f"python -m algos.{name}") for e in examples)
    assert "Algorithm (" not in text  # the long docstring stays in the file


@pytest.fixture
def restore_mujoco_log():
    old = mujoco.MjLogConfig.get()
    yield
    old.set()


def test_mujoco_log_goes_to_the_given_folder_not_the_working_directory(tmp_path, monkeypatch, restore_mujoco_log):
    monkeypatch.chdir(tmp_path)
    path = mujoco_log_to(tmp_path / "logs")
    xml = Path(gymnasium.__file__).parent / "envs" / "mujoco" / "assets" / "half_cheetah.xml"
    mujoco.MjModel.from_xml_path(str(xml))  # its compiler warns that settotalmass is deprecated
    assert path == tmp_path / "logs" / "MUJOCO_LOG.TXT" and "settotalmass" in path.read_text()
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()


def test_cli_sends_mujocos_log_beside_the_runs(tmp_path, monkeypatch):
    from algos import dyna_q

    monkeypatch.chdir(tmp_path)
    seen = cli(dyna_q.Args, lambda args: mujoco.MjLogConfig.get().logfile, argv=[])
    assert Path(seen) == Path("runs") / "MUJOCO_LOG.TXT"
    assert not (tmp_path / "runs").exists()  # made by Run only, after the input checks


def test_after_a_cli_test_the_log_is_back_in_the_temp_folder():
    # runs after test_cli_sends_mujocos_log_beside_the_runs (file order): conftest's autouse fixture reset it
    assert Path(mujoco.MjLogConfig.get().logfile).parent.name.startswith("mujoco_log_")
