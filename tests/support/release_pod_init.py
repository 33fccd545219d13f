"""A pod's container start, as a container runtime does it (run as root by the release harness).

Started inside the pod's own network namespace (nsenter) and fresh mount, PID and UTS
namespaces (unshare), it lays out the container's filesystem view and then becomes the
container's process:

1. the image: the project's virtual environment at the Dockerfile's path, read-only; a
   private parent folder the interpreter lives under is replaced by a view that shows only it;
2. the root filesystem read-only (every mount but /proc, /sys and /dev), when asked;
3. the pod's volumes at their mount paths (bind mounts, tmpfs for memory-backed emptyDirs),
   each read-only or writable as rendered;
4. the pod's /etc/hosts, /etc/resolv.conf and hostname, a private /dev/shm;
5. the working directory, then the container's uid, gid and groups with no capabilities and
   no privilege escalation (setpriv), and exec of the command with exactly its environment.

Argument: the path of a JSON spec written by tests/support/release_harness.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

SKIP_PREFIXES = ("/proc", "/sys", "/dev")
SOURCES: dict[str, int] = {}


def run(*cmd: str, pass_fds: tuple[int, ...] = ()) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, pass_fds=pass_fds, check=False)
    if done.returncode != 0:
        sys.stderr.write(f"pod init: {' '.join(cmd)} failed: {done.stderr.strip()}\n")
        sys.exit(120)


def mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            points.append(point)
    return points


def bind(src: str, dst: str, read_only: bool) -> None:
    # Through a descriptor opened before any mount: a source may live under a path (/tmp, say)
    # that an earlier mount of this pod now hides.
    fd = SOURCES[src]
    run("mount", "--no-canonicalize", "--bind", f"/proc/self/fd/{fd}", dst, pass_fds=(fd,))
    # A bind mount keeps its source's flags: say which ones this mount has.
    run("mount", "-o", f"remount,bind,{'ro' if read_only else 'rw'}", dst)


def reveal(private_parent: str, child: str) -> None:
    """Shadow `private_parent` (e.g. /root, mode 0700) with an empty world-readable tmpfs that
    holds only `child`, so the container user can reach the interpreter and nothing else."""
    fd = os.open(child, os.O_PATH)
    run("mount", "-t", "tmpfs", "-o", "mode=0755,size=1m", "tmpfs", private_parent)
    os.makedirs(child, exist_ok=True)
    run("mount", "--no-canonicalize", "--bind", f"/proc/self/fd/{fd}", child, pass_fds=(fd,))
    run("mount", "-o", "remount,bind,ro", child)
    os.close(fd)


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    for src in [m["src"] for m in spec["image"] + spec["mounts"] if "src" in m] + [spec["hosts"], spec["resolv_conf"],
                                                                                   *spec["reveal_after"]]:
        SOURCES[src] = os.open(src, os.O_PATH)
    socket.sethostname(spec["hostname"])
    for parent, child in spec["reveal"]:
        reveal(parent, child)
    for path in spec["mkdirs"]:
        os.makedirs(path, exist_ok=True)
    for path in spec["mkfiles"]:
        if not os.path.exists(path):
            open(path, "a").close()
    for image_mount in spec["image"]:
        bind(image_mount["src"], image_mount["dst"], True)
    if spec["read_only_root"]:
        for point in mount_points():
            if point.startswith(SKIP_PREFIXES) or point.startswith("/run/netns"):
                continue
            run("mount", "-o", "remount,bind,ro", point)
    for m in spec["mounts"]:
        if m["kind"] == "tmpfs":
            run("mount", "-t", "tmpfs", "-o", f"size={m['size']},mode=1777", "tmpfs", m["dst"])
        else:
            bind(m["src"], m["dst"], m["ro"])
    for path in spec["reveal_after"]:
        os.makedirs(path, exist_ok=True)
        bind(path, path, True)
    bind(spec["hosts"], "/etc/hosts", True)
    bind(spec["resolv_conf"], "/etc/resolv.conf", True)
    if not spec["own_shm"]:
        # Every pod has its own /dev/shm (64 MiB, the runtime's default).
        run("mount", "-t", "tmpfs", "-o", "size=64m,mode=1777,nosuid,nodev", "shm", "/dev/shm")
    os.chdir(spec["cwd"])
    setpriv = [
        "/usr/bin/setpriv",
        f"--reuid={spec['uid']}",
        f"--regid={spec['gid']}",
        f"--groups={','.join(str(g) for g in spec['groups'])}" if spec["groups"] else "--clear-groups",
        "--inh-caps=-all",
    ]
    if spec["drop_all_caps"]:
        setpriv.append("--bounding-set=-all")
    if spec["no_new_privs"]:
        setpriv.append("--no-new-privs")
    os.execve(setpriv[0], [*setpriv, "--", *spec["argv"]], spec["env"])


if __name__ == "__main__":
    main(sys.argv[1])
