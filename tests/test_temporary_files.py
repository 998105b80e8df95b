"""temporary_files.py: a temporary file names its writer, and only a dead writer's file is removed."""

import os
import subprocess
import sys

from trl_sstoken.saving.temporary_files import _host, _pid_namespace, _start_time, remove_stale, temporary_name


PREFIX = ".example"
# a process that creates its temporary file, prints the name, and exits (or, with "wait", waits for its stdin)
WRITER = (
    "import os, sys\n"
    "from trl_sstoken.saving.temporary_files import temporary_name\n"
    "path = os.path.join(sys.argv[1], temporary_name(sys.argv[2]))\n"
    "open(path, 'wb').write(b'x' * 1000)\n"
    "print(os.path.basename(path), flush=True)\n"
    "if sys.argv[3] == 'wait':\n"
    "    sys.stdin.read()\n"
)


def start_writer(directory, mode):
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory), PREFIX, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_a_dead_writers_file_is_removed_and_a_live_writers_file_kept(tmp_path):
    dead = start_writer(tmp_path, "exit")
    dead_name = dead.stdout.readline().strip()
    assert dead.wait() == 0
    live = start_writer(tmp_path, "wait")
    try:
        live_name = live.stdout.readline().strip()
        own = temporary_name(PREFIX)
        (tmp_path / own).write_bytes(b"mine")
        host, namespace, pid_start, rest = dead_name[len(PREFIX) + 1 :].split(".", 3)
        elsewhere = [  # the dead pid, but written on another host or in another container: maybe alive there
            f"{PREFIX}.other-host.{namespace}.{pid_start}.{rest}",
            f"{PREFIX}.{host}.{int(namespace) + 1}.{pid_start}.{rest}",
        ]
        unrelated = [f"{PREFIX}.notes.txt", f".other.{dead_name[len(PREFIX) + 1 :]}", f"{dead_name}.bak"]
        for name in elsewhere + unrelated:
            (tmp_path / name).write_bytes(b"keep")

        assert remove_stale(str(tmp_path), PREFIX) == [dead_name]
        assert sorted(os.listdir(tmp_path)) == sorted([live_name, own, *elsewhere, *unrelated])
    finally:
        live.kill()
        live.wait()


def test_a_reused_pid_is_told_apart_by_its_start_time(tmp_path):
    pid = os.getpid()
    start = int(_start_time(pid))
    earlier = f"{PREFIX}.{_host()}.{_pid_namespace()}.{pid}-{start - 1}.0123abcd.tmp"  # this pid, another process
    (tmp_path / earlier).write_bytes(b"")
    (tmp_path / temporary_name(PREFIX)).write_bytes(b"")
    assert remove_stale(str(tmp_path), PREFIX) == [earlier]


def test_a_stale_temporary_folder_is_removed(tmp_path):
    dead = start_writer(tmp_path, "exit")
    name = dead.stdout.readline().strip()
    dead.wait()
    os.remove(tmp_path / name)
    (tmp_path / name).mkdir()
    (tmp_path / name / "weights.bin").write_bytes(b"x")
    assert remove_stale(str(tmp_path), PREFIX) == [name] and not os.listdir(tmp_path)


def test_a_missing_directory_is_not_an_error(tmp_path):
    assert remove_stale(str(tmp_path / "absent"), PREFIX) == []
