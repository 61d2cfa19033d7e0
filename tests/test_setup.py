"""setup.py installs every command-line module of meanflow (meanflow/<name>.py run as `python -m meanflow.<name>`) as
the console script meanflow-<name>, whose main(argv) returns the exit status."""

import configparser
import glob
import importlib
import os
import subprocess
import sys

import pytest

from tests.meanflow.cli import REPO

# arguments each command refuses before doing any work (exit 2, one line on standard error)
BAD_ARGS = {
    "train": ["--train.no_such_key=1"],
    "sample": ["--run", "{missing}"],
    "evaluate": ["--run", "{missing}"],
    "launch": ["--nproc_per_node=2", "-m", "meanflow.train", "--no_such_key=1"],
    "experiments": ["ablations", "--n", "1"],
    "plots": ["--run", "{missing}"],
    "flops": ["--gpus", "0", "--table"],
    "prepare": ["latents", "--images", "{missing}", "--out", "{missing}-out", "--vae", "{missing}"],
    "imf_compare": ["sweep", "--run", "{missing}"],
}


def cli_modules():
    """meanflow.<name> runnable with python -m: a module with a __main__ guard, or a package with __main__.py."""
    names = []
    for path in sorted(glob.glob(os.path.join(REPO, "meanflow", "*.py"))):
        with open(path) as f:
            if 'if __name__ == "__main__":' in f.read():
                names.append(os.path.basename(path)[:-3])
    packages = glob.glob(os.path.join(REPO, "meanflow", "*", "__main__.py"))
    names += [os.path.basename(os.path.dirname(p)) for p in packages]
    return names


def console_scripts(tmp_path):
    """The console scripts as setuptools reads them from setup.py (egg_info into tmp_path: the repo is untouched)."""
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True)
    parser = configparser.ConfigParser()
    parser.read(glob.glob(os.path.join(tmp_path, "*.egg-info", "entry_points.txt")))
    return dict(parser["console_scripts"])


def test_every_cli_module_has_a_console_script(tmp_path):
    assert set(cli_modules()) == set(BAD_ARGS)  # a new command gets a line in BAD_ARGS, and a console script
    assert console_scripts(tmp_path) == {f"meanflow-{name}": f"meanflow.{name}:main" for name in BAD_ARGS}


@pytest.mark.parametrize("name", sorted(BAD_ARGS))
def test_main_returns_the_exit_status(name, tmp_path, capsys):
    main = importlib.import_module(f"meanflow.{name}").main
    argv = [a.format(missing=tmp_path / "missing") for a in BAD_ARGS[name]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"meanflow.{name}: error: "), err
