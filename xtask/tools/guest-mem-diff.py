#!/usr/bin/env python3
"""Which guest pages does a command make non-zero? immp's own cost in a migration is the
memory it leaves non-zero (a freed page keeps its bytes; QEMU sends a zero page as a few
bytes), so this measures it directly instead of through a migration's noise.

Boots the lab's Debian 6.1 guest (idle + the lab's service, no writer) with the initrd the
last `cargo xtask bench migrate` built (run one first, e.g. `--only idle/auto --repeats 1`),
dumps guest RAM with QMP `pmemsave` 20 s apart (the baseline), starts the command in the guest
through qemu-ga, dumps again 20 s later, and prints how many pages became non-zero, changed
or became zero, and /proc/meminfo's change. Dumps go to /work/exp (1.5 GiB).

    python3 xtask/tools/guest-mem-diff.py /bin/immp throttle --auto --bandwidth 100Mbit

Session 9: immp throttle --auto left +3.4 MiB non-zero (--no-shmem: +0.9), +1.1 MiB once the
shmem check's verifier walk was cut from 61,000 to 15,500 instructions."""
import glob, json, os, socket, subprocess, sys, time
VM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "target", "vm")
# The lab boots the newest non-cloud 6.1 kernel it fetched (its initrd carries its modules).
KERNEL = [k for k in sorted(glob.glob(f"{VM}/kernel/6.1.*-amd64/boot/vmlinuz-*")) if "cloud" not in k][-1]
INITRD = f"{VM}/initrd-lab-6.1.gz"
Q, G, LOG = "/tmp/exp.qmp", "/tmp/exp.qga", "/tmp/exp.serial"
PAGE = 4096

def boot():
    for f in (Q, G, LOG):
        if os.path.exists(f): os.remove(f)
    words = "console=ttyS0 quiet panic=-1 immp.lab=run IMMP_LAB_SERVICE=200 IMMP_LAB_POLICY=none IMMP_LAB_WARM=1 IMMP_LAB_SETTLE=1"
    return subprocess.Popen(["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-smp", "1", "-nographic", "-no-reboot",
        "-kernel", KERNEL, "-initrd", INITRD, "-append", words, "-qmp", f"unix:{Q},server=on,wait=off",
        "-serial", f"file:{LOG}", "-monitor", "none", "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=qga0,path={G},server=on,wait=off",
        "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

class Chan:
    def __init__(self, path, qmp):
        self.s = socket.socket(socket.AF_UNIX); self.s.connect(path); self.f = self.s.makefile("rwb")
        if qmp:
            self.f.readline(); self.cmd("qmp_capabilities")
    def cmd(self, ex, **args):
        self.f.write(json.dumps({"execute": ex, "arguments": args}).encode() + b"\n"); self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r or "error" in r: return r

def wait_log(s, t=300):
    end = time.time() + t
    while time.time() < end:
        if os.path.exists(LOG) and s in open(LOG, errors="replace").read(): return
        time.sleep(1)
    raise SystemExit(f"no {s}")

def run(g, argv):
    import base64
    pid = g.cmd("guest-exec", path=argv[0], arg=argv[1:], **{"capture-output": True})["return"]["pid"]
    for _ in range(50):
        r = g.cmd("guest-exec-status", pid=pid)["return"]
        if r.get("exited"): return base64.b64decode(r.get("out-data", "")).decode()
        time.sleep(0.2)
    return ""

def meminfo(g):
    return {l.split(":")[0]: int(l.split()[1]) for l in run(g, ["/bin/cat", "/proc/meminfo"]).splitlines()}

def diff(a, b):
    return " ".join(f"{k}{b[k]-a[k]:+d}" for k in a if abs(b[k]-a[k]) >= 64)

def dump(q, name):
    os.makedirs("/work/exp", exist_ok=True)
    path = f"/work/exp/{name}.bin"
    q.cmd("stop"); q.cmd("pmemsave", val=0, size=512 << 20, filename=path); q.cmd("cont")
    return path

def pages(path):
    d = open(path, "rb").read()
    return [d[i:i + PAGE] for i in range(0, len(d), PAGE)]

Z = bytes(PAGE)
def compare(a, b):
    pa, pb = pages(a), pages(b)
    nz_a = sum(p != Z for p in pa); nz_b = sum(p != Z for p in pb)
    became = sum(x == Z and y != Z for x, y in zip(pa, pb))
    changed = sum(x != y and y != Z for x, y in zip(pa, pb))
    zeroed = sum(x != Z and y == Z for x, y in zip(pa, pb))
    return f"non-zero {nz_a * 4 / 1024:.1f} -> {nz_b * 4 / 1024:.1f} MiB; zero->non-zero {became * 4 / 1024:.2f} MiB; changed (non-zero after) {changed * 4 / 1024:.2f} MiB; ->zero {zeroed * 4 / 1024:.2f} MiB"

if __name__ == "__main__":
    argv = sys.argv[1:]  # command to run in the guest
    vm = boot()
    try:
        wait_log("IMMP-QGA"); wait_log("IMMP-LAB-READY")
        q = Chan(Q, True)
        time.sleep(5)
        m0 = dump(q, "m0"); time.sleep(20); m1 = dump(q, "m1")
        print("baseline 20 s:", compare(m0, m1), flush=True)
        g = Chan(G, False)
        mi1 = meminfo(g)
        if argv:
            print(g.cmd("guest-exec", path=argv[0], arg=argv[1:], env=["IMMP_JOURNAL_DIR=/tmp/journal", "PATH=/bin"], **{"capture-output": False}), flush=True)
        time.sleep(20); m2 = dump(q, "m2")
        print("with command 20 s:", compare(m1, m2), flush=True)
        print("meminfo kB:", diff(mi1, meminfo(g)), flush=True)
    finally:
        vm.kill()
