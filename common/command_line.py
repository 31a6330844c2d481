"""The command line of every script: tyro with one-line errors, and `--resume`.

    if __name__ == "__main__":
        cli(Args, main)

`cli` parses the flags into the script's frozen `Args` (`--help` shows
`python -m algos.<name>`, the docstring's first paragraph and the commands of
its `Run:` block: `help_text`), runs the shared checks
(common/checks.py: check_common), replaces the arguments with the saved ones
when `--resume RUN_DIR` is given, and calls `main(args)`. No user input ends in
a traceback: parser errors, bad values and divergence end with one line on
stderr and exit status 1; an unexpected exception is reported in one line too.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import mujoco
import tyro

from common.checks import check_common, fail, flag


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x

def resume_args(args):
    """The saved arguments of the run `args.resume` names. A flag given here
    that differs from its default must agree with the saved value: a resumed
    run keeps its configuration (one-line error otherwise)."""
    folder = Path(args.resume)
    try:
        saved = json.loads((folder / "args.json").read_text())
    except (OSError, ValueError):
        fail(f"--resume: '{folder}' is not a run directory (no readable args.json)")
    fields = {f.name: f for f in dataclasses.fields(args)}
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        fail(f"--resume: the saved run has arguments this script does not know: {', '.join(unknown)}")
    saved = {k: _tuples(v) for k, v in saved.items() if k != "resume"}
    for name, value in saved.items():
        given, default = getattr(args, name), _default(fields[name])
        if given != default and _tuples(json.loads(json.dumps(given, default=str))) != value:
            fail(f"--resume: {flag(name)} {given} differs from the saved run's {value}")
    return dataclasses.replace(args, **saved)


def _default(field):
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else None


def help_text(doc: str | None, name: str | None = None) -> str | None:
    """The description `--help` shows: the first paragraph of a module docstring,
    then the commands of its `Run:` block (indented lines up to the next blank
    line) as examples, then where the rest is."""
    if not doc:
        return None
    lines = doc.strip().splitlines()
    first = " ".join(line.strip() for line in lines[: next((i for i, x in enumerate(lines) if not x.strip()),
                                                             len(lines))])
    examples, inside = [], False
    for line in lines:
        if line.strip() == "Run:":
            inside = True
        elif inside and not line.strip():
            break
        elif inside:
            examples.append("    " + line.strip())
    out = [first]
    if examples:
        out += ["", "Examples:", *examples]
    if name and name.startswith("algos."):
        stem = name.split(".", 1)[1]
        out += ["", f"The paper, what is left out and the algorithm step by step: algos/{stem}.py's docstring;",
                f"equations, implementation details and results against the paper: docs/{stem}.md."]
    return "\n".join(out)


def mujoco_log_to(folder: str | Path, create: bool = True) -> Path:
    """Send MuJoCo's own log (its compiler's deprecation warnings, e.g. for
    HalfCheetah's `settotalmass`) to folder/MUJOCO_LOG.TXT instead of the
    working directory's MUJOCO_LOG.TXT. With create=False the folder is not
    made: until it exists MuJoCo writes no file (the warning still goes to stderr)."""
    folder = Path(folder)
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    config = mujoco.MjLogConfig.get()
    config.logfile = str(folder / "MUJOCO_LOG.TXT")
    config.set()
    return folder / "MUJOCO_LOG.TXT"


def cli(args_cls: type, main: Callable[[Any], Any], argv: list[str] | None = None):
    """Parse the command line into `args_cls` and run `main(args)`, so that no user
    input ends in a traceback: parser errors, bad values (check_common and the
    script's validate) and divergence end with one line on stderr. An exception
    that escapes `main` is reported in one line too, with where it was raised;
    set JAX_MBRL_TRACEBACK=1 to see the whole traceback instead."""
    module = sys.modules.get(main.__module__)
    name = getattr(getattr(module, "__spec__", None), "name", None)  # None when run as `python file.py`
    prog = f"python -m {name}" if name else f"python {Path(sys.argv[0]).name}"
    captured = io.StringIO()
    try:
        with redirect_stdout(captured), redirect_stderr(captured):
            args = tyro.cli(args_cls, args=argv, prog=prog,
                            description=help_text(getattr(module, "__doc__", None), name))
    except SystemExit as e:
        if e.code in (0, None):  # --help
            sys.stdout.write(captured.getvalue())
            raise
        fail(_one_line(captured.getvalue()))
    sys.stdout.write(captured.getvalue())
    check_common(args)
    if args.resume:
        args = resume_args(args)
    # beside the run directories, not in the working directory; runs/ itself is made by Run, after validation
    mujoco_log_to(args.resume or "runs", create=False)
    try:
        return main(args)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        raise SystemExit("error: interrupted; continue with --resume RUN_DIR from the last checkpoint") from None
    except Exception as e:
        if os.environ.get("JAX_MBRL_TRACEBACK"):
            raise
        where = _origin(e)
        text = " ".join(str(e).split())[:300] or type(e).__name__
        raise SystemExit(f"error: {type(e).__name__}: {text}{where} (JAX_MBRL_TRACEBACK=1 shows the traceback)"
                         ) from None


def _one_line(text: str) -> str:
    """tyro's boxed parser error as one line: the message block, plus the first
    suggestion of a "Perhaps you meant" block."""
    blocks, block = [], []
    for line in text.splitlines():
        s = line.strip().strip("│╭╮╰╯").strip()
        if s and set(s) <= set("-─"):
            blocks.append(block)
            block = []
        elif s:
            block.append(s)
    blocks.append(block)
    message = " ".join(blocks[1] if len(blocks) > 1 and blocks[1] else blocks[0]) or "bad command line"
    message = message.split(" Got errors:")[0]  # tyro's per-type attempts for a union-typed flag: noise here
    for b in blocks[2:]:
        if b and b[0].startswith("Perhaps you meant") and len(b) > 1:
            message += f"; perhaps you meant {b[1].split()[0]}"
    return f"{message} (see --help)"


def _origin(e: BaseException) -> str:
    tb, last = e.__traceback__, None
    while tb is not None:
        if "site-packages" not in tb.tb_frame.f_code.co_filename:
            last = tb
        tb = tb.tb_next
    if last is None:
        return ""
    return f" (at {Path(last.tb_frame.f_code.co_filename).name}:{last.tb_lineno})"
