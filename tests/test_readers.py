"""The read-ahead's reader count: the rule from the CPUs the process may use (affinity, cgroup quota, given as
inputs), READAHEAD_READERS over it, a bad value's error, and the count and its source in the log line that
starts the read-ahead.  No timing: counts and text only."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from qwen_edit_worker.errors import SettingsError
from qwen_edit_worker.model import readahead, readers
from qwen_edit_worker.model.readers import Cpus
from qwen_edit_worker.settings import HOST_TUNING, MAX_READAHEAD_READERS, SETTINGS, Settings


class TestRule:
    @pytest.mark.parametrize(("cpus", "expected"), [(0, 4), (1, 4), (2, 8), (3, 12), (4, 16), (8, 16), (256, 16)])
    def test_four_readers_a_cpu_at_most_sixteen(self, cpus: int, expected: int) -> None:
        assert readers.rule(cpus) == expected

    @pytest.mark.parametrize(("affinity", "quota", "usable"), [
        (2, None, 2),  # this VM: no quota
        (128, 8.0, 8),  # a container on a big host: every core visible, 8 CPUs of quota
        (128, 1.5, 2),  # a fractional quota rounds up (a reader mostly waits on the disk)
        (4, 32.0, 4),  # pinned to 4 cores: the quota cannot add any
        (64, 0.5, 1),
    ])
    def test_usable_cpus_are_the_smaller_of_affinity_and_quota(self, affinity: int, quota: float | None,
                                                               usable: int) -> None:
        assert Cpus(affinity, quota).usable == usable

    def test_the_host_decides_when_nothing_is_set(self) -> None:
        chosen = readers.choose(None, Cpus(affinity=128, quota=24.0))  # a GPU host's container
        assert chosen.count == 16
        assert chosen.source == ("auto: 24 CPUs usable (affinity 128, cgroup CPU quota 24); 4 a CPU, at most 16")
        assert readers.choose(None, Cpus(affinity=2)).count == 8  # this VM
        assert readers.choose(None, Cpus(affinity=64, quota=0.5)).count == 4  # half a CPU: one counted

    def test_the_setting_overrides_the_rule(self) -> None:
        chosen = readers.choose(32, Cpus(affinity=2))  # beyond the rule's ceiling, on a 2-CPU host: as asked
        assert (chosen.count, chosen.source) == (32, "READAHEAD_READERS=32")
        assert readers.choose(1, Cpus(affinity=64)).count == 1


def cgroup(root: Path, relative: str, files: dict[str, str]) -> None:
    folder = root / relative
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


class TestCgroupQuota:
    def test_v2_cpu_max_along_the_path_the_smallest(self, tmp_path: Path) -> None:
        proc = tmp_path / "proc-cgroup"
        proc.write_text("0::/kubepods/pod1/worker\n")
        root = tmp_path / "cgroup"
        cgroup(root, "", {"cpu.max": "max 100000\n"})
        cgroup(root, "kubepods/pod1", {"cpu.max": "800000 100000\n"})  # 8 CPUs for the pod
        cgroup(root, "kubepods/pod1/worker", {"cpu.max": "1200000 100000\n"})  # 12 asked below: the pod's 8 bind
        assert readers.cgroup_quota(root, proc) == 8.0

    def test_v2_without_a_limit_is_none(self, tmp_path: Path) -> None:
        proc = tmp_path / "proc-cgroup"
        proc.write_text("0::/\n")
        cgroup(tmp_path / "cgroup", "", {"cpu.max": "max 100000\n"})
        assert readers.cgroup_quota(tmp_path / "cgroup", proc) is None

    def test_v1_quota_over_period_in_the_containers_own_root(self, tmp_path: Path) -> None:
        """Inside a container without its own cgroup namespace /proc/self/cgroup names the host's path, which
        does not exist under the container's mount: the mount's root itself holds the container's quota."""
        proc = tmp_path / "proc-cgroup"
        proc.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n")
        root = tmp_path / "cgroup"
        cgroup(root, "cpu,cpuacct", {"cpu.cfs_quota_us": "250000\n", "cpu.cfs_period_us": "100000\n"})
        assert readers.cgroup_quota(root, proc) == 2.5
        assert readers.host_cpus(root, proc).quota == 2.5

    def test_v1_unlimited_and_unreadable_are_none(self, tmp_path: Path) -> None:
        proc = tmp_path / "proc-cgroup"
        proc.write_text("4:cpu,cpuacct:/\n")
        root = tmp_path / "cgroup"
        cgroup(root, "cpu", {"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n"})
        assert readers.cgroup_quota(root, proc) is None
        assert readers.cgroup_quota(tmp_path / "nowhere", tmp_path / "no-proc-file") is None
        cgroup(root, "", {"cpu.max": "garbage\n"})
        proc.write_text("0::/\n")
        assert readers.cgroup_quota(root, proc) is None  # unreadable counts as no limit, never an error


class TestSetting:
    def test_auto_by_default_and_blank(self) -> None:
        assert Settings.from_env({}).readahead_readers is None
        assert Settings.from_env({"READAHEAD_READERS": " AUTO "}).readahead_readers is None
        assert Settings.from_env({"READAHEAD_READERS": " "}).readahead_readers is None

    @pytest.mark.parametrize("value", ["1", "8", str(MAX_READAHEAD_READERS)])
    def test_a_count(self, value: str) -> None:
        assert Settings.from_env({"READAHEAD_READERS": value}).readahead_readers == int(value)

    @pytest.mark.parametrize("value", ["0", "-2", str(MAX_READAHEAD_READERS + 1), "2.5", "many"])
    def test_a_bad_value_names_the_setting_and_what_is_allowed(self, value: str) -> None:
        with pytest.raises(SettingsError) as caught:
            Settings.from_env({"READAHEAD_READERS": value})
        assert str(caught.value) == (f"READAHEAD_READERS: must be auto (4 readers a CPU, at most 16) or a whole "
                                     f"number from 1 to {MAX_READAHEAD_READERS} (got {value!r})")

    def test_documented_and_left_off_the_hub_form(self) -> None:
        assert SETTINGS["READAHEAD_READERS"][0] == "auto" and "READAHEAD_READERS" in HOST_TUNING


class TestStart:
    @pytest.fixture
    def weights(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        path = tmp_path / "transformer" / "model.safetensors"
        path.parent.mkdir()
        path.write_bytes(b"w" * (3 * 1024 * 1024 + 5))
        monkeypatch.setattr(readahead, "load_order", lambda settings: [("transformer", path)])
        return path

    def wait(self, reader: readahead.ReadAhead) -> None:
        import threading

        for _ in range(200):
            if reader.seconds is not None:
                return
            threading.Event().wait(0.05)

    def test_the_override_runs_that_many_and_the_log_says_why(self, weights: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO, logger=readahead.__name__)
        reader = readahead.start_for(Settings.from_env({"READAHEAD_READERS": "3"}))
        assert reader is not None and reader.threads == 3
        self.wait(reader)
        assert reader.read_bytes == weights.stat().st_size
        assert "3 readers (READAHEAD_READERS=3)" in caplog.text

    def test_auto_follows_the_host(self, weights: Path, monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO, logger=readahead.__name__)
        monkeypatch.setattr(readers, "host_cpus", lambda: Cpus(affinity=96, quota=3.0))
        reader = readahead.start_for(Settings.from_env({}))
        assert reader is not None and reader.threads == 12
        self.wait(reader)
        assert "12 readers (auto: 3 CPUs usable (affinity 96, cgroup CPU quota 3); 4 a CPU, at most 16)" in caplog.text

    def test_a_read_ahead_that_cannot_start_leaves_the_load_alone(self, weights: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
        """Before, a file gone between the listing and the start raised out of start_for and failed the load."""
        weights.unlink()
        assert readahead.start_for(Settings.from_env({"READAHEAD_READERS": "2"})) is None
        assert "read-ahead not started (FileNotFoundError" in caplog.text
