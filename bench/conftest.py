"""Benchmarks run only on request: ``pytest bench/ --benchmark`` (pytest-benchmark 5.x has no such flag; it is added
here). Without it every test under bench/ is skipped, and plain ``pytest`` (testpaths = tests) never collects them.

At the end of a run the markdown report (bench.report) is printed; ``--benchmark-markdown=FILE`` also writes it.
The run's device, torch/triton versions and commit go into the JSON's machine_info["meanflow"].
``--gpu-check`` selects the quick profile that `make gpu-check` (bench.gpu_check) runs: the same benchmarks with
fewer, shorter rounds, and the DiT-XL/2 training step with the dual engine on the kernels only (bench.common.QUICK).
"""

from pathlib import Path

import pytest

from bench import report
from bench.common import FULL, QUICK, environment

BENCH_DIR = Path(__file__).resolve().parent


def pytest_addoption(parser):
    group = parser.getgroup("meanflow benchmarks")
    group.addoption("--benchmark", action="store_true", help="run the benchmarks under bench/ (skipped otherwise)")
    group.addoption("--benchmark-markdown", metavar="FILE", default=None,
                    help="also write the markdown report of this run to FILE")
    group.addoption("--gpu-check", action="store_true",
                    help="the quick profile of `make gpu-check`: fewer and shorter rounds (bench.common.QUICK)")


@pytest.fixture
def profile(request):
    """How much each benchmark measures: bench.common.FULL, or QUICK under --gpu-check."""
    return QUICK if request.config.getoption("--gpu-check") else FULL


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmark: run with `pytest bench/ --benchmark`")
    for item in items:
        if BENCH_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["meanflow"] = environment()


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if not config.getoption("--benchmark") or session is None or not session.benchmarks:
        return
    machine_info = config.hook.pytest_benchmark_generate_machine_info(config=config)
    config.hook.pytest_benchmark_update_machine_info(config=config, machine_info=machine_info)
    commit_info = config.hook.pytest_benchmark_generate_commit_info(config=config)
    data = config.hook.pytest_benchmark_generate_json(config=config, benchmarks=session.benchmarks,
                                                      include_data=False, machine_info=machine_info,
                                                      commit_info=commit_info)
    text = report.render(data)
    terminalreporter.write_sep("=", "meanflow benchmark report (markdown)")
    terminalreporter.write_line(text)
    out = config.getoption("--benchmark-markdown")
    if out:
        Path(out).write_text(text + "\n")
        terminalreporter.write_line(f"wrote {out}")
