"""The test processes' XLA flags (tests/support/xla.py): one level for the session and every
process its tests start, the user's own level kept."""

from tests.support import xla


def test_device_count_replaced_and_minus_o0_added():
    flags = xla.xla_flags(4, "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d")
    assert flags.split() == [
        "--xla_dump_to=/tmp/d",
        "--xla_force_host_platform_device_count=4",
        xla.OPT_LEVEL_FLAG,
    ]


def test_a_users_level_is_kept_and_reaches_the_processes_tests_start(monkeypatch):
    session = xla.xla_flags(8, "--xla_backend_optimization_level=2")
    assert xla.OPT_LEVEL_FLAG not in session
    monkeypatch.setenv("XLA_FLAGS", session)  # as conftest leaves it
    child = xla.xla_flags(1).split()
    assert "--xla_backend_optimization_level=2" in child and xla.OPT_LEVEL_FLAG not in child
    assert "--xla_force_host_platform_device_count=1" in child


def test_optimize_drops_only_the_suites_own_level():
    assert xla.OPT_LEVEL_FLAG not in xla.xla_flags(8, xla.xla_flags(8, ""), optimize=True)
    kept = xla.xla_flags(8, "--xla_backend_optimization_level=1", optimize=True)
    assert "--xla_backend_optimization_level=1" in kept.split()
