#!/usr/bin/env python3
"""viewkeeper's benchmark harness (BENCHMARKS.md): viewkeeper and PGSync side by side, in one
run, over the real Postgres and Redis of scripts/services.sh, plus the machine's own limits
(pg_recvlogical, redis-benchmark). Started by scripts/bench.sh, which installs what this needs.

The search side of both tools is a *bulk-acknowledging HTTP endpoint* kept here (the
OpenSearch-compatible test server is far too slow to measure a synchronizer with): it answers
`_bulk` with per-item success and the few index/alias/search calls each tool makes, counts
documents, and notes when each watched document arrives. "Visible" below means "received by
that endpoint". The OpenSearch-compatible server's own figures are measured separately and
reported under baselines.opensearch_reference.

Workloads (sizes from the command line; defaults are the issue's, --quick is smaller):
  backfill       N orders x 3 items, C customers, P products: initial load, docs/s and time
  stream-orders  order status updates in 200-row transactions: changes/s, lag p50/p99
  fan-out        one product rename referenced by 300 orders, one by F orders: visible_ms
  stream-cache   product price updates (all products per transaction) into Redis (viewkeeper
                 only: PGSync has no cache sink): changes/s, lag p50/p99
  big-transaction  one UPDATE of 2,000,000 rows streamed into a Redis cache (viewkeeper only):
                 seconds from its commit to the slot confirming it, peak RSS
The stream workloads run twice: live (the tool streams while the changes commit) and catch-up
(the tool is frozen with SIGSTOP while they commit, then thawed): `changes_per_s` is the
catch-up rate, the tool's own throughput over a backlog, as the pg_recvlogical baseline reads
one; `live_*` are the live run's figures, bounded by the producer's rate too.
Each workload also reports the worker's peak RSS and its state-store size.
"""

import argparse
import contextlib
import gzip
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg2
import redis as redislib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "target", "bench")
PG_PORT = int(os.environ.get("VK_PG_PORT", "54329"))
REDIS_PORT = int(os.environ.get("VK_REDIS_PORT", "63799"))
OS_PORT = int(os.environ.get("VK_OPENSEARCH_PORT", "19200"))
PG_BIN = "/usr/lib/postgresql/15/bin"
VK_BIN = os.environ.get("VK_BENCH_BIN") or os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target"), "release", "viewkeeper")
REDIS_DB = 2  # the benchmark's own Redis database: FLUSHDB'd at the start of a run
TX_ROWS = 200  # rows per stream-orders transaction (the figure)


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def pg_url(db):
    return f"postgres://postgres@127.0.0.1:{PG_PORT}/{db}"


def pg(db):
    c = psycopg2.connect(host="127.0.0.1", port=PG_PORT, user="postgres", dbname=db)
    c.autocommit = True
    return c


@contextlib.contextmanager
def cursor(db):
    """An autocommit cursor (psycopg2's `with conn` would open a transaction)."""
    c = pg(db)
    try:
        with c.cursor() as cur:
            yield cur
    finally:
        c.close()


def sql(db, *stmts, params=None):
    with cursor(db) as cur:
        for s in stmts:
            cur.execute(s, params)
        try:
            return cur.fetchall()
        except psycopg2.ProgrammingError:
            return None


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(p / 100.0 * (len(xs) - 1)))))
    return xs[i]


def r1(x):
    return None if x is None else round(x, 1)


# ------------------------------------------------------------------------------------------
# The bulk-acknowledging endpoint


class Index:
    def __init__(self, name):
        self.name = name
        self.ids = set()
        self.inv = {}  # (field, value text) -> set of ids (PGSync's `_meta` lookups)
        self.meta_keys = {}  # id -> list of inv keys, to unindex on overwrite


class Endpoint:
    """State of the bulk-acknowledging endpoint. One lock; the handlers are threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.indices = {}
        self.aliases = {}  # alias -> index
        self.docs = 0  # index actions received
        self.deletes = 0
        self.requests = 0
        self.status_arrivals = {}  # watched status value -> {doc id: first arrival}
        self.name_arrivals = {}  # watched product name -> {doc id: first arrival}
        self.scrolls = {}
        self.unknown = []

    def resolve(self, name):
        return self.aliases.get(name, name)

    def index(self, name, create=False):
        name = self.resolve(name)
        if name not in self.indices and create:
            self.indices[name] = Index(name)
        return self.indices.get(name)

    def reset_watch(self):
        with self.lock:
            self.status_arrivals.clear()
            self.name_arrivals.clear()

    STATUS = re.compile(rb'"status":\s*"(b[^"]*)"')
    RENAMED = re.compile(rb'"name":\s*"(renamed-[^"]*)"')

    def put_doc(self, ix, _id, raw, now):
        """Takes one document (its NDJSON line). Only PGSync's documents are parsed whole
        (their `_meta` is what PGSync's own searches look up); the watched values are found
        with two regular expressions, so the endpoint costs both tools little."""
        ix.ids.add(_id)
        self.docs += 1
        if b'"_meta"' in raw:
            for k in ix.meta_keys.pop(_id, ()):
                s = ix.inv.get(k)
                if s:
                    s.discard(_id)
            doc = json.loads(raw)
            if isinstance(doc, dict) and "doc" in doc and len(doc) == 1:
                doc = doc["doc"]
            keys = []
            for table, cols in (doc.get("_meta") or {}).items():
                for col, vals in (cols or {}).items():
                    for v in vals if isinstance(vals, list) else [vals]:
                        k = (f"_meta.{table}.{col}", str(v))
                        ix.inv.setdefault(k, set()).add(_id)
                        keys.append(k)
            ix.meta_keys[_id] = keys
        m = self.STATUS.search(raw)
        if m:
            self.status_arrivals.setdefault(m.group(1).decode(), {}).setdefault(_id, now)
        for n in set(self.RENAMED.findall(raw)):
            self.name_arrivals.setdefault(n.decode(), {}).setdefault(_id, now)

    def bulk(self, body, path_index):
        now = time.monotonic()
        lines = body.split(b"\n")
        items = []
        i = 0
        with self.lock:
            self.requests += 1
            while i < len(lines):
                line = lines[i]
                i += 1
                if not line.strip():
                    continue
                action = json.loads(line)
                op, meta = next(iter(action.items()))
                name = meta.get("_index", path_index)
                ix = self.index(name, create=True)
                _id = str(meta.get("_id"))
                if op in ("index", "create", "update"):
                    self.put_doc(ix, _id, lines[i], now)
                    i += 1
                    res = {"result": "created", "status": 201}
                else:
                    self.deletes += 1
                    ix.ids.discard(_id)
                    res = {"result": "deleted", "status": 200}
                res.update({"_index": ix.name, "_id": _id, "_version": 1, "_seq_no": 0, "_primary_term": 1,
                            "_shards": {"total": 1, "successful": 1, "failed": 0}})
                items.append({op: res})
        return {"took": 1, "errors": False, "items": items}

    def search(self, ix, query):
        def ev(q):
            if not q or "match_all" in q:
                return set(ix.ids)
            if "bool" in q:
                b = q["bool"]
                res = None
                for k in ("must", "filter"):
                    subs = b.get(k) or []
                    for s in subs if isinstance(subs, list) else [subs]:
                        r = ev(s)
                        res = r if res is None else res & r
                sh = b.get("should") or []
                sh = sh if isinstance(sh, list) else [sh]
                if sh and (res is None or b.get("minimum_should_match")):
                    u = set().union(*(ev(s) for s in sh))
                    res = u if res is None else res & u
                if res is None:
                    res = set(ix.ids)
                mn = b.get("must_not") or []
                for s in mn if isinstance(mn, list) else [mn]:
                    res -= ev(s)
                return res
            for kind in ("terms", "term"):
                if kind in q:
                    field, vals = next(iter(q[kind].items()))
                    if isinstance(vals, dict):
                        vals = vals.get("value")
                    field = field[: -len(".keyword")] if field.endswith(".keyword") else field
                    out = set()
                    for v in vals if isinstance(vals, list) else [vals]:
                        out |= ix.inv.get((field, str(v)), set())
                    return out & ix.ids
            if "ids" in q:
                return set(map(str, q["ids"].get("values", []))) & ix.ids
            self.unknown.append(("query", json.dumps(q)[:200]))
            return set(ix.ids)

        return sorted(ev(query))


EP = Endpoint()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def reply(self, status, obj=None, head=False):
        data = b"" if obj is None else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Elastic-Product", "Elasticsearch")
        self.send_header("Content-Length", "0" if head else str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(n) if n else b""
        if self.headers.get("Content-Encoding") == "gzip":
            data = gzip.decompress(data)
        return data

    def route(self, method):
        u = urllib.parse.urlsplit(self.path)
        qs = dict(urllib.parse.parse_qsl(u.query))
        parts = [urllib.parse.unquote(p) for p in u.path.split("/") if p]
        body = self.body()
        js = json.loads(body) if body.strip() and not parts[-1:] == ["_bulk"] else {}
        head = method == "HEAD"
        if not parts:
            return self.reply(200, {"name": "bench-endpoint", "cluster_name": "bench", "version": {
                "number": "7.10.2", "build_flavor": "default", "distribution": "opensearch"},
                "tagline": "You Know, for Search"}, head)
        if parts[-1] == "_bulk":
            return self.reply(200, EP.bulk(body, parts[0] if len(parts) == 2 else None))
        if parts[0] == "_alias" and len(parts) == 2:
            with EP.lock:
                ix = EP.aliases.get(parts[1])
            if ix is None:
                return self.reply(404, {"error": f"alias [{parts[1]}] missing", "status": 404}, head)
            return self.reply(200, {ix: {"aliases": {parts[1]: {}}}}, head)
        if parts == ["_aliases"]:
            with EP.lock:
                for a in js.get("actions", []):
                    op, spec = next(iter(a.items()))
                    if op == "add":
                        EP.aliases[spec["alias"]] = spec["index"]
                    elif op == "remove" and EP.aliases.get(spec["alias"]) == spec["index"]:
                        del EP.aliases[spec["alias"]]
            return self.reply(200, {"acknowledged": True})
        if parts[:2] == ["_search", "scroll"]:
            sid = js.get("scroll_id") or qs.get("scroll_id")
            if method == "DELETE":
                with EP.lock:
                    for s in (sid if isinstance(sid, list) else [sid]):
                        EP.scrolls.pop(s, None)
                return self.reply(200, {"succeeded": True, "num_freed": 1})
            with EP.lock:
                ix, rest, size = EP.scrolls.get(sid, (None, [], 10))
                page, rest = rest[:size], rest[size:]
                EP.scrolls[sid] = (ix, rest, size)
            return self.reply(200, self.hits(ix, page, sid))
        name = parts[0]
        if len(parts) == 1:
            with EP.lock:
                if method == "PUT":
                    if EP.index(name):
                        return self.reply(400, {"error": {"type": "resource_already_exists_exception"}, "status": 400})
                    EP.index(name, create=True)
                    for a in (js.get("aliases") or {}):
                        EP.aliases[a] = name
                    return self.reply(200, {"acknowledged": True, "shards_acknowledged": True, "index": name})
                if method == "DELETE":
                    for n in [n for n in EP.indices if n == name or (name.endswith("*") and n.startswith(name[:-1]))]:
                        del EP.indices[n]
                        for a in [a for a, t in EP.aliases.items() if t == n]:
                            del EP.aliases[a]
                    return self.reply(200, {"acknowledged": True})
                ok = all(EP.index(n) for n in name.split(","))
            return self.reply(200 if ok else 404, {name: {}} if ok else {"status": 404}, head)
        op = parts[1]
        with EP.lock:
            ix = EP.index(name)
            if ix is None and op != "_refresh":
                return self.reply(404, {"error": f"no such index [{name}]", "status": 404}, head)
            if op == "_refresh":
                return self.reply(200, {"_shards": {"total": 1, "successful": 1, "failed": 0}})
            if op == "_count":
                return self.reply(200, {"count": len(ix.ids)})
            if op in ("_mapping", "_settings"):
                return self.reply(200, {ix.name: {"mappings": {}, "settings": {}}})
            if op == "_search":
                ids = EP.search(ix, js.get("query"))
                size = int(qs.get("size", js.get("size", 10)))
                sid = None
                if "scroll" in qs:
                    sid = f"s{len(EP.scrolls) + 1}-{time.monotonic_ns()}"
                    EP.scrolls[sid] = (ix, ids[size:], size)
                return self.reply(200, self.hits(ix, ids[:size], sid, total=len(ids)))
        EP.unknown.append((method, self.path))
        return self.reply(404, {"error": f"bench endpoint: unsupported {method} {self.path}", "status": 404}, head)

    @staticmethod
    def hits(ix, ids, sid, total=None):
        out = {"took": 1, "timed_out": False, "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
               "hits": {"total": {"value": total if total is not None else len(ids), "relation": "eq"},
                        "max_score": None,
                        "hits": [{"_index": ix.name if ix else "", "_id": i, "_score": None, "_source": {}}
                                 for i in ids]}}
        if sid:
            out["_scroll_id"] = sid
        return out

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_PUT(self):
        self.route("PUT")

    def do_DELETE(self):
        self.route("DELETE")

    def do_HEAD(self):
        self.route("HEAD")


def start_endpoint():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv.server_address[1]


# ------------------------------------------------------------------------------------------
# Processes: start, RSS sampling, stop


class Proc:
    """A child process with its log file and a peak-RSS sampler over its process tree."""

    def __init__(self, name, argv, env=None, cwd=None):
        self.name = name
        self.logpath = os.path.join(OUT, f"{name}.log")
        self.logf = open(self.logpath, "ab")
        self.logf.write(f"\n=== {time.strftime('%F %T')} {' '.join(argv)}\n".encode())
        self.logf.flush()
        self.p = subprocess.Popen(argv, stdout=self.logf, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                  start_new_session=True)
        self.peak_kb = 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def session_pids(self):
        """The processes of the child's session (PGSync forks workers)."""
        pids = {self.p.pid}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    if int(fields[3]) == self.p.pid:  # field 6 of stat: the session id
                        pids.add(int(d))
                except (OSError, IndexError, ValueError):
                    pass
        return pids

    def tree_rss_kb(self, pids=None):
        total = 0
        for pid in pids or self.session_pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
            except OSError:
                pass
        return total

    def cpu_s(self):
        """CPU seconds (user + system) of the process tree so far: unlike wall time, hardly
        moved by other work on the machine."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.session_pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
            except (OSError, IndexError, ValueError):
                pass
        return total / tick

    def _sample(self):
        n = 0
        pids = None
        while not self._stop.is_set() and self.p.poll() is None:
            if n % 10 == 0:  # the process list once a second, the RSS ten times
                pids = self.session_pids()
            n += 1
            self.peak_kb = max(self.peak_kb, self.tree_rss_kb(pids))
            self._stop.wait(0.1)

    def reset_peak(self):
        self.peak_kb = self.tree_rss_kb()
        self.cpu0 = self.cpu_s()

    def cpu_since_reset(self):
        return round(self.cpu_s() - getattr(self, "cpu0", 0.0), 2)

    def peak_mb(self):
        return round(max(self.peak_kb, self.tree_rss_kb()) / 1024.0, 1)

    def wait(self, timeout=None):
        """Waits for the process to exit; its CPU seconds are then in `self.exit_cpu_s`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(self.p.pid, os.WNOHANG)
            if pid:
                self.p.returncode = os.waitstatus_to_exitcode(status)
                self.exit_cpu_s = round(ru.ru_utime + ru.ru_stime, 2)
                break
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.name, timeout)
            time.sleep(0.01)
        self._stop.set()
        return self.p.returncode

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self._stop.set()
        self.logf.close()

    def alive(self):
        return self.p.poll() is None

    def freeze(self):
        """SIGSTOP the process group: it reads nothing while the workload commits."""
        os.killpg(self.p.pid, signal.SIGSTOP)

    def thaw(self):
        os.killpg(self.p.pid, signal.SIGCONT)

    def tail(self, n=30):
        with open(self.logpath, "rb") as f:
            return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")


@contextlib.contextmanager
def profiled(name):
    """With VK_BENCH_PERF=1: a system-wide `perf record` (cpu-clock samples, call graphs)
    around one workload, into target/bench/perf-NAME.data (see BENCHMARKS.md)."""
    if os.environ.get("VK_BENCH_PERF") != "1":
        yield
        return
    out = os.path.join(OUT, f"perf-{name}.data")
    # VK_BENCH_PERF_CALLGRAPH=dwarf unwinds without frame pointers (bigger files).
    cg = os.environ.get("VK_BENCH_PERF_CALLGRAPH", "fp")
    p = subprocess.Popen(["perf", "record", "-a", "--call-graph", cg, "-e", "cpu-clock", "-F", "499", "-o", out],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        p.send_signal(signal.SIGINT)
        p.wait()


def dir_mb(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return round(total / 1048576.0, 1)


def wait_for(what, cond, timeout, proc=None, poll=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc is not None and not proc.alive():
            raise SystemExit(f"bench: {proc.name} exited while waiting for {what}:\n{proc.tail()}")
        time.sleep(poll)
    return False


# ------------------------------------------------------------------------------------------
# Data


def table_ddl():
    """CREATE TABLE / CREATE INDEX statements of config/shop.sql, by table."""
    text = open(os.path.join(REPO, "config", "shop.sql")).read()
    out = {}
    for m in re.finditer(r"CREATE TABLE (\w+) \((.*?)\n\);", text, re.S):
        out[m.group(1)] = [f"CREATE TABLE {{t}} ({m.group(2)}\n)"]
    for m in re.finditer(r"CREATE INDEX (\w+) ON (\w+) \((\w+)\);", text):
        out[m.group(2)].append(f"CREATE INDEX ON {{t}} ({m.group(3)})")
    return out


def seed_sql(names, a):
    """INSERTs of the benchmark's data, into the tables named by `names` (table -> name)."""
    big = a.fanout[-1]
    return {
        "customers": f"INSERT INTO {names['customers']} SELECT g, 'Customer ' || g, 'c' || g || '@example.com', now()"
                     f" FROM generate_series(1, {a.customers}) g",
        "products": f"INSERT INTO {names['products']}(id, sku, name, description, price, status, updated_at)"
                    f" SELECT g, 'SKU-' || lpad(g::text, 6, '0'), 'Product ' || g, 'A fine product', 10 + g % 90,"
                    f" 'active', now() FROM generate_series(1, {a.products}) g",
        "orders": f"INSERT INTO {names['orders']} SELECT g, 1 + (g - 1) % {a.customers}, 'new', 30.00,"
                  f" jsonb_build_object('city', 'Lisbon', 'zip', (1000 + g % 9000)::text), now(), now()"
                  f" FROM generate_series(1, {a.orders}) g",
        # Product 1 is on exactly 300 orders, product 2 on exactly F (the fan-out workload);
        # the others share the rest.
        "order_items": f"INSERT INTO {names['order_items']} SELECT o, l,"
                       f" CASE WHEN l = 1 AND o <= 300 THEN 1 WHEN l = 1 AND o <= {300 + big} THEN 2"
                       f" ELSE 3 + (o * 3 + l) % ({a.products} - 2) END, l, 10.00"
                       f" FROM generate_series(1, {a.orders}) o, generate_series(1, 3) l",
    }


SERVICE_OF = {"customers": "identity", "products": "catalog", "orders": "ordering", "order_items": "ordering"}


def load_viewkeeper_dbs(a):
    dbs = {s: f"bench_{s}" for s in ("identity", "catalog", "ordering")}
    subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(PG_PORT), "-U",
                    "postgres", "-d", "postgres", "-v", f"identity_db={dbs['identity']}", "-v",
                    f"catalog_db={dbs['catalog']}", "-v", f"ordering_db={dbs['ordering']}", "-f",
                    os.path.join(REPO, "config", "shop.sql")], check=True)
    for t, s in seed_sql({t: t for t in SERVICE_OF}, a).items():
        sql(dbs[SERVICE_OF[t]], s, f"ANALYZE {t}")
    return dbs


def load_pgsync_db(a):
    """The same tables and rows in one database (PGSync needs one), a schema per service."""
    db = "bench_pgsync"
    for s in sql("postgres", f"SELECT slot_name FROM pg_replication_slots WHERE database = '{db}'"):
        sql("postgres", f"SELECT pg_drop_replication_slot('{s[0]}')")
    sql("postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)", f"CREATE DATABASE {db}")
    ddl = table_ddl()
    stmts = [f"CREATE SCHEMA {s}" for s in ("identity", "catalog", "ordering")]
    for t, svc in SERVICE_OF.items():
        stmts += [d.format(t=f"{svc}.{t}") for d in ddl[t]]
    names = {t: f"{svc}.{t}" for t, svc in SERVICE_OF.items()}
    stmts += list(seed_sql(names, a).values())
    stmts += [f"ANALYZE {n}" for n in names.values()]
    sql(db, *stmts)
    return db, names


# ------------------------------------------------------------------------------------------
# Workload drivers (the same statements for both tools)


def drive_status_updates(db, table, a, tag):
    """stream-orders: `a.stream_orders` status updates in 200-row transactions; returns the
    commit time of each transaction (its status value is f"b{tag}{k}")."""
    commits = {}
    conn = psycopg2.connect(host="127.0.0.1", port=PG_PORT, user="postgres", dbname=db)
    cur = conn.cursor()
    n_tx = a.stream_orders // TX_ROWS
    for k in range(n_tx):
        lo = k * TX_ROWS + 1
        st = f"b{tag}{k}"
        cur.execute(f"UPDATE {table} SET status = %s, updated_at = now() WHERE id BETWEEN %s AND %s",
                    (st, lo, lo + TX_ROWS - 1))
        conn.commit()
        commits[st] = time.monotonic()
    conn.close()
    return commits


def measure_stream_orders(db, table, a, tag, proc):
    """Live: the tool streams while the updates commit (bounded by the producer's rate as
    much as by the tool's). Catch-up: the tool is frozen (SIGSTOP) while the same number of
    updates commit, then thawed: its own rate over a backlog, as pg_recvlogical's baseline
    reads one."""
    live = measure_stream_orders_once(db, table, a, tag, proc, frozen=False)
    caught = measure_stream_orders_once(db, table, a, tag + "c", proc, frozen=True)
    out = {k: caught[k] for k in ("changes", "visible", "completed", "changes_per_s", "lag_p50_ms", "lag_p99_ms",
                                  "cpu_us_per_change")}
    out["catchup_seconds"] = caught["seconds"]
    out.update({f"live_{k}": live[k] for k in ("changes_per_s", "produce_changes_per_s", "lag_p50_ms",
                                                 "lag_p99_ms", "lag_max_ms", "completed")})
    out["rss_mb"] = max(live["rss_mb"], caught["rss_mb"])
    return out


def measure_stream_orders_once(db, table, a, tag, proc, frozen):
    EP.reset_watch()
    proc.reset_peak()
    if frozen:
        proc.freeze()
    t0 = time.monotonic()
    try:
        commits = drive_status_updates(db, table, a, tag)
    finally:
        if frozen:
            proc.thaw()
    produced = time.monotonic()
    if frozen:
        t0 = produced  # the rate counts from the thaw
    total = len(commits) * TX_ROWS

    def done():
        with EP.lock:
            return sum(len(v) for k, v in EP.status_arrivals.items() if k in commits) >= total

    finished = wait_for("stream-orders", done, a.timeout, proc)
    with EP.lock:
        arr = {k: dict(v) for k, v in EP.status_arrivals.items() if k in commits}
    lags = [(max(arr[k].values()) - commits[k]) * 1000 for k in commits if len(arr.get(k, {})) == TX_ROWS]
    visible = sum(len(v) for v in arr.values())
    last = max((max(v.values()) for v in arr.values() if v), default=time.monotonic())
    return {"changes": total, "visible": visible, "completed": finished,
            "changes_per_s": r1(visible / max(last - t0, 1e-6)), "seconds": r1(last - t0),
            "produce_changes_per_s": r1(total / max(produced - t0, 1e-6)) if not frozen else None,
            "lag_p50_ms": r1(pct(lags, 50)), "lag_p99_ms": r1(pct(lags, 99)), "lag_max_ms": r1(max(lags, default=None)),
            "rss_mb": proc.peak_mb(), "cpu_us_per_change": r1(proc.cpu_since_reset() * 1e6 / max(total, 1))}


def measure_stream_cache(db, a, proc):
    """Live, then catch-up (see measure_stream_orders); the pg_recvlogical baseline reads the
    live run's transactions."""
    live, end_lsn = measure_stream_cache_once(db, a, proc, base=1000, frozen=False)
    caught, _ = measure_stream_cache_once(db, a, proc, base=1000 + live["transactions"], frozen=True)
    out = {k: caught[k] for k in ("changes", "transactions", "completed", "changes_per_s", "lag_p50_ms", "lag_p99_ms",
                                  "cpu_us_per_change")}
    out["catchup_seconds"] = caught["seconds"]
    out.update({f"live_{k}": live[k] for k in ("changes_per_s", "produce_changes_per_s", "lag_p50_ms",
                                                 "lag_p99_ms", "lag_max_ms", "completed")})
    out["rss_mb"] = max(live["rss_mb"], caught["rss_mb"])
    return out, end_lsn


def measure_stream_cache_once(db, a, proc, base, frozen):
    """stream-cache: `a.stream_cache` price updates, every product once per transaction; the
    price of transaction k is base + k. A poller reads a spread sample of the cache entries
    (pipelined HGET) and notes when each transaction's price (or a later one) shows."""
    r = redislib.Redis(host="127.0.0.1", port=REDIS_PORT, db=REDIS_DB)
    sample = sorted({1 + (i * a.products) // 8 for i in range(8)})
    seen = {pid: {} for pid in sample}  # pid -> {k: first time price >= 1000 + k}
    n_tx = a.stream_cache // a.products
    stop = threading.Event()

    def poll():
        latest = {pid: -1 for pid in sample}
        while not stop.is_set():
            p = r.pipeline(transaction=False)
            for pid in sample:
                p.hget(f"ordering:product:{pid}", "price")
            vals = p.execute()
            now = time.monotonic()
            for pid, v in zip(sample, vals):
                if v is None:
                    continue
                k = int(round(float(v))) - base
                if k > latest[pid]:
                    for j in range(latest[pid] + 1, min(k, n_tx - 1) + 1):
                        seen[pid][j] = now
                    latest[pid] = k
            if all(latest[pid] >= n_tx - 1 for pid in sample):
                return
            time.sleep(0.0005)

    proc.reset_peak()
    conn = psycopg2.connect(host="127.0.0.1", port=PG_PORT, user="postgres", dbname=db)
    cur = conn.cursor()
    commits = {}
    if frozen:
        proc.freeze()
    else:
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
    t0 = time.monotonic()
    try:
        for k in range(n_tx):
            cur.execute("UPDATE products SET price = %s, updated_at = now()", (base + k,))
            conn.commit()
            commits[k] = time.monotonic()
    finally:
        if frozen:
            proc.thaw()
    produced = time.monotonic()
    if frozen:
        t0 = produced
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
    cur.execute("SELECT pg_current_wal_lsn()::text")
    end_lsn = cur.fetchone()[0]
    conn.close()
    poller.join(a.timeout)
    stop.set()
    finished = all(len(seen[p]) == n_tx for p in sample)
    lags = [(max(seen[p][k] for p in sample) - commits[k]) * 1000 for k in commits
            if all(k in seen[p] for p in sample)]
    last = max((max(s.values()) for s in seen.values() if s), default=time.monotonic())
    total = n_tx * a.products
    visible_tx = min(len(s) for s in seen.values())
    return {"changes": total, "transactions": n_tx, "completed": finished,
            "changes_per_s": r1(visible_tx * a.products / max(last - t0, 1e-6)), "seconds": r1(last - t0),
            "cpu_us_per_change": r1(proc.cpu_since_reset() * 1e6 / max(total, 1)),
            "produce_changes_per_s": r1(total / max(produced - t0, 1e-6)) if not frozen else None,
            "lag_p50_ms": r1(pct(lags, 50)), "lag_p99_ms": r1(pct(lags, 99)), "lag_max_ms": r1(max(lags, default=None)),
            "rss_mb": proc.peak_mb()}, end_lsn


# ------------------------------------------------------------------------------------------
# viewkeeper


def vk_env(dbs, port, data, http_port):
    env = dict(os.environ)
    env.pop("RUST_LOG", None)
    for s, db in dbs.items():
        S = s.upper()
        env[f"VIEWKEEPER__SOURCES__{S}__URL"] = pg_url(db)
        env[f"VIEWKEEPER__SOURCES__{S}__SLOT"] = db
        env[f"VIEWKEEPER__SOURCES__{S}__PUBLICATION"] = db
    env["VIEWKEEPER__SINKS__SEARCH__URL"] = f"http://127.0.0.1:{port}"
    env["VIEWKEEPER__SINKS__CACHE__URL"] = f"redis://127.0.0.1:{REDIS_PORT}/{REDIS_DB}"
    env["VIEWKEEPER__HTTP__LISTEN"] = f"127.0.0.1:{http_port}"
    env["VIEWKEEPER__DATA_DIR"] = data
    return env


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def http_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


WATCHED = ("viewkeeper_batches_total", "viewkeeper_changes_applied_total", "viewkeeper_sink_write_seconds_sum",
           "viewkeeper_sink_write_seconds_count", "viewkeeper_documents_written_total")


def vk_metrics(http_port):
    """The worker's counters that explain a workload (batches, sink time, documents)."""
    out = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except Exception:
        return out
    for line in text.splitlines():
        if line.startswith(WATCHED):
            name, _, val = line.rpartition(" ")
            out[name] = float(val)
    return out


def delta(after, before):
    return {k: round(v - before.get(k, 0.0), 3) for k, v in after.items() if v != before.get(k, 0.0)}


def probe(db, table, marker, proc, timeout):
    """Waits until a change made now is visible: the tool is streaming."""
    EP.reset_watch()
    with cursor(db) as cur:
        cur.execute(f"UPDATE {table} SET status = %s WHERE id = 1", (marker,))
    ok = wait_for(f"{proc.name} to stream", lambda: "1" in EP.status_arrivals.get(marker, {}), timeout, proc, poll=0.05)
    if not ok:
        raise SystemExit(f"bench: {proc.name} did not stream a probe change within {timeout} s:\n{proc.tail()}")


def run_viewkeeper(a, port, results, baselines):
    dbs = load_viewkeeper_dbs(a)
    data = os.path.join(OUT, "viewkeeper-data")
    shutil.rmtree(data, ignore_errors=True)
    http_port = free_port()
    env = vk_env(dbs, port, data, http_port)
    cfg = os.path.join(REPO, "config", "shop.toml")
    out = {w: {} for w in ("backfill", "stream-orders", "fan-out", "stream-cache")}

    log("viewkeeper: backfill")
    EP.reset_watch()
    docs0 = EP.docs
    t0 = time.monotonic()
    with profiled("backfill"):
        bf = Proc("viewkeeper-backfill", [VK_BIN, "backfill", "--config", cfg], env=env)
        rc = bf.wait(a.timeout * 4)
    took = time.monotonic() - t0
    bf.stop()
    if rc != 0:
        raise SystemExit(f"bench: viewkeeper backfill failed ({rc}):\n{bf.tail()}")
    docs = EP.docs - docs0
    out["backfill"] = {"orders": a.orders, "docs": docs, "seconds": round(took, 2),
                       "docs_per_s": r1(a.orders / took), "rss_mb": bf.peak_mb(), "state_mb": dir_mb(data),
                       "cpu_s": bf.exit_cpu_s}

    w = Proc("viewkeeper-run", [VK_BIN, "run", "--config", cfg], env=env)
    try:
        # Up (/healthz), then streaming: the probe's change is visible.
        if not wait_for("viewkeeper /healthz", lambda: http_ok(f"http://127.0.0.1:{http_port}/healthz"), 60, w, poll=0.05):
            raise SystemExit(f"bench: viewkeeper not up within 60 s:\n{w.tail()}")
        probe(dbs["ordering"], "orders", "bprobe", w, 60)
        log("viewkeeper: stream-orders")
        m0 = vk_metrics(http_port)
        with profiled("stream-orders"):
            out["stream-orders"] = measure_stream_orders(dbs["ordering"], "orders", a, "v", w)
        m1 = vk_metrics(http_port)
        out["stream-orders"]["worker_metrics"] = delta(m1, m0)
        out["stream-orders"]["state_mb"] = dir_mb(data)
        log("viewkeeper: fan-out")
        out["fan-out"] = {}
        for pid, n in ((1, "small"), (2, "large")):
            with profiled(f"fan-out-{n}"):
                out["fan-out"][n] = repeat_fanout(
                    a, n, lambda i: measure_fanout_split(dbs, pid, f"renamed-v{pid}-{i}", a, w))
        out["fan-out"]["state_mb"] = dir_mb(data)
        log("viewkeeper: stream-cache (and the pg_recvlogical baseline over the same changes)")
        slot = "bench_recvlogical"
        sql(dbs["catalog"], f"SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")
        m0 = vk_metrics(http_port)
        with profiled("stream-cache"):
            res, end_lsn = measure_stream_cache(dbs["catalog"], a, w)
        out["stream-cache"] = res
        out["stream-cache"]["worker_metrics"] = delta(vk_metrics(http_port), m0)
        out["stream-cache"]["state_mb"] = dir_mb(data)
    finally:
        w.stop()
    baselines["pg_recvlogical"] = recvlogical(dbs["catalog"], slot, end_lsn, a)
    results["viewkeeper"] = out


BULK_CONFIG = """\
data_dir = "{data}"

[sources.bulk]
kind = "postgres"
url = "{url}"
slot = "bench_bulk"
publication = "bench_bulk"
snapshot = "never"

[tables.products]
source = "bulk"
name = "public.products"

[sinks.cache]
kind = "redis"
url = "redis://127.0.0.1:{redis_port}/{redis_db}"

[projections.bulk_products]
root = "products"
sink = "cache"
key = "bulk:product:{{id}}"
fields = ["sku", "name", "price", "status"]

[http]
listen = "127.0.0.1:{http_port}"
"""


def run_big_transaction(a, results):
    """big-transaction: one UPDATE of `a.big_transaction` rows of a table of that size, streamed
    (snapshot = "never": the worker meets every row first in that transaction) into a Redis
    cache. `seconds` = from the COMMIT to the slot confirming the commit's LSN (the worker
    acknowledges only what the state store and Redis made durable); `rss_mb` = the worker's
    peak over the workload."""
    db, n = "bench_bulk", a.big_transaction
    for s in sql("postgres", f"SELECT slot_name FROM pg_replication_slots WHERE database = '{db}'"):
        sql("postgres", f"SELECT pg_drop_replication_slot('{s[0]}')")
    sql("postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)", f"CREATE DATABASE {db}")
    ddl = table_ddl()["products"]
    log(f"viewkeeper: big-transaction: loading {n:,} products")
    sql(db, *[d.format(t="products") for d in ddl],
        f"INSERT INTO products(id, sku, name, description, price, status, updated_at)"
        f" SELECT g, 'SKU-' || g, 'Product ' || g, 'A fine product', 10, 'active', now()"
        f" FROM generate_series(1, {n}) g", "ANALYZE products")
    data = os.path.join(OUT, "viewkeeper-bulk-data")
    shutil.rmtree(data, ignore_errors=True)
    http_port = free_port()
    cfg = os.path.join(OUT, "bulk.toml")
    with open(cfg, "w") as f:
        f.write(BULK_CONFIG.format(data=data, url=pg_url(db), redis_port=REDIS_PORT, redis_db=REDIS_DB + 2,
                                   http_port=http_port))
    r = redislib.Redis(host="127.0.0.1", port=REDIS_PORT, db=REDIS_DB + 2)
    r.flushdb()
    env = dict(os.environ)
    env.pop("RUST_LOG", None)
    w = Proc("viewkeeper-bulk", [VK_BIN, "run", "--config", cfg], env=env)
    try:
        if not wait_for("viewkeeper (bulk) /readyz", lambda: http_ok(f"http://127.0.0.1:{http_port}/readyz"), 60, w,
                        poll=0.05):
            raise SystemExit(f"bench: viewkeeper (bulk) not ready within 60 s:\n{w.tail()}")
        w.reset_peak()
        log(f"viewkeeper: big-transaction: UPDATE of {n:,} rows")
        with profiled("big-transaction"):
            t0 = time.monotonic()
            with cursor(db) as cur:
                cur.execute("UPDATE products SET price = price + 1, updated_at = now()")
            committed = time.monotonic()
            with cursor(db) as cur:
                cur.execute("SELECT pg_current_wal_lsn()::text")
                end_lsn = cur.fetchone()[0]

            def confirmed():
                row = sql("postgres", "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots"
                          " WHERE slot_name = 'bench_bulk'", params=(end_lsn,))
                return bool(row and row[0][0])

            finished = wait_for("big-transaction", confirmed, a.timeout * 4, w, poll=0.1)
            done = time.monotonic()
        sample = [1, n // 2, n]
        prices = [r.hget(f"bulk:product:{i}", "price") for i in sample]
        out = {"rows": n, "completed": finished and all(p == b"11.00" for p in prices),
               "seconds": r1(done - committed), "update_statement_seconds": r1(committed - t0),
               "changes_per_s": r1(n / max(done - committed, 1e-6)), "rss_mb": w.peak_mb(),
               "state_mb": dir_mb(data), "sample_prices": [p.decode() if p else None for p in prices]}
    finally:
        w.stop()
    sql("postgres", f"SELECT pg_drop_replication_slot('bench_bulk')")
    sql("postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    r.flushdb()
    results.setdefault("viewkeeper", {})["big-transaction"] = out


def repeat_fanout(a, size, run):
    """A fan-out is one event: repeat it (renaming the product again) and report the median."""
    runs = [run(i) for i in range(a.fanout_repeats if size == "small" else max(1, a.fanout_repeats // 2))]
    out = dict(runs[len(runs) // 2])
    done = [r["visible_ms"] for r in runs if r["completed"]]
    out["completed"] = len(done) == len(runs)
    out["visible_ms"] = r1(statistics.median(done)) if done else None
    out["runs_visible_ms"] = [r["visible_ms"] for r in runs]
    out["rss_mb"] = max(r["rss_mb"] for r in runs)
    return out


def measure_fanout_split(dbs, pid, marker, a, proc):
    """fan-out over the per-service databases: the product lives in catalog, the lines in
    ordering."""
    with cursor(dbs["ordering"]) as cur:
        cur.execute("SELECT count(DISTINCT order_id) FROM order_items WHERE product_id = %s", (pid,))
        expected = cur.fetchone()[0]
    return fanout_common(dbs["catalog"], "products", pid, marker, expected, a, proc)


def fanout_common(db, products_table, pid, marker, expected, a, proc):
    EP.reset_watch()
    proc.reset_peak()
    conn = psycopg2.connect(host="127.0.0.1", port=PG_PORT, user="postgres", dbname=db)
    cur = conn.cursor()
    cur.execute(f"UPDATE {products_table} SET name = %s WHERE id = %s", (marker, pid))
    conn.commit()
    t = time.monotonic()
    conn.close()

    def done():
        with EP.lock:
            return len(EP.name_arrivals.get(marker, {})) >= expected

    finished = wait_for(f"fan-out {marker}", done, a.timeout, proc, poll=0.001)
    with EP.lock:
        arr = dict(EP.name_arrivals.get(marker, {}))
    return {"orders": expected, "visible": len(arr), "completed": finished,
            "visible_ms": r1((max(arr.values()) - t) * 1000) if finished else None,
            "first_visible_ms": r1((min(arr.values()) - t) * 1000) if arr else None,
            "rss_mb": proc.peak_mb()}


def recvlogical(db, slot, end_lsn, a):
    """The source limit: pg_recvlogical (pgoutput) reading the stream-cache changes to /dev/null."""
    argv = [f"{PG_BIN}/pg_recvlogical", "-h", "127.0.0.1", "-p", str(PG_PORT), "-U", "postgres", "-d", db,
            "--slot", slot, "--start", "--endpos", end_lsn, "--no-loop", "-o", "proto_version=1",
            "-o", f"publication_names={db}", "-f", "/dev/null"]
    t0 = time.monotonic()
    subprocess.run(argv, check=True, timeout=a.timeout)
    took = time.monotonic() - t0
    sql(db, f"SELECT pg_drop_replication_slot('{slot}')")
    return {"what": "pg_recvlogical --start (pgoutput) over the stream-cache transactions, to /dev/null",
            "changes": a.stream_cache, "seconds": round(took, 3), "changes_per_s": r1(a.stream_cache / took)}


# ------------------------------------------------------------------------------------------
# PGSync


def pgsync_schema(db, index):
    return [{
        "database": db, "index": index,
        "nodes": {
            "table": "orders", "schema": "ordering",
            "columns": ["id", "status", "total", "created_at", "updated_at", "shipping_address"],
            "children": [
                {"table": "customers", "schema": "identity", "label": "customer", "columns": ["id", "name", "email"],
                 "relationship": {"variant": "object", "type": "one_to_one",
                                  "foreign_key": {"child": ["id"], "parent": ["customer_id"]}}},
                {"table": "order_items", "schema": "ordering", "label": "items",
                 "columns": ["line_no", "qty", "unit_price"],
                 "relationship": {"variant": "object", "type": "one_to_many",
                                  "foreign_key": {"child": ["order_id"], "parent": ["id"]}},
                 "children": [
                     {"table": "products", "schema": "catalog", "label": "product",
                      "columns": ["id", "sku", "name", "status"],
                      "relationship": {"variant": "object", "type": "one_to_one",
                                       "foreign_key": {"child": ["id"], "parent": ["product_id"]}}}]},
            ]}}]


def pgsync_env(port, ckpt):
    env = dict(os.environ)
    env.update({
        "PG_HOST": "127.0.0.1", "PG_PORT": str(PG_PORT), "PG_USER": "postgres", "PG_PASSWORD": "",
        "ELASTICSEARCH_HOST": "127.0.0.1", "ELASTICSEARCH_PORT": str(port), "ELASTICSEARCH_SCHEME": "http",
        "ELASTICSEARCH": "true", "OPENSEARCH": "false",
        # Loopback: compressing bulk bodies would only cost PGSync CPU.
        "ELASTICSEARCH_HTTP_COMPRESS": "false",
        "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(REDIS_PORT), "REDIS_DB": str(REDIS_DB + 1),
        "CHECKPOINT_PATH": ckpt, "CONSOLE_LOGGING_HANDLER_MIN_LEVEL": "WARNING",
    })
    return env


def run_pgsync(a, port, results):
    db, names = load_pgsync_db(a)
    index = "orders_view_pgsync"
    d = os.path.join(OUT, "pgsync")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    schema = os.path.join(d, "schema.json")
    with open(schema, "w") as f:
        json.dump(pgsync_schema(db, index), f, indent=1)
    redislib.Redis(host="127.0.0.1", port=REDIS_PORT, db=REDIS_DB + 1).flushdb()
    env = pgsync_env(port, d)
    bindir = os.path.dirname(sys.executable)
    out = {}
    log("pgsync: bootstrap")
    subprocess.run([f"{bindir}/bootstrap", "--config", schema], env=env, check=True, cwd=d,
                   stdout=open(os.path.join(OUT, "pgsync-bootstrap.log"), "ab"), stderr=subprocess.STDOUT)
    log("pgsync: backfill")
    docs0 = EP.docs
    t0 = time.monotonic()
    bf = Proc("pgsync-backfill", [f"{bindir}/pgsync", "--config", schema], env=env, cwd=d)
    rc = bf.wait(a.timeout * 4)
    took = time.monotonic() - t0
    bf.stop()
    if rc != 0:
        raise SystemExit(f"bench: pgsync backfill failed ({rc}):\n{bf.tail()}")
    out["backfill"] = {"orders": a.orders, "docs": EP.docs - docs0, "seconds": round(took, 2),
                       "docs_per_s": r1(a.orders / took), "rss_mb": bf.peak_mb(), "state_mb": dir_mb(d),
                       "cpu_s": bf.exit_cpu_s}
    w = Proc("pgsync-daemon", [f"{bindir}/pgsync", "--config", schema, "--daemon"], env=env, cwd=d)
    try:
        probe(db, names["orders"], "bprobe", w, 120)
        log("pgsync: stream-orders")
        out["stream-orders"] = measure_stream_orders(db, names["orders"], a, "p", w)
        out["stream-orders"]["state_mb"] = dir_mb(d)
        log("pgsync: fan-out")
        out["fan-out"] = {}
        for pid, n in ((1, "small"), (2, "large")):
            with cursor(db) as cur:
                cur.execute(f"SELECT count(DISTINCT order_id) FROM {names['order_items']} WHERE product_id = %s",
                            (pid,))
                expected = cur.fetchone()[0]
            out["fan-out"][n] = repeat_fanout(
                a, n, lambda i: fanout_common(db, names["products"], pid, f"renamed-p{pid}-{i}", expected, a, w))
        out["fan-out"]["state_mb"] = dir_mb(d)
    finally:
        w.stop()
    out["stream-cache"] = {"skipped": "PGSync has no cache (Redis) sink"}
    results["pgsync"] = out


# ------------------------------------------------------------------------------------------
# Baselines and reference figures


def redis_benchmark(a):
    n = 1000000 if not a.quick else 200000
    argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(REDIS_PORT), "--dbnum", str(REDIS_DB + 2),
            "-t", "hset", "-n", str(n), "-P", "64", "-r", "100000", "--csv"]
    outp = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=a.timeout).stdout
    rps = None
    for line in outp.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0].upper().startswith("HSET"):
            rps = float(cells[1])
    redislib.Redis(host="127.0.0.1", port=REDIS_PORT, db=REDIS_DB + 2).flushdb()
    return {"what": "redis-benchmark -t hset -P 64 (pipelined HSET, same server)", "requests": n,
            "ops_per_s": rps}


def opensearch_reference(a):
    """The OpenSearch-compatible test server's own figures (for reference only): viewkeeper's
    backfill of a small shop into it, and a 300-order fan-out."""
    small = argparse.Namespace(**vars(a))
    small.orders, small.customers, small.products, small.fanout = 2000, 200, 100, [300, 300]
    dbs = {s: f"bench_{s}" for s in ("identity", "catalog", "ordering")}
    load_viewkeeper_dbs(small)
    data = os.path.join(OUT, "viewkeeper-os-data")
    shutil.rmtree(data, ignore_errors=True)
    http_port = free_port()
    env = vk_env(dbs, 0, data, http_port)
    env["VIEWKEEPER__SINKS__SEARCH__URL"] = f"http://127.0.0.1:{OS_PORT}"
    env["VIEWKEEPER__PROJECTIONS__ORDERS_VIEW__INDEX__ALIAS"] = "bench_orders_view"
    req = urllib.request.Request(f"http://127.0.0.1:{OS_PORT}/bench_orders_view_v*", method="DELETE")
    try:
        urllib.request.urlopen(req, timeout=10)
    except Exception:
        pass
    cfg = os.path.join(REPO, "config", "shop.toml")
    t0 = time.monotonic()
    bf = Proc("viewkeeper-os-backfill", [VK_BIN, "backfill", "--config", cfg], env=env)
    rc = bf.wait(a.timeout * 4)
    took = time.monotonic() - t0
    bf.stop()
    if rc != 0:
        return {"error": f"backfill into the OpenSearch-compatible server failed: {bf.tail(5)}"}
    return {"what": "viewkeeper backfill of 2,000 orders into the OpenSearch-compatible test server (osmem)",
            "orders": small.orders, "seconds": round(took, 2), "docs_per_s": r1(small.orders / took)}


def machine():
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal"):
            mem = int(line.split()[1]) // 1024
    def ver(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except Exception:
            return None
    try:
        import importlib.metadata as md
        pgsync_v = md.version("pgsync")
    except Exception:
        pgsync_v = None
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_mb": mem, "kernel": platform.release(),
            "postgres": ver([f"{PG_BIN}/postgres", "--version"]), "redis": ver(["redis-server", "--version"]),
            "viewkeeper": ver([VK_BIN, "--version"]),
            "viewkeeper_commit": ver(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]),
            "pgsync": pgsync_v, "python": platform.python_version()}


def ratio(a, b):
    return None if not a or not b else round(a / b, 2)


def table(res):
    base = res["baselines"]
    rows = []
    def g(w, tool, *path):
        v = res["workloads"].get(w, {}).get(tool, {})
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        return v
    rows.append(("backfill docs/s", g("backfill", "viewkeeper", "docs_per_s"), g("backfill", "pgsync", "docs_per_s")))
    rows.append(("backfill seconds", g("backfill", "viewkeeper", "seconds"), g("backfill", "pgsync", "seconds")))
    rows.append(("backfill peak RSS MB", g("backfill", "viewkeeper", "rss_mb"), g("backfill", "pgsync", "rss_mb")))
    for k in ("changes_per_s", "live_changes_per_s", "live_lag_p50_ms", "live_lag_p99_ms", "rss_mb"):
        rows.append((f"stream-orders {k}", g("stream-orders", "viewkeeper", k), g("stream-orders", "pgsync", k)))
    for n in ("small", "large"):
        rows.append((f"fan-out {n} ({g('fan-out', 'viewkeeper', n, 'orders')} orders) visible_ms",
                     g("fan-out", "viewkeeper", n, "visible_ms"), g("fan-out", "pgsync", n, "visible_ms")))
    for k in ("changes_per_s", "live_changes_per_s", "live_lag_p50_ms", "live_lag_p99_ms", "rss_mb"):
        rows.append((f"stream-cache {k}", g("stream-cache", "viewkeeper", k), None))
    for k in ("seconds", "changes_per_s", "rss_mb"):
        rows.append((f"big-transaction {k}", g("big-transaction", "viewkeeper", k), None))
    lines = [f"{'':44} {'viewkeeper':>12} {'pgsync':>12} {'ratio':>8}"]
    for name, v, p in rows:
        rt = ratio(v, p) if v is not None and p is not None else None
        if rt is not None and any(w in name.lower() for w in ("_ms", "seconds", "rss")):
            rt = ratio(p, v)  # lower is better: how many times better viewkeeper is
        lines.append(f"{name:44} {str(v):>12} {str(p):>12} {str(rt) + 'x' if rt else '':>8}")
    lines.append("")
    for k, v in base.items():
        lines.append(f"baseline {k}: {json.dumps(v)}")
    for k, v in res.get("ratios", {}).items():
        lines.append(f"ratio {k}: {v}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (the big transaction stays 2,000,000 rows: --big-transaction 0 skips it)")
    ap.add_argument("--orders", type=int)
    ap.add_argument("--customers", type=int)
    ap.add_argument("--products", type=int)
    ap.add_argument("--stream-orders", type=int)
    ap.add_argument("--stream-cache", type=int)
    ap.add_argument("--fanout-large", type=int)
    ap.add_argument("--big-transaction", type=int, default=2000000, help="rows of the one big UPDATE (0: skip)")
    ap.add_argument("--fanout-repeats", type=int, default=5,
                    help="renames of the 300-order product (half as many of the large one); the median counts")
    ap.add_argument("--timeout", type=float, help="seconds to wait for one workload to become visible")
    ap.add_argument("--only", choices=["viewkeeper", "pgsync"], help="run one tool (debugging)")
    ap.add_argument("--no-reference", action="store_true", help="skip the OpenSearch-compatible server's figures")
    a = ap.parse_args()
    q = a.quick
    a.orders = a.orders or (20000 if q else 100000)
    a.customers = a.customers or (2000 if q else 10000)
    a.products = a.products or 1000
    a.stream_orders = a.stream_orders or (10000 if q else 20000)
    a.stream_cache = a.stream_cache or (40000 if q else 200000)
    a.fanout = [300, a.fanout_large or 10000]
    a.timeout = a.timeout or (180 if q else 600)
    if a.orders < 300 + a.fanout[1] or a.stream_orders > a.orders or a.products < 10:
        ap.error("need orders >= 300 + fanout-large, stream-orders <= orders, products >= 10")
    os.makedirs(OUT, exist_ok=True)
    redislib.Redis(host="127.0.0.1", port=REDIS_PORT, db=REDIS_DB).flushdb()
    port = start_endpoint()
    log(f"bulk-acknowledging endpoint on 127.0.0.1:{port}")
    res = {"machine": machine(),
           "sizes": {"orders": a.orders, "customers": a.customers, "products": a.products,
                     "items_per_order": 3, "stream_orders": a.stream_orders, "stream_orders_tx_rows": TX_ROWS,
                     "stream_cache": a.stream_cache, "fan_out": a.fanout, "quick": q},
           "search_side": "both tools write to the bulk-acknowledging HTTP endpoint of scripts/bench.py "
                          "(answers _bulk with per-item success, counts documents); 'visible' = received by it",
           "workloads": {}, "baselines": {}}
    per_tool = {}
    if a.only in (None, "viewkeeper"):
        run_viewkeeper(a, port, per_tool, res["baselines"])
    if a.only in (None, "pgsync"):
        run_pgsync(a, port, per_tool)
    if a.only in (None, "viewkeeper") and a.big_transaction:
        run_big_transaction(a, per_tool)
    for w in ("backfill", "stream-orders", "fan-out", "stream-cache", "big-transaction"):
        ran = {t: per_tool[t][w] for t in ("viewkeeper", "pgsync") if w in per_tool.get(t, {})}
        if ran:
            res["workloads"][w] = ran
    log("baselines: redis-benchmark")
    res["baselines"]["redis_hset"] = redis_benchmark(a)
    if not a.no_reference:
        log("reference: the OpenSearch-compatible server")
        res["baselines"]["opensearch_reference"] = opensearch_reference(a)
    W = res["workloads"]
    def get(w, t, *p):
        v = W.get(w, {}).get(t)
        for k in p:
            v = v.get(k) if isinstance(v, dict) else None
        return v
    res["ratios"] = {
        "stream_cache_vs_pg_recvlogical": ratio(get("stream-cache", "viewkeeper", "changes_per_s"),
                                                res["baselines"].get("pg_recvlogical", {}).get("changes_per_s")),
        "stream_orders_vs_pgsync": ratio(get("stream-orders", "viewkeeper", "changes_per_s"),
                                         get("stream-orders", "pgsync", "changes_per_s")),
        "stream_orders_live_vs_pgsync": ratio(get("stream-orders", "viewkeeper", "live_changes_per_s"),
                                              get("stream-orders", "pgsync", "live_changes_per_s")),
        "stream_cache_live_vs_pg_recvlogical": ratio(get("stream-cache", "viewkeeper", "live_changes_per_s"),
                                                     res["baselines"].get("pg_recvlogical", {}).get("changes_per_s")),
        "backfill_vs_pgsync": ratio(get("backfill", "viewkeeper", "docs_per_s"), get("backfill", "pgsync", "docs_per_s")),
        "fan_out_small_speedup_vs_pgsync": ratio(get("fan-out", "pgsync", "small", "visible_ms"),
                                                 get("fan-out", "viewkeeper", "small", "visible_ms")),
        "fan_out_large_speedup_vs_pgsync": ratio(get("fan-out", "pgsync", "large", "visible_ms"),
                                                 get("fan-out", "viewkeeper", "large", "visible_ms")),
    }
    if EP.unknown:
        res["endpoint_unsupported_calls"] = EP.unknown[:20]
    path = os.path.join(OUT, "results.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    txt = table(res)
    with open(os.path.join(OUT, "results.txt"), "w") as f:
        f.write(txt + "\n")
    print(txt)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
