"""Backups to object storage (issue 14): compression, upload and restore throughput, memory, against
baselines measured in the same run.

    python benchmarks/remote_backup.py [--entries 300000] [--groups 4] [--snapshot-mib 32]
                                       [--levels none,1,3,6,9] [--level-sample-mib 16] [--rounds 3] [--quick]

Builds a store that looks like a Raft node's (fsync OFF while building): ``--groups`` groups holding
``--entries`` log entries in all, each a JSON key/value command of 100-300 B (puts, increments and
deletes on skewed keys, with client ids, request numbers and timestamps), and per group one DURABLE
snapshot of ``--snapshot-mib`` MiB of state-machine bytes (a sorted key -> JSON value dump of the same
key space). Then, with the store reopened in FULL mode and an S3 endpoint on loopback (moto's server,
started and stopped here, objects removed after every call):

* **compression**: raw size (the database files' bytes) and stored size (the objects) of one backup, per
  file, and zstd's ratio on the payload bytes alone (the content without SQLite's pages around it);
* **upload**: ``HotBackupManager(store, url).backup()`` to ``s3://`` and ``file://`` (zstd, the default,
  and ``compression="none"``) in MB/s of raw database bytes, against a plain fsspec copy of the same bytes
  (a local backup folder's ``raft.db`` and ``chunks.db``) to the same place: ``fs.put_file`` on S3;
  on file:// ``LocalFileSystem.put_file`` (``shutil.copyfile``) + fsync of each copy;
* **restore**: ``restore(url, data_dir)`` from the s3:// and file:// backups, in MB/s of raw bytes, against
  a plain download of the same raw bytes (``fs.get_file`` + fsync; on file:// the same copyfile + fsync
  row as above), and for context on S3 the plain download of the backup's own ``.zst`` objects and a
  sequential ``fs.open(..., "rb", block_size=8 MiB)`` read of them (restore's read pattern, nothing
  written);
* **compression levels**: ``objectstore.ObjectSink`` (what ``backup()`` streams into) at each of
  ``--levels`` to file://, fed ``--level-sample-mib`` MiB of the raw bytes (the start of each file, in
  proportion to its size) the way the backup's VFS feeds it, one write per database page (4 KiB for
  raft.db, 64 KiB for chunks.db), and once more at the default level in 64 KiB writes (what one call per
  page costs): ratio and MB/s (``HotBackupManager`` itself offers zstd at the default level or ``"none"``);
* **memory**: the peak RSS growth of a fresh process (``/proc/self/status`` VmHWM after resetting it through
  ``/proc/self/clear_refs``, minus VmRSS before; the S3 client, zstandard and the store already loaded)
  during one backup of the whole store, and the growth of SQLite's own allocations over the same call
  (``SQLITE_STATUS_MEMORY_USED`` high-water, mostly page caches): to a local folder (the same SQLite
  source connections, no stream), to s3:// with zstd and with ``"none"`` (moto uploads slower than the
  copy produces, so the upload queue stays full), to file://, and a plain ``fs.put_file`` of the same
  files to S3 for contrast.

Every throughput row is measured by the shared round runner (_common.run_rounds: one untimed warm-up per
row, ``--rounds`` interleaved rounds with the order rotating, medians; ratios are ratios of medians), and
records the CPU time of this process and of the moto server during the call (in cores: CPU seconds per
second), which tells whether the endpoint is the bottleneck. The source store and the local files are
read as the build left them in the page cache (warm; every row sees the same state).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import apsw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Row, fsync_path, md_table, print_rounds, print_table, run_rounds, workdir  # noqa: E402

from raft_sqlite import FsyncMode, LogEntry, NodeStore, objectstore  # noqa: E402
from raft_sqlite.backup import HotBackupManager, restore  # noqa: E402

MiB = 1 << 20
BUCKET = "raft-sqlite-bench"
FILES = ("raft.db", "chunks.db")


# ---------------------------------------------------------------------------------------- the S3 endpoint
class Moto:
    """moto's S3 server on 127.0.0.1 (a child process), with the standard AWS_* variables pointing at it
    for the duration of the ``with`` block (restored afterwards; fsspec's S3 instances are dropped)."""

    ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
           "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")

    def __init__(self, scratch):
        self.scratch = scratch

    def __enter__(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    self.proc.wait()
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.05)
        self.saved = {k: os.environ.get(k) for k in self.ENV}
        none = os.path.join(self.scratch, "no-aws-config")
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.url,
                           "AWS_SHARED_CREDENTIALS_FILE": none, "AWS_CONFIG_FILE": none})
        import s3fs
        s3fs.S3FileSystem.clear_instance_cache()
        self.fs = s3fs.S3FileSystem()
        self.fs.mkdir(BUCKET)
        return self

    def cpu(self):
        """CPU seconds (user + system) the server has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc):
        import s3fs
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------------------- realistic data
_TEXT = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu pending shipped paid refunded cancelled gift "
         "wrap express standard pickup locker fragile signature weekend evening morning checkout cart invoice "
         "session profile warehouse north south backorder")
WORDS = _TEXT.split()
REGIONS = ("eu-west-1", "us-east-1", "ap-south-1", "sa-east-1")
STATUS = ("pending", "paid", "packed", "shipped", "delivered", "refunded", "cancelled")


def _notes(rng, n):
    return [" ".join(rng.choices(WORDS, k=rng.randrange(0, 14))) for _ in range(n)]


def commands(seed, count, keys):
    """``count`` Raft command payloads of an order-tracking key/value state machine, as JSON (100-300 B):
    70% puts of a JSON value, 20% increments, 10% deletes, on keys drawn with a skew (a hot set gets most
    writes), 64 clients with their request numbers, timestamps a few hundred microseconds apart."""
    rng = random.Random(seed)
    notes = _notes(rng, 1 << 15)
    gaps = [rng.expovariate(2000) for _ in range(4096)]
    out = []
    ts = 1_733_140_000.0
    for i in range(count):
        r = rng.getrandbits(64)
        ts += gaps[r & 4095]
        k = int(keys * rng.random() ** 3)
        key = f"orders/{REGIONS[k & 3]}/{k:09d}"
        client = f"c-{(r >> 12) & 63:04d}"
        x = (r >> 18) % 10
        if x < 7:
            price = 100 + (r >> 22) % 99900
            out.append(f'{{"op":"put","key":"{key}","value":{{"status":"{STATUS[(r >> 39) % 7]}",'
                       f'"qty":{1 + (r >> 42) % 19},"price":"{price // 100}.{price % 100:02d}",'
                       f'"sku":"SKU-{(r >> 47) % 5000:05d}","note":"{notes[rng.getrandbits(15)]}"}},'
                       f'"client":"{client}","req":{i + 1},"ts":{ts:.3f}}}'.encode())
        elif x < 9:
            out.append(f'{{"op":"incr","key":"{key}/views","by":{1 + (r >> 22) % 4},"client":"{client}",'
                       f'"req":{i + 1},"ts":{ts:.3f}}}'.encode())
        else:
            out.append(f'{{"op":"del","key":"{key}","client":"{client}","req":{i + 1},"ts":{ts:.3f}}}'.encode())
    return out


def state_machine(seed, size):
    """``size`` bytes of a state-machine snapshot of the same key space: one ``key<TAB>json value`` line per
    live key, in key order (what a key/value state machine's dump looks like)."""
    rng = random.Random(seed)
    notes = _notes(rng, 1 << 15)
    views = [int(rng.paretovariate(1.2)) for _ in range(4096)]
    parts, n, k = [], 0, 0
    while n < size:
        r = rng.getrandbits(64)
        k += 1 + (r & 1) + ((r >> 1) & 1)
        price = 100 + (r >> 2) % 99900
        line = (f'orders/{REGIONS[k & 3]}/{k:09d}\t{{"status":"{STATUS[(r >> 19) % 7]}","qty":{1 + (r >> 22) % 19},'
                f'"price":"{price // 100}.{price % 100:02d}","sku":"SKU-{(r >> 27) % 5000:05d}",'
                f'"views":{views[(r >> 40) & 4095]},"updated":{1_733_000_000 + ((r >> 52) * 34) % 140_000},'
                f'"note":"{notes[rng.getrandbits(15)]}"}}\n').encode()
        parts.append(line)
        n += len(line)
    return b"".join(parts)[:size]


def build(path, groups, entries, snapshot_mib):
    """Fill a store: ``entries`` commands over ``groups`` groups, commit index at the end, one snapshot of
    ``snapshot_mib`` MiB per group at the middle of its log. Returns facts about the content, with the
    zstd (level 3) ratio of the payload bytes alone."""
    import zstandard
    per_group = max(2, entries // groups)
    zc = zstandard.ZstdCompressor(level=objectstore.ZSTD_LEVEL)
    payload = payload_z = snap = snap_z = 0
    lo, hi = 1 << 30, 0
    with NodeStore.open(path, "bench", cluster_id="bench", fsync=FsyncMode.OFF) as s:
        for g in range(groups):
            name = f"g{g}"
            cmds = commands(g, per_group, 400_000)
            lg = s.log(name)
            for i in range(0, per_group, 1000):
                lg.append([LogEntry(j + 1, 1, cmds[j]) for j in range(i, min(per_group, i + 1000))])
            blob = b"".join(cmds)
            payload += len(blob)
            payload_z += len(zc.compress(blob))
            lo, hi = min(lo, *map(len, cmds)), max(hi, *map(len, cmds))
            s.metadata(name).set_commit_index(per_group)
            data = state_machine(1000 + g, snapshot_mib * MiB)
            with s.snapshots(name).write(per_group // 2, 1) as w:
                for off in range(0, len(data), MiB):
                    w.write(data[off:off + MiB])
            snap += len(data)
            snap_z += len(zc.compress(data))
    return {"per_group": per_group, "payload": payload, "payload_z": payload_z, "min": lo, "max": hi,
            "snap": snap, "snap_z": snap_z}


# ---------------------------------------------------------------------------------------- measuring
class Usage:
    """Wall time, this process's CPU time and the moto server's CPU time over a block."""

    def __init__(self, moto):
        self.moto = moto

    def __enter__(self):
        r = resource.getrusage(resource.RUSAGE_SELF)
        self.c0, self.m0, self.t0 = r.ru_utime + r.ru_stime, self.moto.cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0
        r = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu = (r.ru_utime + r.ru_stime - self.c0) / self.s
        self.moto_cpu = (self.moto.cpu() - self.m0) / self.s

    def figures(self, raw, wire):
        """``mbps`` (raw database MB per second), ``wire`` (MB/s of bytes stored or moved), ``cpu`` and
        ``moto`` (cores), ``s``."""
        return {"mbps": raw / self.s / 1e6, "wire": wire / self.s / 1e6, "cpu": self.cpu, "moto": self.moto_cpu,
                "s": self.s}


def stored(info):
    return sum(f["object_size"] for f in info.manifest["files"])


# ---------------------------------------------------------------------------------------- memory probes
def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class _RssSampler(threading.Thread):
    """The largest VmRSS seen every 2 ms (the fallback where VmHWM cannot be reset)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.max = _status_kib("VmRSS")
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.002):
            self.max = max(self.max, _status_kib("VmRSS"))


def rss_probe(kind, data_dir, dest, raw_files):
    """Run in a fresh process (``--rss-probe``): one backup (or plain upload) with everything it needs
    loaded first; prints its peak RSS growth as JSON."""
    import s3fs
    import zstandard  # noqa: F401 - loaded before the measurement, as in a long-running node
    fs = s3fs.S3FileSystem()
    fs.ls(BUCKET)  # the S3 client and its service model, loaded once per process
    with NodeStore.open(data_dir, "bench", cluster_id="bench", fsync=FsyncMode.FULL) as s:
        op = None
        if kind == "put_file":
            def op():
                for f in raw_files:
                    fs.put_file(f, f"{dest}/{os.path.basename(f)}")
        else:
            comp = "none" if kind.endswith("-none") else "zstd"
            mgr = HotBackupManager(s, dest, compression=comp) if kind != "folder" else HotBackupManager(s, dest)
            mgr.list()
            op = mgr.backup
        gc.collect()
        sampler = _RssSampler()
        sampler.start()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            hwm = True
        except OSError:
            hwm = False
        rss0 = _status_kib("VmRSS")
        sql0 = apsw.status(apsw.SQLITE_STATUS_MEMORY_USED, True)[0]  # resets SQLite's high-water mark
        t0 = time.perf_counter()
        op()
        dt = time.perf_counter() - t0
        sql_peak = apsw.status(apsw.SQLITE_STATUS_MEMORY_USED)[1]
        sampler.stop.set()
        sampler.join()
        peak = _status_kib("VmHWM") if hwm else sampler.max
    print(json.dumps({"growth_mib": (peak - rss0) / 1024, "sampled_mib": (sampler.max - rss0) / 1024,
                      "sqlite_mib": (sql_peak - sql0) / MiB, "rss0_mib": rss0 / 1024, "s": dt, "hwm": hwm}))


def run_probe(script, kind, data_dir, dest, raw_files):
    out = subprocess.run([sys.executable, script, "--rss-probe", kind, "--probe-dir", data_dir, "--probe-dest", dest,
                          "--probe-files", ",".join(raw_files)],
                         capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- main
def main(argv=None):
    """Run the benchmark; prints per-round values and the tables; returns the README markdown."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=300_000, help="log entries in all groups together")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--snapshot-mib", type=int, default=32, help="state-machine snapshot per group")
    ap.add_argument("--levels", default="none,1,3,6,9", help="ObjectSink compression levels to compare")
    ap.add_argument("--level-sample-mib", type=int, default=16, help="raw bytes fed to each level row")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row; the median is kept")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20,000 entries, 2 MiB snapshots, 1 round")
    ap.add_argument("--rss-probe", help=argparse.SUPPRESS)
    ap.add_argument("--probe-dir", help=argparse.SUPPRESS)
    ap.add_argument("--probe-dest", help=argparse.SUPPRESS)
    ap.add_argument("--probe-files", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.rss_probe:
        rss_probe(a.rss_probe, a.probe_dir, a.probe_dest, a.probe_files.split(","))
        return ""
    if a.quick:
        a.entries, a.snapshot_mib, a.level_sample_mib, a.rounds, a.levels = 20_000, 2, 4, 1, "none,3"
    levels = a.levels.split(",")
    d = workdir()
    try:
        with Moto(d) as moto:
            return run(a, d, moto, levels)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run(a, d, moto, levels):
    fs = moto.fs
    path = os.path.join(d, "node")
    t0 = time.perf_counter()
    facts = build(path, a.groups, a.entries, a.snapshot_mib)
    print(f"built {a.groups} groups x {facts['per_group']:,} entries ({facts['min']}-{facts['max']} B, mean "
          f"{facts['payload'] / (a.groups * facts['per_group']):.0f} B) + {a.groups} snapshots of {a.snapshot_mib} MiB "
          f"in {time.perf_counter() - t0:.1f} s; raft.db {os.path.getsize(os.path.join(path, 'raft.db')) / 1e6:.0f} MB, "
          f"chunks.db {os.path.getsize(os.path.join(path, 'chunks.db')) / 1e6:.0f} MB")
    k = [0]

    def fresh(prefix):
        k[0] += 1
        return os.path.join(d, f"{prefix}{k[0]}")

    with NodeStore.open(path, "bench", cluster_id="bench", fsync=FsyncMode.FULL) as s:
        # the raw bytes: a local backup folder (the database files, as the online backup API copies them)
        local = HotBackupManager(s, os.path.join(d, "local")).backup()
        raw_files = [os.path.join(local.path, n) for n in FILES]
        raw = sum(os.path.getsize(f) for f in raw_files)
        # restore sources, and the raw files on S3 for the plain-download baseline
        src_s3 = HotBackupManager(s, f"s3://{BUCKET}/src").backup()
        src_file = HotBackupManager(s, f"file://{d}/src").backup()
        for f in raw_files:
            fs.put_file(f, f"{BUCKET}/raw/{os.path.basename(f)}")
        zst_objects = [f"{src_s3.path[len('s3://'):]}/{f['object']}" for f in src_s3.manifest["files"]]
        assert src_s3.size == raw == src_file.size, (src_s3.size, raw, src_file.size)
        per_file = {f["name"]: f for f in src_s3.manifest["files"]}

        managers = {(scheme, comp): HotBackupManager(s, root, compression=comp)
                    for scheme, root in (("s3", f"s3://{BUCKET}/up"), ("file", f"file://{d}/up"))
                    for comp in ("zstd", "none")}

        def backup_row(scheme, comp):
            def measure():
                with Usage(moto) as u:
                    info = managers[scheme, comp].backup()
                if scheme == "s3":
                    fs.rm(info.path, recursive=True)
                else:
                    shutil.rmtree(info.path[len("file://"):])
                return {**u.figures(info.size, stored(info)), **{f"phase_{p}": v for p, v in info.phases.items()}}
            return measure

        def s3_put():
            dst = f"{BUCKET}/plain/{k[0]}"
            k[0] += 1
            with Usage(moto) as u:
                for f in raw_files:
                    fs.put_file(f, f"{dst}/{os.path.basename(f)}")
            fs.rm(dst, recursive=True)
            return u.figures(raw, raw)

        lfs = __import__("fsspec").filesystem("file")

        def copy_each(label, copy, sources, nbytes):
            """``copy(src, out)`` of every source into a fresh folder, each copy fsync'ed; the row's figures."""
            dst = fresh(label)
            os.makedirs(dst)
            with Usage(moto) as u:
                for src in sources:
                    out = os.path.join(dst, os.path.basename(src))
                    copy(src, out)
                    fsync_path(out)
            shutil.rmtree(dst)
            return u.figures(raw, nbytes)

        def file_copy():
            return copy_each("plain", lfs.put_file, raw_files, raw)

        def restore_row(url):
            def measure():
                target = fresh("restored")
                done = {}

                def progress(name, n, total):
                    if n == total and name not in done:
                        done[name] = time.perf_counter()
                with Usage(moto) as u:
                    restore(url, target, progress=progress)
                shutil.rmtree(target)
                return {**u.figures(raw, stored(src_s3)), "fetch_s": done["chunks.db"] - u.t0}
            return measure

        def s3_get(objects, nbytes):
            return lambda: copy_each("got", fs.get_file, objects, nbytes)

        def s3_read_seq():
            n = 0
            with Usage(moto) as u:
                for o in zst_objects:
                    with fs.open(o, "rb", block_size=objectstore.PART_SIZE) as f:
                        while b := f.read(MiB):
                            n += len(b)
            assert n == stored(src_s3)
            return u.figures(raw, n)

        raw_objects = [f"{BUCKET}/raw/{n}" for n in FILES]
        rows = [Row("s3: backup() zstd", backup_row("s3", "zstd")),
                Row("s3: backup() none", backup_row("s3", "none")),
                Row("s3: plain fs.put_file", s3_put),
                Row("file: backup() zstd", backup_row("file", "zstd")),
                Row("file: backup() none", backup_row("file", "none")),
                Row("file: plain copy (put_file/get_file + fsync)", file_copy),
                Row("s3: restore()", restore_row(src_s3.path)),
                Row("s3: plain fs.get_file of the raw files", s3_get(raw_objects, raw)),
                Row("s3: plain fs.get_file of the .zst objects", s3_get(zst_objects, stored(src_s3))),
                Row("s3: fs.open('rb') read of the .zst objects", s3_read_seq),
                Row("file: restore()", restore_row(src_file.path))]
        t0 = time.perf_counter()
        res = run_rounds(rows, a.rounds)
        elapsed = time.perf_counter() - t0

        # compression levels: ObjectSink, fed as the backup's VFS feeds it
        pieces = []  # (bytes, the size SQLite writes them in: the file's page size)
        budget = a.level_sample_mib * MiB
        for f in raw_files:
            page = per_file[os.path.basename(f)]["page_size"]
            share = min(os.path.getsize(f), budget * os.path.getsize(f) // raw // page * page)
            with open(f, "rb") as fh:
                pieces.append((fh.read(share), page))
        sample_bytes = sum(len(b) for b, _ in pieces)
        remote = objectstore.Remote(f"file://{d}/levels")
        os.makedirs(remote.root, exist_ok=True)

        def level_row(level, write_size=None):
            def measure():
                obj = f"{remote.root}/sample{k[0]}"
                k[0] += 1
                with Usage(moto) as u:
                    sink = objectstore.ObjectSink(remote, obj, compression="none" if level == "none" else "zstd",
                                                  level=0 if level == "none" else int(level))
                    for data, page in pieces:
                        step = write_size or page
                        for off in range(0, len(data), step):
                            sink.write(data[off:off + step])
                    out = sink.finish()
                os.unlink(obj)
                return {**u.figures(sample_bytes, out["object_size"]), "ratio": sample_bytes / out["object_size"]}
            return measure

        level_rows = [Row(f"level {lv}", level_row(lv)) for lv in levels]
        if str(objectstore.ZSTD_LEVEL) in levels:
            level_rows.append(Row(f"level {objectstore.ZSTD_LEVEL}, 64 KiB writes",
                                  level_row(str(objectstore.ZSTD_LEVEL), 64 << 10)))
        lres = run_rounds(level_rows, a.rounds)
        with contextlib.suppress(Exception):
            fs.rm(f"{BUCKET}/src", recursive=True)

    # memory: fresh processes, the store closed here (each probe opens it)
    script = os.path.abspath(__file__)
    probes = [("folder", os.path.join(d, "mem-local"), "local folder backup (no stream)"),
              ("s3-zstd", f"s3://{BUCKET}/mem", "s3:// backup, zstd"),
              ("s3-none", f"s3://{BUCKET}/mem", "s3:// backup, none (upload slower than the copy: queue full)"),
              ("file-zstd", f"file://{d}/mem", "file:// backup, zstd"),
              ("put_file", f"{BUCKET}/mem-plain", "plain fs.put_file of the same files to s3 (s3fs defaults)")]
    mem = []
    for kind, dest, label in probes:
        r = run_probe(script, kind, path, dest, raw_files)
        mem.append((label, r))
        with contextlib.suppress(Exception):
            fs.rm(f"{BUCKET}/mem", recursive=True)
        with contextlib.suppress(Exception):
            fs.rm(f"{BUCKET}/mem-plain", recursive=True)
        print(f"  memory probe {kind}: {json.dumps(r)}")

    return report(a, facts, raw, per_file, src_s3, rows, res, elapsed, level_rows, lres, sample_bytes, mem)


def report(a, facts, raw, per_file, src_s3, rows, res, elapsed, level_rows, lres, sample_bytes, mem):
    mbps = lambda v: f"{v:,.0f}"  # noqa: E731
    print_rounds(res, [("mbps", "raw MB/s", mbps), ("moto", "moto cores", lambda v: f"{v:.2f}")])
    print_rounds(lres, [("mbps", "raw MB/s", mbps)], title="per-round values, compression levels")
    r = {row.name: res[row.name] for row in rows}
    stored_total = stored(src_s3)

    # 1. compression
    t1 = [[n, f"{f['size'] / 1e6:,.1f}", f"{f['object_size'] / 1e6:,.1f}", f"{f['size'] / f['object_size']:.2f}x"]
          for n, f in per_file.items()]
    t1.append(["**total**", f"{raw / 1e6:,.1f}", f"{stored_total / 1e6:,.1f}", f"**{raw / stored_total:.2f}x**"])
    t1.append([f"(payload bytes alone, zstd -{objectstore.ZSTD_LEVEL}: log entries)", f"{facts['payload'] / 1e6:,.1f}",
               f"{facts['payload_z'] / 1e6:,.1f}", f"{facts['payload'] / facts['payload_z']:.2f}x"])
    t1.append([f"(payload bytes alone, zstd -{objectstore.ZSTD_LEVEL}: snapshots)", f"{facts['snap'] / 1e6:,.1f}",
               f"{facts['snap_z'] / 1e6:,.1f}", f"{facts['snap'] / facts['snap_z']:.2f}x"])
    h1 = ["file", "raw MB", "stored MB", "ratio"]
    print_table("compression of one backup (zstd, the default)", h1, t1)

    # 2. upload, 3. restore
    def line(name, base, label=None):
        x = r[name]
        return [label or name, mbps(x.med("mbps")), f"{x.ratio('mbps', r[base]):.2f}x" if base else "",
                mbps(x.med("wire")), f"{x.med('cpu'):.2f}", f"{x.med('moto'):.2f}" if name.startswith("s3") else "-"]

    h2 = ["", "raw MB/s", "vs plain", "MB/s stored/moved", "CPU cores (this process)", "CPU cores (moto)"]
    s3p, fp, s3g = "s3: plain fs.put_file", "file: plain copy (put_file/get_file + fsync)", \
        "s3: plain fs.get_file of the raw files"
    t2 = [line("s3: backup() zstd", s3p), line("s3: backup() none", s3p), line(s3p, s3p),
          line("file: backup() zstd", fp), line("file: backup() none", fp), line(fp, fp)]
    print_table("upload: backup() vs a plain fsspec copy of the same bytes", h2, t2)
    t3 = [line("s3: restore()", s3g), line(s3g, s3g),
          line("s3: plain fs.get_file of the .zst objects", s3g),
          line("s3: fs.open('rb') read of the .zst objects", s3g, "s3: fs.open('rb') read of the .zst objects "
               "(no write)"),
          line("file: restore()", fp), line(fp, fp, fp + " (baseline)")]
    print_table("restore: restore() vs a plain download of the same raw bytes", h2, t3)
    phases = []
    for name in ("s3: backup() zstd", "s3: backup() none", "file: backup() zstd"):
        x = r[name]
        phases.append(f"{name}: copy {x.med('phase_copy'):.2f} s, finish {x.med('phase_finish'):.2f} s")
    for name in ("s3: restore()", "file: restore()"):
        x = r[name]
        phases.append(f"{name}: {x.med('s'):.2f} s, of which download + decompress + write "
                      f"{x.med('fetch_s'):.2f} s")
    print("\nphases (medians): " + "; ".join(phases))

    # 5. levels
    none = lres.get("level none")
    t5 = []
    for row in level_rows:
        x = lres[row.name]
        lv = row.name[len("level "):]
        t5.append([lv + (" (backup()'s default)" if lv == str(objectstore.ZSTD_LEVEL) else ""),
                   f"{x.med('ratio'):.2f}x", mbps(x.med("mbps")),
                   f"{x.ratio('mbps', none):.2f}x" if none else "", f"{x.med('cpu'):.2f}"])
    h5 = ["zstd level", "ratio", "raw MB/s", "vs none", "CPU cores"]
    title5 = (f"compression levels: objectstore.ObjectSink to file://, {sample_bytes / MiB:.0f} MiB of the raw bytes "
              "written in each file's page size (as the backup's VFS writes them) unless stated")
    print_table(title5, h5, t5)

    # 4. memory
    folder = mem[0][1]
    t4 = []
    for i, (label, m) in enumerate(mem):
        rest = m["growth_mib"] - m["sqlite_mib"]
        t4.append([label, f"{m['growth_mib']:.1f}", f"{m['growth_mib'] - folder['growth_mib']:+.1f}" if i else "",
                   f"{m['sqlite_mib']:.1f}", f"{rest:.1f}", f"{m['s']:.2f}"])
    h4 = ["one call in a fresh process", "peak RSS growth MiB", "vs local folder backup",
          "SQLite's memory high-water growth MiB", "growth minus SQLite's MiB", "s"]
    title4 = f"memory: peak RSS growth during one backup of {raw / 1e6:,.0f} MB ({raw / MiB:,.0f} MiB)"
    print_table(title4, h4, t4)
    worst = max(m["growth_mib"] - m["sqlite_mib"] for _label, m in mem[1:4])
    bound = (f"Design bound of the stream (objectstore): upload queue {objectstore.QUEUE_BYTES / MiB:.0f} MiB + one part "
             f"{objectstore.PART_SIZE / MiB:.0f} MiB + the compressor; the largest growth of a URL backup outside "
             f"SQLite's allocations: {worst:.1f} MiB, for {raw / MiB:,.0f} MiB streamed")
    print(bound)

    md = (f"{a.groups} groups x {facts['per_group']:,} JSON commands ({facts['min']}-{facts['max']} B) + one "
          f"{a.snapshot_mib} MiB state-machine snapshot per group: {raw / 1e6:,.0f} MB of database files; "
          f"S3 = moto's server on loopback; {a.rounds} interleaved rounds after one warm-up per row, medians "
          f"({elapsed:.0f} s); ratios of medians of the same run\n\n"
          f"{md_table(h1, t1)}\n\n{md_table(h2, t2)}\n\n{md_table(h2, t3)}\n\nPhases (medians): "
          + "; ".join(phases) + f"\n\n{title5}:\n\n{md_table(h5, t5)}\n\n{title4}:\n\n{md_table(h4, t4)}\n\n"
          f"{bound}.\n")
    print("\n" + md)
    return md


if __name__ == "__main__":
    main()
