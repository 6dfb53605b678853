"""Scenario 6: security.

* A real worker end to end over Kafka SASL/PLAIN (``infra_factory(sasl=True)``) and Redis
  AUTH (``CLV_INFRA_REDIS_PASSWORD``), everything configured through Settings: without
  credentials Redis refuses; the final state equals the offline fold (review texts embedded
  by a toy encoder); neither password appears in the worker's log, its /metrics page or its
  command line; raw review text (unique marker words) is nowhere in Redis.
* Redis over TLS (the ``redis_tls_ca`` path, with AUTH), against a TLS redis-server the test
  starts itself: the store works with the CA, fails without it.
* Kafka SSL / SASL_SSL settings reach every client (aiokafka kwargs, Faust credentials, the
  lag reader), and Settings never print their secrets.
* The lookup API (``clv serve``) is read-only: every route, odd ids and write verbs included,
  leaves every key byte-identical, and Redis MONITOR shows only commands Redis itself flags
  as non-writing; /v1 and /ops/data need the bearer token.
* No pickle anywhere: the repo's Python never imports pickle-family modules, never calls
  torch.save / to_pickle / read_pickle, never passes allow_pickle=True; no pickle-format
  artifacts are tracked.
"""
from __future__ import annotations

import ast
import asyncio
import itertools
import json
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import redis

from serving.registry import Registry
from serving.scorer import Scorer
from streams.events import parse
from streams.settings import Settings
from streams.simulate import simulate
from tests.chaos.harness import (
    archived_events, assert_archive_complete, compare_state, publish_sync, reference,
    scrape_text, wait_caught_up, wait_metrics,
)
from tests.chaos.models import register
from tests.conftest import REPO, SASL_PASSWORD, free_ports
from tests.integration.worker_proc import WorkerProc

pytestmark = [pytest.mark.chaos]
REDIS_PASSWORD = "redis-pw-" + uuid.uuid4().hex  # unique: grep-able in logs


# ---- helpers ---------------------------------------------------------------------------------
def _redis_dump(r) -> dict:
    """Every key of the client's db with its DUMP bytes and TTL (byte-exact snapshot)."""
    return {k: (r.dump(k), r.pttl(k)) for k in r.scan_iter(count=1000)}


def _redis_values(r) -> list[bytes]:
    """Every key, field, member and value in the db, whatever the type."""
    out: list[bytes] = []
    for k in r.scan_iter(count=1000):
        out.append(k)
        t = r.type(k).decode()
        if t == "string":
            out.append(r.get(k))
        elif t == "hash":
            for f, v in r.hgetall(k).items():
                out += [f, v]
        elif t == "zset":
            out += [m for m, _ in r.zrange(k, 0, -1, withscores=True)]
        elif t == "set":
            out += list(r.smembers(k))
        elif t == "list":
            out += r.lrange(k, 0, -1)
        elif t == "stream":
            for _id, fields in r.xrange(k):
                for f, v in fields.items():
                    out += [f, v]
        else:  # pragma: no cover - a new type would need handling here
            raise AssertionError(f"unexpected Redis type {t} for {k!r}")
    return [v for v in out if v is not None]


def _marker_reviews(users: list[str], ts: float, n: int) -> tuple[list, list[str]]:
    markers, evs = [], []
    for i in range(n):
        mark = f"zqx{uuid.uuid4().hex[:12]}"
        markers.append(mark)
        text = (f"Bought it for my {mark} kitchen. " * (1 + i % 40)).strip()
        evs.append(parse({"schema": 1, "event_id": f"mark-{i}-{mark}", "user_id": users[i % len(users)],
                          "ts": ts + i, "type": "review", "item_id": "home-001",
                          "rating": 1 + i % 5, "text": text}))
    return evs, markers


# ---- worker end to end over SASL + AUTH ------------------------------------------------------
@pytest.mark.integration
def test_worker_over_sasl_and_redis_auth_keeps_secrets_and_text_out(infra_factory, tmp_path, engine):
    stack = infra_factory("kafka", sasl=True)
    stack.env["CLV_INFRA_REDIS_PASSWORD"] = REDIS_PASSWORD
    stack.start("redis")  # requirepass
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(stack.redis_url).ping()

    port = free_ports(1)[0]
    topics = stack.unique_topics("sec")
    s = stack.sasl_settings(**topics, redis_prefix=topics["consumer_group"], redis_password=REDIS_PASSWORD,
                            data_dir=tmp_path / "var", archive_within_s=0.5, batch_within_s=0.02,
                            model_poll_s=1.0, worker_web_port=port, engine=engine)
    assert s.kafka_security_protocol == "SASL_PLAINTEXT" and s.kafka_sasl_password is not None
    reg = Registry(s.models_dir)
    register(reg, "sec-m1", "good", champion=True, encoder=True)
    sim = simulate(n_users=80, start="2025-01-01", days=100, seed=6)
    events = list(itertools.islice(sim.iter_events(), 4000))
    users = sorted({e.user_id for e in events})
    marked, markers = _marker_reviews(users, events[-1].ts, 120)
    events = events + marked

    r = redis.Redis.from_url(s.redis_url, password=REDIS_PASSWORD)
    log = tmp_path / "worker.log"
    w = WorkerProc(s, log, metrics=True)
    try:
        w.start()
        wait_metrics(port)
        publish_sync(events, s)  # through the SASL listener
        wait_caught_up(s, r, [w], timeout=300, min_events=len(events))
        # the state, text embeddings included, equals the offline fold of the archive
        encoder = Scorer(reg.path("sec-m1"), ["CPUExecutionProvider"])
        archived = archived_events(s, expected=len(events))
        assert_archive_complete(archived, events)
        cmp = compare_state(s, reference(archived, embed=lambda t: encoder.encode([t])[0]), r)
        assert cmp.ok and cmp.lost == 0 and cmp.doubled == 0, cmp.summary()
        n_emb = sum(1 for u in users if r.hexists(f"{s.redis_prefix}:v1:u:{u}", "e"))
        assert n_emb > 0, "no review text went through the encoder"

        # secrets: not in the log, not on the metrics page, not on the command line
        metrics_page = scrape_text(port)
        cmdline = Path(f"/proc/{w.proc.pid}/cmdline").read_bytes()
        text = log.read_text(errors="replace")
        for secret in (REDIS_PASSWORD, SASL_PASSWORD):
            assert secret not in text, f"a password is in the worker log {log}"
            assert secret not in metrics_page, "a password is on the /metrics page"
            assert secret.encode() not in cmdline, "a password is on the worker's command line"
        # raw review text: nowhere in Redis (the archive keeps it for the trainer, by design)
        blob = b"\n".join(_redis_values(r))
        leaked = [m for m in markers if m.encode() in blob]
        assert not leaked, f"{len(leaked)} review texts found in Redis, e.g. {leaked[:3]}"
        assert not any(m in text for m in markers), "review text written to the worker log"
        print("\n[chaos security] " + json.dumps({"events": len(events), "marker_reviews": len(markers),
                                                  "users_with_embedding": n_emb, "users": cmp.users}))
    finally:
        w.stop()


# ---- Redis TLS --------------------------------------------------------------------------------
def _tls_certs(d: Path) -> dict[str, Path]:
    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=clv-chaos-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.crt",
        "-days", "2", "-subj", "/CN=some-other-ca")
    return {n: d / f"{n}.crt" for n in ("ca", "server", "other")}


def _wait_port(port: int, proc, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)


def test_redis_over_tls_with_auth_through_settings(tmp_path):
    if not shutil.which("openssl") or not shutil.which("redis-server"):
        pytest.skip("needs openssl and redis-server")
    certs = _tls_certs(tmp_path)
    port = free_ports(1)[0]
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(certs["server"]), "--tls-key-file", str(tmp_path / "server.key"),
         "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "no", "--requirepass",
         REDIS_PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=open(tmp_path / "redis.log", "w"), stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc)
        if proc.poll() is not None:
            pytest.skip(f"this redis-server has no TLS: {(tmp_path / 'redis.log').read_text()[-300:]}")
        from streams.fold import new_state
        from streams.store import RedisStore, Score, Update, redis_client

        url = f"rediss://127.0.0.1:{port}/0"
        good = Settings(_env_file=None, redis_url=url, redis_password=REDIS_PASSWORD,
                        redis_tls_ca=certs["ca"], redis_prefix="tls")

        async def roundtrip(settings):
            store = RedisStore.from_settings(settings)
            try:
                await store.write_meta()
                assert await store.save_many([Update("u1", new_state(), 0, Score(1.0, 0.5, "low", "m", 1.0))]) == []
                return await store.score_of("u1")
            finally:
                await store.r.aclose()

        assert asyncio.run(roundtrip(good)).clv == 1.0
        assert redis_client(good, sync=True).ping()
        for bad in (good.model_copy(update={"redis_tls_ca": certs["other"]}),  # wrong CA
                    good.model_copy(update={"redis_password": None})):  # no AUTH
            with pytest.raises((redis.ConnectionError, redis.AuthenticationError, redis.ResponseError)):
                redis_client(bad, sync=True).ping()
        assert REDIS_PASSWORD not in repr(good) and REDIS_PASSWORD not in str(good.model_dump())
    finally:
        proc.terminate()
        proc.wait(10)


# ---- Kafka SSL settings reach every client ----------------------------------------------------
def test_kafka_ssl_and_sasl_settings_reach_every_client(tmp_path):
    import faust

    from streams.kafka import client_kwargs, faust_credentials

    if not shutil.which("openssl"):
        pytest.skip("needs openssl")
    ca = _tls_certs(tmp_path)["ca"]
    for proto in ("SSL", "SASL_SSL", "SASL_PLAINTEXT"):
        s = Settings(_env_file=None, kafka_security_protocol=proto, kafka_ssl_cafile=ca,
                     kafka_sasl_username="clv", kafka_sasl_password="kafka-pw-secret")
        for kw in (client_kwargs(s),):  # the one builder every aiokafka client uses (lag too)
            assert kw["security_protocol"] == proto
            if "SSL" in proto:
                ctx = kw["ssl_context"]
                assert ctx.verify_mode.name == "CERT_REQUIRED" and ctx.check_hostname
                assert any("clv-chaos-ca" in str(c.get("subject")) for c in ctx.get_ca_certs())
            else:
                assert "ssl_context" not in kw
            if proto.startswith("SASL"):
                assert kw["sasl_mechanism"] == "PLAIN" and kw["sasl_plain_username"] == "clv"
                assert kw["sasl_plain_password"] == "kafka-pw-secret"
        cred = faust_credentials(s)
        if proto.startswith("SASL"):
            assert isinstance(cred, faust.SASLCredentials)
            assert cred.username == "clv" and cred.password == "kafka-pw-secret"
            assert (cred.ssl_context is not None) == ("SSL" in proto)
        else:
            assert isinstance(cred, faust.SSLCredentials) and cred.context is not None
        for shown in (repr(s), str(s), s.model_dump_json()):
            assert "kafka-pw-secret" not in shown


# ---- the lookup API is read-only and needs its token ------------------------------------------
READ_ONLY_EXTRA = {"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro"}  # scripts: never


@pytest.mark.integration
def test_lookup_api_is_read_only_and_enforces_its_token(services, tmp_path):
    from streams.fold import new_state
    from streams.store import RedisStore, Score, Update
    from tests.integration.ops_helpers import serve, stop

    token = "api-token-" + uuid.uuid4().hex
    db = 7
    s = services.settings(redis_url=services.redis_url.rsplit("/", 1)[0] + f"/{db}",
                          redis_prefix=f"api{uuid.uuid4().hex[:6]}", api_token=token,
                          data_dir=tmp_path / "var")
    r = redis.Redis.from_url(s.redis_url)
    r.flushdb()

    async def populate():
        store = RedisStore.from_settings(s)
        sim = simulate(n_users=20, start="2025-01-01", days=60, seed=8)
        from streams.fold import apply
        states = {}
        for ev in sim.iter_events():
            apply(states.setdefault(ev.user_id, new_state()), ev)
        await store.write_meta()
        await store.save_many([Update(u, st, 0, Score(10.0 + i, 0.5, "mid", "m-api", 1.7e9))
                               for i, (u, st) in enumerate(sorted(states.items()))])
        await store.r.aclose()
        return sorted(states)

    users = asyncio.run(populate())
    before = _redis_dump(r)
    monitor_log = tmp_path / "monitor.log"
    mon = subprocess.Popen(["redis-cli", "-h", "127.0.0.1", "-p", services.env["CLV_INFRA_REDIS_PORT"],
                            "monitor"], stdout=open(monitor_log, "w"), stderr=subprocess.STDOUT)
    proc, base = serve(s, tmp_path / "api.log")
    auth = {"Authorization": f"Bearer {token}"}
    try:
        time.sleep(0.5)
        odd = ["u1\r\nFLUSHALL", "*", "../../meta", "clv:v1:stats", "x" * 256, "u 1", "ü-ñ"]
        with httpx.Client(base_url=base, timeout=30) as c:
            ok = [c.get(f"/v1/users/{users[0]}/clv", headers=auth),
                  c.get(f"/v1/users/{users[1]}/clv", params={"features": "true"}, headers=auth),
                  c.post("/v1/users/clv:batch", json={"user_ids": users + ["ghost"]}, headers=auth),
                  c.get("/v1/clv", params={"ids": ",".join(users[:5])}, headers=auth),
                  c.get("/ops/data", headers=auth)]
            assert all(x.status_code == 200 for x in ok), [(x.request.url, x.status_code, x.text[:200]) for x in ok]
            assert ok[0].json()["model_version"] == "m-api"
            for path in ("/healthz", "/readyz", "/metrics", "/ops", "/docs", "/openapi.json"):
                assert c.get(path).status_code == 200, path
            for uid in odd:
                resp = c.get(f"/v1/users/{quote(uid, safe='')}/clv", headers=auth)
                assert resp.status_code in (404, 422), (uid, resp.status_code, resp.text[:200])
            assert c.post("/v1/users/clv:batch", json={"user_ids": odd}, headers=auth).status_code in (200, 422)
            assert c.post("/v1/users/clv:batch", content=b"\x00not json", headers=auth).status_code == 422
            # write verbs on every route: refused by the router, never reach Redis
            for path in (f"/v1/users/{users[0]}/clv", "/v1/clv", "/v1/users/clv:batch", "/ops/data", "/readyz"):
                for verb in ("PUT", "DELETE", "PATCH"):
                    assert c.request(verb, path, headers=auth, json={"clv": 1e9}).status_code == 405, (verb, path)
            assert c.post(f"/v1/users/{users[0]}/clv", headers=auth, json={"clv": 1e9}).status_code == 405
            # the token: required on /v1 and /ops/data, the right one only
            for hdr in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token},
                        {"Authorization": f"Basic {token}"}):
                for resp in (c.get(f"/v1/users/{users[0]}/clv", headers=hdr),
                             c.get(f"/v1/users/{users[0]}/clv", params={"features": "true"}, headers=hdr),
                             c.post("/v1/users/clv:batch", json={"user_ids": users[:2]}, headers=hdr),
                             c.get("/v1/clv", params={"ids": users[0]}, headers=hdr),
                             c.get("/ops/data", headers=hdr)):
                    assert resp.status_code == 401, (hdr, resp.request.url, resp.status_code)
                    assert resp.json()["error"] == "unauthorized" and "m-api" not in resp.text
        time.sleep(0.5)
    finally:
        stop(proc)
        mon.terminate()
        mon.wait(10)
    after = _redis_dump(r)
    assert after == before, f"the API changed Redis: {set(after) ^ set(before) or 'values changed'}"
    assert token not in (tmp_path / "api.log").read_text(errors="replace"), "the API logged its token"
    cmds: dict[str, int] = {}
    for line in monitor_log.read_text(errors="replace").splitlines():
        if f"[{db} " not in line:
            continue
        name = line.split("]", 1)[1].split('"')[1].lower()
        cmds[name] = cmds.get(name, 0) + 1
    assert cmds.get("hmget", 0) > 0, f"MONITOR saw no API lookups: {cmds}"
    writers = []
    for name in cmds:
        info = r.execute_command("COMMAND", "INFO", name).get(name)
        assert info is not None, f"Redis does not know the command {name!r}"
        flags = {f.decode() if isinstance(f, bytes) else f for f in info["flags"]}
        if "write" in flags or name in READ_ONLY_EXTRA:
            writers.append(name)
    assert not writers, f"the API sent writing commands to Redis: {writers} (all: {cmds})"
    print("\n[chaos api] " + json.dumps({"redis_commands": cmds, "keys": len(before)}))


# ---- no pickle anywhere -------------------------------------------------------------------------
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal",
                  "copyreg", "pickletools"}
PICKLE_FILES = {".pkl", ".pickle", ".joblib", ".pt", ".pth", ".ckpt", ".sav", ".npy_pickle"}


def _repo_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return [REPO / p for p in out if p and (REPO / p).is_file()]


def _pickle_uses(path: Path, tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")
            names = {a.name for a in node.names}
            if mod[0] in PICKLE_MODULES or "joblib" in mod or names & PICKLE_MODULES:
                found.append(f"{where} from {node.module} import {', '.join(sorted(names))}")
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            owner = fn.value.id if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) else ""
            if name in ("to_pickle", "read_pickle"):
                found.append(f"{where} .{name}()")
            if owner == "torch" and name == "save":
                found.append(f"{where} torch.save() (pickle format)")
            if owner == "torch" and name == "load":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    found.append(f"{where} torch.load() without weights_only=True")
            for k in node.keywords:
                if k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
                    found.append(f"{where} {name}(allow_pickle={ast.unparse(k.value)})")
    return found


def test_no_pickle_anywhere():
    files = _repo_files()
    py = [p for p in files if p.suffix == ".py"]
    assert len(py) > 30, f"found only {len(py)} Python files under {REPO}"
    found = []
    for p in py:
        try:
            tree = ast.parse(p.read_text(encoding="utf-8"), filename=str(p))
        except SyntaxError as exc:
            found.append(f"{p.relative_to(REPO)}: does not parse ({exc})")
            continue
        found += _pickle_uses(p, tree)
    found += [f"{p.relative_to(REPO)}: pickle-format artifact" for p in files if p.suffix.lower() in PICKLE_FILES]
    assert not found, "pickle in the repo (use ONNX / JSON / npz with allow_pickle=False / parquet):\n" + \
        "\n".join(found)


def test_the_pickle_scan_catches_what_it_must():
    """The scanner itself: each banned pattern in a snippet is reported."""
    snippets = {
        "import pickle": 1, "import joblib": 1, "from sklearn.externals import joblib": 1,
        "import dill as d": 1, "torch.save(m.state_dict(), 'm.pt')": 1, "torch.load('m.pt')": 1,
        "torch.load('m.pt', weights_only=True)": 0, "np.load('x.npy', allow_pickle=True)": 1,
        "np.load('x.npz', allow_pickle=False)": 0, "df.to_pickle('x')": 1, "pd.read_pickle('x')": 1,
        "shelves = {}": 0, "'import pickle'": 0,
    }
    for code, n in snippets.items():
        assert len(_pickle_uses(REPO / "x.py", ast.parse(code))) == n, code
