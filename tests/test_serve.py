"""`raft-sqlite serve`: the read-only browser view of a live node (raft_sqlite.web, Datasette).

The server runs as the real console script in a subprocess on 127.0.0.1 with `--port 0` (the URL is read
from its output) while a NodeStore is open in this process: a live node. Browser tests drive Debian's
headless Chromium by plain subprocess (`--dump-dom`, `--screenshot`); without chromium they skip, unless
RAFT_SQLITE_REQUIRE_BROWSER=1 (CI sets it), which makes a missing browser (or Datasette) a failure.
Write attempts that need no browser (POST) use urllib.

Screenshots for README (docs/screenshots/serve-*.png) are (re)taken only when RAFT_SQLITE_SCREENSHOTS=1 or a
file is missing, so a normal run never changes the tree.
"""

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from click.testing import CliRunner

from raft_sqlite import HotBackupManager, LogEntry, web
from raft_sqlite.cli import EXIT_UNAVAILABLE, cli
from tests.conftest import ROOT, open_store
from tests.test_cli import files_digest

ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), COLUMNS="200")
REQUIRE = os.environ.get("RAFT_SQLITE_REQUIRE_BROWSER") == "1"
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and os.access(p, os.X_OK)), None)
SHOTS = os.path.join(ROOT, "docs", "screenshots")
GROUPS = ("g0", "g1", "g2")
EVIL = b"<script>document.body.dataset.p=1</script><img src=x onerror=document.body.dataset.p=2>"


def utf8_payload(g, i):
    return f'{g} entry {i}: räft ✓ {{"op": "set", "key": "user:{i * 7}", "value": "{"ab" * (i % 9)}"}}'.encode()


def _have_datasette():
    try:
        web.require()
    except web.WebUnavailable:
        return False
    return True


def need_server():
    if not _have_datasette():
        if REQUIRE:
            pytest.fail("Datasette is not installed (pip install '.[web]') and RAFT_SQLITE_REQUIRE_BROWSER=1")
        pytest.skip("Datasette is not installed (pip install '.[web]')")


def need_browser():
    need_server()
    if CHROMIUM is None:
        if REQUIRE:
            pytest.fail("chromium is not installed (apt-get install chromium) and RAFT_SQLITE_REQUIRE_BROWSER=1")
        pytest.skip("chromium is not installed (apt-get install -y chromium); set RAFT_SQLITE_REQUIRE_BROWSER=1 "
                    "to make this a failure")


# ---------------------------------------------------------------------------------------------- helpers
class Server:
    """`raft-sqlite serve DATA_DIR --port 0` in a subprocess; `url` is what it printed."""

    def __init__(self, data_dir, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "raft_sqlite.cli", "serve", str(data_dir), "--port", "0",
                                      *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        self.lines = queue.Queue()
        self.reader = threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout],
                                       daemon=True)
        self.reader.start()
        self.errors = []  # stderr, drained all along (a full pipe would block the server)
        self.err_reader = threading.Thread(target=lambda: self.errors.extend(self.proc.stderr), daemon=True)
        self.err_reader.start()
        self.url = None
        deadline = time.monotonic() + 60
        while self.url is None:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"serve printed no URL in 60 s: {''.join(self.errors)}") from None
            if " at http://" in line:
                self.url = line.split(" at ", 1)[1].split()[0]
        assert self.url.startswith("http://127.0.0.1:"), self.url

    def stop(self):
        """SIGINT (Ctrl-C): a graceful stop, exit 0, no traceback."""
        self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.reader.join(10)
        self.err_reader.join(10)
        err = "".join(self.errors)
        # quiet: no traceback for refused requests; Datasette logs a statement SQLite refused in one line
        assert rc == 0 and "Traceback" not in err and "╭" not in err, (rc, err)
        assert all(line.startswith("ERROR: conn=") and line.endswith("not authorized")
                   for line in err.splitlines() if line.strip()), err
        rest = []
        while not self.lines.empty():
            rest.append(self.lines.get())
        return "".join(rest)


def chromium(url, *args, timeout=90):
    """Run headless Chromium on `url` with `args` (--dump-dom / --screenshot=...); returns stdout (the DOM)."""
    profile = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"raft-sqlite-chromium-{os.getpid()}-{time.monotonic_ns()}")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={profile}", *args, url]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert p.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode("utf-8")


def dom(url):
    return chromium(url, "--dump-dom")


def screenshot(name, url, size="1280,900"):
    """docs/screenshots/NAME.png, taken only when RAFT_SQLITE_SCREENSHOTS=1 or the file is missing."""
    path = os.path.join(SHOTS, name)
    if os.environ.get("RAFT_SQLITE_SCREENSHOTS") != "1" and os.path.exists(path):
        return
    os.makedirs(SHOTS, exist_ok=True)
    chromium(url, f"--screenshot={path}", f"--window-size={size}")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def http(url, data=None, method=None):
    """(status, body) of a request (no browser): errors are answers too."""
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def q(url, path, **params):
    return url + path + ("?" + urllib.parse.urlencode(params) if params else "")


def log_rows(store):
    """Every (group, index, term, payload) the store holds."""
    return [(g, e.index, e.term, bytes(e.data)) for g in store.groups()
            for e in store.log(g).entries(store.log(g).first_index, store.log(g).last_index + 1)]


# ---------------------------------------------------------------------------------------------- the live node
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A node left open in this process (the live node) with a workload in three groups, a snapshot, a
    compaction, a backup and a hostile payload; the server started on it. Yields (store, url, data_dir)."""
    need_server()
    base = tmp_path_factory.mktemp("serve")
    d = base / "node"
    store = open_store(d)
    try:
        for g in GROUPS:
            store.metadata(g).set_term_and_vote(2, "n1")
            store.log(g).append([LogEntry(i, 1 if i <= 20 else 2, utf8_payload(g, i)) for i in range(1, 41)])
            store.metadata(g).set_commit_index(35)
        with store.snapshots("g0").write(30, 2) as w:
            w.write(b"state machine bytes " * 50)
        store.log("g0").compact(30)
        store.log("untrusted").append([LogEntry(1, 1, EVIL)])
        HotBackupManager(store, str(base / "backups")).backup()
        srv = Server(d)
        try:
            yield store, srv.url, d
        finally:
            out = srv.stop()
            assert "stopped" in out
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------- no browser
def test_serve_help_lists_the_options():
    r = CliRunner().invoke(cli, ["serve", "--help"])
    assert r.exit_code == 0
    for opt in ("--host", "--port", "--allow-remote", "127.0.0.1", "read-only"):
        assert opt in r.output


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_non_loopback_host_is_refused_without_allow_remote(tmp_path, host):
    with open_store(tmp_path / "node") as s:
        s.log("g").append([LogEntry(1, 1, b"x")])
    r = CliRunner().invoke(cli, ["serve", str(tmp_path / "node"), "--host", host])
    assert r.exit_code == 2, r.output
    assert "--allow-remote" in r.output and "not a loopback address" in r.output


def test_loopback_hosts():
    assert web.is_loopback("127.0.0.1") and web.is_loopback("localhost") and web.is_loopback("127.3.4.5")
    assert web.is_loopback("::1")
    assert not web.is_loopback("0.0.0.0") and not web.is_loopback("::")
    assert web.check_host("127.0.0.1", False) is False
    assert web.check_host("0.0.0.0", True) is True  # allowed, and reported as remote (the CLI warns)
    with pytest.raises(web.RemoteRefused):
        web.check_host("0.0.0.0", False)


def test_allow_remote_warns(tmp_path, monkeypatch):
    """With --allow-remote a non-loopback host is served after a warning (the server itself is faked here:
    tests listen on loopback only)."""
    with open_store(tmp_path / "node") as s:
        s.log("g").append([LogEntry(1, 1, b"x")])
    called = {}

    def fake_serve(data_dir, *, host, port, title, on_ready, groups):
        called.update(host=host, port=port, title=title, groups=groups)
        on_ready(web.Serving(f"http://{host}:{port}/", ["raft.db"]))

    monkeypatch.setattr(web, "require", lambda: (None, None))
    monkeypatch.setattr(web, "serve", fake_serve)
    r = CliRunner().invoke(cli, ["serve", str(tmp_path / "node"), "--host", "0.0.0.0", "--allow-remote",
                                 "--port", "8123"])
    assert r.exit_code == 0, r.output
    assert "warning" in r.output and "reachable from other machines" in r.output
    assert "read-only at http://0.0.0.0:8123/" in r.output
    assert called == {"host": "0.0.0.0", "port": 8123, "title": "raft_sqlite node n1 (cluster c1)", "groups": {"g": 1}}


def test_missing_datasette_exits_6(tmp_path, monkeypatch):
    with open_store(tmp_path / "node") as s:
        s.log("g").append([LogEntry(1, 1, b"x")])
    for mod in ("datasette", "datasette.app", "uvicorn"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import datasette.app` raises ImportError
    r = CliRunner().invoke(cli, ["serve", str(tmp_path / "node")])
    assert r.exit_code == EXIT_UNAVAILABLE == 6, r.output
    assert "pip install 'raft_sqlite[web]'" in r.output and "Traceback" not in r.output


def test_not_a_store(tmp_path):
    r = CliRunner().invoke(cli, ["serve", str(tmp_path / "nope")])
    assert r.exit_code == 3 and "does not exist" in r.output
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(cli, ["serve", str(tmp_path / "empty")])
    assert r.exit_code == 3 and "not a raft_sqlite data_dir" in r.output


def test_busy_port_is_exit_2_and_sigterm_stops_cleanly(tmp_path):
    need_server()
    d = tmp_path / "node"
    with open_store(d) as s:
        s.log("g").append([LogEntry(1, 1, b"x")])
    srv = Server(d)
    try:
        port = int(srv.url.rsplit(":", 1)[1].strip("/"))
        r = subprocess.run([sys.executable, "-m", "raft_sqlite.cli", "serve", str(d), "--port", str(port)],
                           capture_output=True, text=True, timeout=60, env=ENV)
        assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    finally:
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=30) == 0
        srv.reader.join(10)
    assert "stopped" in "".join(srv.lines.queue)


def test_payload_preview():
    assert web.payload_preview(b"") == "0 B"
    assert web.payload_preview(b"hello") == "5 B | utf-8: hello | hex: 68656c6c6f"
    assert web.payload_preview(b"\x00\xff\xfe") == "3 B | hex: 00fffe"  # not UTF-8: hex only
    assert web.payload_preview(b"a\nb") == "3 B | utf-8: a\\x0ab | hex: 610a62"  # control characters shown
    long = ("é" * 60).encode()  # 120 bytes: the 96-byte cut falls after a whole character here
    p = web.payload_preview(long)
    assert p == "120 B | utf-8: " + "é" * 48 + "… | hex: " + "c3a9" * 16 + "…"
    cut = b"a" + ("é" * 60).encode()  # the 96-byte cut splits a character: it is dropped, not an error
    assert web.payload_preview(cut).startswith("121 B | utf-8: a" + "é" * 47 + "… | hex: 61c3a9")
    assert web.payload_preview(EVIL).startswith(f"{len(EVIL)} B | utf-8: <script>")  # text: escaped by the page


def test_the_authorizer_allows_reading_only():
    import sqlite3

    c = sqlite3.connect(":memory:")
    c.execute("CREATE TABLE t (x)")
    c.execute("INSERT INTO t VALUES (1)")
    c.execute("PRAGMA query_only=1")
    c.set_authorizer(web.authorizer)
    assert c.execute("SELECT x FROM t").fetchall() == [(1,)]
    assert c.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3) "
                     "SELECT count(*) FROM n").fetchall() == [(3,)]
    c.execute("PRAGMA table_info(t)").fetchall()
    for sql in ("INSERT INTO t VALUES (2)", "DELETE FROM t", "UPDATE t SET x = 3", "CREATE TABLE u (y)",
                "DROP TABLE t", "ATTACH ':memory:' AS other", "PRAGMA query_only=0", "PRAGMA journal_mode=DELETE",
                "WITH a AS (SELECT 1) DELETE FROM t"):
        with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
            c.execute(sql)
    assert c.execute("SELECT x FROM t").fetchall() == [(1,)]


def test_post_and_write_sql_refused_over_http(live):
    """No browser needed: every non-GET request is 405; write SQL through ?sql= is refused; nothing changed."""
    store, url, _ = live
    before = log_rows(store)
    for path in ("raft/log_tail", "raft", "raft/log_entries", "-/messages", "-/logout"):
        status, body = http(url + path, data=b"group=g1&sql=DELETE+FROM+log_entries", method="POST")
        assert status == 405 and "read-only" in body, (path, status)
    for method in ("PUT", "DELETE", "PATCH"):
        assert http(url + "raft/log_entries", method=method)[0] == 405
    for sql in ("DELETE FROM log_entries", "WITH a AS (SELECT 1) DELETE FROM log_entries WHERE group_id > 0",
                "UPDATE raft_meta SET commit_index = 0", "DROP VIEW group_status", "PRAGMA wal_checkpoint(TRUNCATE)",
                "VACUUM", "ATTACH 'x.db' AS x"):
        status, body = http(q(url, "raft", sql=sql))
        assert status == 400, (sql, status)
        assert "not authorized" in body or "must be a SELECT" in body or "disallowed PRAGMA" in body, (sql, body)
    assert http(q(url, "raft.json", sql="SELECT count(*) AS n FROM log_entries"))[0] == 200
    assert http(url + "raft.db")[0] in (403, 404)  # no download of the live file
    assert log_rows(store) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/fdinfo")
def test_server_opens_the_database_files_read_only(tmp_path):
    """raft.db and chunks.db are open O_RDONLY in the server (mode=ro). SQLite opens a WAL file read-write
    for any connection, a read-only one too (the `sql` command's as well); it never writes it: no checkpoint
    without write access to the database file (next test)."""
    need_server()
    d = tmp_path / "node"
    with open_store(d) as s:
        s.log("g").append([LogEntry(1, 1, b"x")])
        srv = Server(d)
        try:
            assert http(q(srv.url, "raft/log_tail", group="g"))[0] == 200  # connections are opened lazily
            assert http(srv.url + "chunks/snapshot_chunks")[0] == 200
            modes = {}
            for fd in os.listdir(f"/proc/{srv.proc.pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{srv.proc.pid}/fd/{fd}")
                    with open(f"/proc/{srv.proc.pid}/fdinfo/{fd}") as f:
                        flags = int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
                except (OSError, StopIteration):
                    continue
                if os.path.basename(target) in ("raft.db", "chunks.db"):
                    modes.setdefault(os.path.basename(target), set()).add(flags & os.O_ACCMODE)
        finally:
            srv.stop()
    assert modes == {"raft.db": {os.O_RDONLY}, "chunks.db": {os.O_RDONLY}}, modes


def test_serving_a_stopped_node_changes_no_file(tmp_path):
    """Browsing a stopped node, then stopping the server (the last connection to close), leaves every
    file byte for byte as it was (no checkpoint, no WAL reset, nothing created but the shared-memory index)."""
    need_server()
    d = tmp_path / "node"
    with open_store(d) as s:
        for g in GROUPS:
            s.log(g).append([LogEntry(i, 1, utf8_payload(g, i)) for i in range(1, 41)])
    before = files_digest(d)
    srv = Server(d)
    try:
        for path in ("", "raft", "raft/log_entries", "raft/group_overview", "chunks/snapshot_chunks"):
            assert http(srv.url + path)[0] == 200, path
        assert "g1 entry 40: räft ✓" in http(q(srv.url, "raft/log_tail", group="g1"))[1]
    finally:
        srv.stop()
    assert files_digest(d) == before


# ---------------------------------------------------------------------------------------------- browser
def test_pages_load(live):
    need_browser()
    store, url, _ = live
    page = dom(url)
    assert "raft_sqlite node n1 (cluster c1)" in page and 'href="/raft"' in page and 'href="/chunks"' in page
    page = dom(url + "raft")
    for name in ("log_entries", "groups", "raft_meta", "snapshots", "group_status", "snapshot_chain", "segments",
                 "backup_history", "recovery_log", "group_overview", "log_tail", "snapshot_chains",
                 "recovery_history", "recent_backups"):
        assert f"/raft/{name}" in page, name
    page = dom(url + "raft/log_entries")  # the table, newest first, payloads previewed
    assert "g2 entry 40: räft ✓" in page and "Binary:" not in page
    page = dom(url + "chunks/snapshot_chunks")
    assert "1,000 B | utf-8: state machine bytes state machine bytes" in page
    screenshot("serve-index.png", url, size="1280,460")
    screenshot("serve-database.png", url + "raft")


def test_canned_queries_show_the_workload(live):
    need_browser()
    store, url, _ = live
    page = dom(q(url, "raft/log_tail", group="g1"))
    assert "g1 entry 40: räft ✓" in page and "g1 entry 1: räft ✓" in page
    assert "g0 entry" not in page and "g2 entry" not in page  # one group only
    assert page.count('class="col-index"') >= 40
    page = dom(url + "raft/group_overview")
    for g in GROUPS + ("untrusted",):
        assert f">{g}<" in page, g
    assert ">31<" in page  # g0's first index after the compaction to 30
    page = dom(url + "raft/snapshot_chains")
    assert "FULL" in page and "DURABLE" in page and ">g0<" in page
    page = dom(url + "raft/recovery_history")
    assert ">created<" in page and ">STRICT<" in page
    page = dom(url + "raft/recent_backups")
    assert os.path.join(str(live[2].parent), "backups") in page
    screenshot("serve-log-tail.png", q(url, "raft/log_tail", group="g1", _hide_sql=1), size="1280,760")
    screenshot("serve-group-status.png", q(url, "raft/group_overview", _hide_sql=1), size="1280,420")


def test_script_payload_is_shown_escaped(live):
    need_browser()
    _, url, _ = live
    evil = "FROM log_entries WHERE group_id = (SELECT group_id FROM groups WHERE name = 'untrusted')"
    for page in (dom(q(url, "raft/log_tail", group="untrusted")), dom(q(url, "raft", sql=f"SELECT payload {evil}"))):
        assert ("utf-8: &lt;script&gt;document.body.dataset.p=1&lt;/script&gt;&lt;img src=x "
                "onerror=document.body.dataset.p=2&gt; | hex: 3c736372697074") in page
        assert 'data-p="' not in page and "<img" not in page  # shown as text, never run
    page = dom(q(url, "raft", sql=f"SELECT CAST(payload AS TEXT) AS t {evil}"))  # TEXT, not a BLOB: escaped too
    assert "&lt;script&gt;document.body" in page and 'data-p="' not in page and "<img" not in page


def test_write_attempts_in_the_browser_are_refused(live):
    need_browser()
    store, url, _ = live
    before = log_rows(store)
    page = dom(q(url, "raft", sql="DELETE FROM log_entries"))
    assert "Statement must be a SELECT" in page
    page = dom(q(url, "raft", sql="WITH a AS (SELECT 1) DELETE FROM log_entries"))
    assert "not authorized" in page
    page = dom(q(url, "raft", sql="INSERT INTO groups (name, created_at) VALUES ('x', 0)"))
    assert "Statement must be a SELECT" in page
    assert log_rows(store) == before
    assert "x" not in store.groups()


def test_node_keeps_appending_while_browsed_and_its_wal_checkpoints(live):
    """A writer appends without pause while pages load; each load shows entries appended just before it
    (live data, not a stale snapshot); afterwards the node's own connection completes a TRUNCATE
    checkpoint with the server still up: no browser page left a read transaction behind."""
    need_browser()
    store, url, d = live
    log = store.log("live")
    errors, stop, counts = [], threading.Event(), [0]

    def writer():
        try:
            while not stop.is_set():
                log.append([LogEntry(log.last_index + 1, 1, b"background %d" % (log.last_index + 1))])
                counts[0] += 1
                time.sleep(0.002)
        except Exception as exc:  # noqa: BLE001  reported below
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for page in ("raft/log_entries", "raft/group_overview", "raft/segments", "raft/group_status"):
            n0 = counts[0]
            marker = f"marker before {page}: ✓"
            store.log("marks").append([LogEntry(store.log("marks").last_index + 1, 1, marker.encode())])
            assert marker in dom(q(url, "raft/log_tail", group="marks"))
            dom(url + page)
            assert counts[0] > n0, f"no append completed while {page} loaded"
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    assert counts[0] > 20
    last = log.last_index
    assert [e.index for e in log.entries(1, last + 1)] == list(range(1, last + 1))
    busy, frames, copied = store.kernel.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0 and frames == copied
    assert os.path.getsize(d / "raft.db-wal") == 0
    assert f"background {last}" in dom(q(url, "raft/log_tail", group="live"))  # still serving, still live


# ---------------------------------------------------------------------------------------------- state databases
STATE_SCHEMA = ["CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT NOT NULL, blob BLOB)"]


def kv_apply(conn, entry):
    k, v = entry.data.decode().split("=", 1)
    conn.execute("INSERT INTO kv(k, v, blob) VALUES (?, ?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                 (k, v, b"\x00\xffblob " + k.encode()))


def kv_entries(store, group, lo, hi):
    store.log(group).append([LogEntry(i, 1, f"k{i}=v{i} ✓".encode()) for i in range(lo, hi + 1)])
    store.metadata(group).set_commit_index(hi)
    store.state(group, schema=STATE_SCHEMA, apply=kv_apply).catch_up()


def json_of(url, path, **params):
    import json

    status, body = http(q(url, path, **params))
    assert status == 200, (path, status, body[:500])
    return json.loads(body)


def state_folder(d):
    """Bytes of every file of the state folder (the -shm: only that it is there; readers record their read
    marks in it, as in raft.db's)."""
    folder = os.path.join(d, "state")
    res = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith("-shm"):
            res[name] = b"present"
            continue
        with open(os.path.join(folder, name), "rb") as f:
            res[name] = f.read()
    return res


def test_state_db_names():
    assert web.state_db_name("orders", 3) == "state-orders"
    assert web.state_db_name("Orders_2-b", 3) == "state-Orders_2-b"
    for odd in ("a b", "a/b", "räft", "x.y", "", "x" * 65, "g7", "g0"):  # not plain, or an id's form
        assert web.state_db_name(odd, 9) == "state-g9", odd
    names = [("g1", 5), ("g5", 1), ("a b", 2), ("ok", 3), ("state", 4)]
    assert len({web.state_db_name(n, i) for n, i in names}) == len(names)  # never two the same
    assert web.is_served("state-orders") and web.is_served("raft") and not web.is_served("_internal")


def test_state_databases_served_read_only_beside_a_live_node(tmp_path):
    """The state databases of a node open in this process: served by name, live (new applies are seen),
    their canned query, BLOB previews; every write refused; opened O_RDONLY."""
    need_server()
    d = tmp_path / "node"
    with open_store(d) as s:
        kv_entries(s, "orders", 1, 30)
        kv_entries(s, "a b", 1, 3)  # a name that is not plain: state-g<id>
        s.log("plain").append([LogEntry(1, 1, b"no state")])
        odd = s.kernel.group("a b").gid
        orders = s.state("orders", schema=STATE_SCHEMA, apply=kv_apply)
        srv = Server(d)
        try:
            index = json_of(srv.url, ".json")
            assert {"raft", "chunks", "state-orders", f"state-g{odd}"} <= set(index), sorted(index)
            assert not any(name.startswith("state-plain") for name in index)
            rows = json_of(srv.url, "state-orders/kv.json", _shape="array", _sort="k")
            assert len(rows) == 30 and {"k": "k1", "v": "v1 ✓"}.items() <= rows[0].items()
            assert json_of(srv.url, f"state-g{odd}.json", sql="SELECT count(*) AS n FROM kv",
                           _shape="array") == [{"n": 3}]
            (pos,) = json_of(srv.url, "state-orders/raft_applied_position.json", _shape="array")
            assert (pos["applied_index"], pos["applied_term"], pos["group_name"], pos["node_id"]) == (30, 1, "orders",
                                                                                                      "n1")
            before = orders.query("SELECT * FROM kv ORDER BY k")
            for path in ("state-orders", "state-orders/kv", "state-orders/raft_applied_position"):
                status, body = http(srv.url + path, data=b"sql=DELETE+FROM+kv", method="POST")
                assert status == 405 and "read-only" in body, (path, status)
            for sql in ("DELETE FROM kv", "WITH a AS (SELECT 1) DELETE FROM kv",
                        "WITH a AS (SELECT 1) UPDATE raft_applied SET applied_index = 0",
                        "UPDATE kv SET v = 'x'", "DROP TABLE kv", "PRAGMA journal_mode=DELETE",
                        "PRAGMA wal_checkpoint(TRUNCATE)", "VACUUM", "ATTACH 'x.db' AS x"):
                status, body = http(q(srv.url, "state-orders", sql=sql))
                assert status == 400, (sql, status)
                assert "not authorized" in body or "must be a SELECT" in body or "disallowed PRAGMA" in body, (sql,
                                                                                                               body)
            assert http(srv.url + "state-orders.db")[0] in (403, 404)  # no download
            assert orders.query("SELECT * FROM kv ORDER BY k") == before and orders.last_applied == 30
            kv_entries(s, "orders", 31, 32)  # the node still applies, and the page shows it (live)
            assert json_of(srv.url, "state-orders.json", sql="SELECT applied_index FROM raft_applied",
                           _shape="array") == [{"applied_index": 32}]
            if sys.platform.startswith("linux"):
                modes = set()
                for fd in os.listdir(f"/proc/{srv.proc.pid}/fd"):
                    try:
                        target = os.readlink(f"/proc/{srv.proc.pid}/fd/{fd}")
                        with open(f"/proc/{srv.proc.pid}/fdinfo/{fd}") as f:
                            flags = int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
                    except (OSError, StopIteration):
                        continue
                    if target == orders.path:
                        modes.add(flags & os.O_ACCMODE)
                assert modes == {os.O_RDONLY}, modes
            if CHROMIUM is not None:
                page = dom(q(srv.url, "state-orders/kv", _sort="k"))
                assert "v1 ✓" in page and "state-orders" in page
                assert "9 B | hex: 00ff626c6f62206b31" in page  # BLOBs previewed like payloads
                page = dom(srv.url)
                assert 'href="/state-orders"' in page and f'href="/state-g{odd}"' in page
                page = dom(q(srv.url, "state-orders", sql="DELETE FROM kv"))
                assert "Statement must be a SELECT" in page
                assert orders.last_applied == 32 and orders.query("SELECT count(*) FROM kv") == [(32,)]
        finally:
            out = srv.stop()
    assert "stopped" in out


def test_serving_a_stopped_nodes_state_creates_nothing(tmp_path):
    """A stopped node's state database is served read-only through its kept WAL file: no file is created
    beside it and no byte of it or of its WAL changes."""
    need_server()
    d = tmp_path / "node"
    with open_store(d) as s:
        kv_entries(s, "orders", 1, 12)
    before = state_folder(d)
    assert any(n.endswith(".db-wal") for n in before)  # closed: the WAL file is kept (as raft.db's)
    srv = Server(d)
    try:
        rows = json_of(srv.url, "state-orders/kv.json", _shape="array", _sort="k")
        assert [r["k"] for r in rows][:3] == ["k1", "k10", "k11"] and len(rows) == 12
        assert json_of(srv.url, "state-orders/raft_applied_position.json", _shape="array")[0]["applied_index"] == 12
        for path in ("", "state-orders", "state-orders/raft_applied", "state-orders/raft_state_identity"):
            assert http(srv.url + path)[0] == 200, path
        status, body = http(q(srv.url, "state-orders", sql="WITH a AS (SELECT 1) DELETE FROM kv"))
        assert status == 400 and "not authorized" in body
        assert state_folder(d) == before
    finally:
        srv.stop()
    assert state_folder(d) == before
    with open_store(d) as s:  # and the node opens it as before
        assert s.state("orders", schema=STATE_SCHEMA, apply=kv_apply).last_applied == 12
