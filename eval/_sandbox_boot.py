"""Inside the namespaces that `unshare` made (still root there): lock the filesystem, drop to an unprivileged uid, exec.

Run by eval/sandbox.py as `unshare --net --mount --pid --fork --kill-child --mount-proc python -I _sandbox_boot.py`,
with a JSON job on stdin: {"code", "uid", "limits": {...}}. Kept free of package imports so it starts fast.
"""

import ctypes
import json
import os
import resource
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 1, 2, 4, 32, 4096
# Kernel pseudo-filesystems: remounting them read-only is pointless (or breaks /dev/null), and the dropped uid
# cannot write anything harmful there.
SKIP_FSTYPES = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "mqueue", "securityfs", "debugfs", "bpf"}

libc = ctypes.CDLL(None, use_errno=True)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def mount_points() -> list[tuple[str, str]]:
    """(mount point, fstype) of this mount namespace, from /proc/self/mountinfo (octal escapes decoded)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            point = left.split()[4].encode().decode("unicode_escape")
            out.append((point, right.split()[0]))
    return out


def main() -> None:
    job = json.load(sys.stdin)
    limits = job["limits"]
    # 1. Every real filesystem read-only, in this namespace only (unshare made the mounts private).
    for point, fstype in mount_points():
        if fstype in SKIP_FSTYPES or point.startswith(("/proc", "/sys")):
            continue
        try:
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        except OSError:
            pass  # a mount point shadowed by a later mount can't be reached: nothing to protect there
    # 2. The one writable place: a fresh size-capped tmpfs on /tmp, dying with the namespace. /tmp itself stays
    # root-owned; the program gets /tmp/scratch. The interpreter's prefix is bind-mounted (read-only) to /tmp/python
    # because it may live where the dropped uid can't reach (pyenv under /root, mode 700).
    uid = job["uid"]
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={limits['scratch_bytes']},mode=0755")
    os.makedirs("/tmp/python")
    mount(sys.base_prefix, "/tmp/python", None, MS_BIND)
    mount(None, "/tmp/python", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    # The base interpreter, not a virtual environment's (which may itself live under the /tmp hidden above): the
    # program runs with -I and needs only the standard library.
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    python = "/tmp/python/" + os.path.relpath(base, os.path.realpath(sys.base_prefix))
    os.mkdir("/tmp/scratch", 0o700)
    os.chown("/tmp/scratch", uid, uid)
    os.chdir("/tmp/scratch")
    with open("program.py", "w") as f:
        f.write(job["code"])
    os.chown("program.py", uid, uid)
    # 3. Limits, then the uid drop: as root RLIMIT_NPROC is not enforced, so the fork-bomb guard needs the new uid.
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["max_file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp/scratch", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    os.execve(python, [python, "-I", "program.py"], env)


if __name__ == "__main__":
    main()
