"""A chat application's backend for wsrelay: who may connect, read and say what.

The relay moves messages; this backend owns the application's rules and data. The
relay asks it over HTTP (docs/proxy.md) at the moments that matter:

    /relay/connect    who is this connection? (the browser's login cookie, forwarded)
    /relay/refresh    may it stay connected a little longer?
    /relay/subscribe  may it join this room?
    /relay/publish    may it say this? (each chat line is stored here, in SQLite)
    /relay/rpc        a request answered by the application (`history` of a room)

and the backend acts on users through the relay's server API (/admin/kick,
/admin/revoke). Users log in with POST /login, which sets a session cookie; the
relay runs with `--proxy-forward-cookies sid` so that cookie reaches /relay/*.

    pip install -r requirements.txt
    python app.py --port 5000 --relay-api http://127.0.0.1:8080 --relay-api-key KEY

The /relay/* endpoints trust the `user` the relay names: keep them reachable by the
relay only (a private network, or a reverse proxy that refuses them from outside).
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import datetime, timezone

from flask import Flask, abort, g, jsonify, redirect, render_template_string, request

app = Flask(__name__)
# Every body here is a small JSON object: anything larger is refused (413) before
# Flask reads it.
app.config["MAX_CONTENT_LENGTH"] = 16 * 1024

COOKIE = "sid"
SESSION_SECONDS = 30 * 24 * 3600
USER = re.compile(r"^[a-z0-9_.-]{1,32}$")  # user ids become channel names (#alice)
ROOM = re.compile(r"^chat:[A-Za-z0-9_.@-]{1,64}$")
MAX_TEXT = 500  # characters of one chat line
HISTORY_LINES = 50
BANNED_WORDS = ("spam",)
ADMIN_ROOMS = ("chat:secret",)

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
  sid_hash TEXT PRIMARY KEY,   -- sha256 of the cookie: a leaked database opens no session
  user TEXT NOT NULL,
  created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS bans (user TEXT PRIMARY KEY, at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS lines (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  room TEXT NOT NULL,
  user TEXT NOT NULL,
  text TEXT NOT NULL,
  time TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS lines_by_room ON lines (room, id);
"""


# --- storage ---------------------------------------------------------------------


def db():
    """This request's SQLite connection (one per request: sqlite3 connections are
    not shared between the server's threads)."""
    if "db" not in g:
        g.db = sqlite3.connect(app.config["DB"], timeout=5)
        g.db.row_factory = sqlite3.Row
    return g.db


@app.teardown_appcontext
def close_db(_error):
    conn = g.pop("db", None)
    if conn is not None:
        conn.close()


def init_db(path):
    with sqlite3.connect(path) as conn:
        # WAL: readers (history) do not wait for a writer (a chat line).
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)


def sid_hash(sid):
    return hashlib.sha256(sid.encode()).hexdigest()


def session_user(cookies):
    """The logged-in user of a request's cookies (the browser's, or those the relay
    forwarded), or None."""
    sid = cookies.get(COOKIE)
    if not sid:
        return None
    row = db().execute(
        "SELECT user FROM sessions WHERE sid_hash = ? AND created_at > ?",
        (sid_hash(sid), int(time.time()) - SESSION_SECONDS),
    ).fetchone()
    return row["user"] if row else None


def banned(user):
    return db().execute("SELECT 1 FROM bans WHERE user = ?", (user,)).fetchone() is not None


def line_json(row):
    return {"id": row["id"], "user": row["user"], "text": row["text"], "time": row["time"]}


# --- HTTP helpers ------------------------------------------------------------------


@app.before_request
def read_body():
    # Read every body before answering, even one the endpoint ignores: Flask's
    # development server drains an unread body after the response with a blocking
    # read, which hangs a client that waits for the close (bounded: 16 KiB).
    request.get_data(cache=True)


def body(force=False):
    """The request's JSON object (400 otherwise). Browsers' requests must say
    `Content-Type: application/json`: another page of the same site cannot send
    that without the backend's consent (CORS), so it cannot post to /admin/* with
    the admin's cookie. The relay's calls are parsed whatever their type."""
    data = request.get_json(silent=True, force=force)
    if not isinstance(data, dict):
        abort(400, "expected a JSON object")
    return data


@app.errorhandler(400)
@app.errorhandler(401)
@app.errorhandler(403)
@app.errorhandler(404)
@app.errorhandler(405)
@app.errorhandler(413)
def http_error(e):
    return jsonify(error=e.name, message=e.description), e.code


def result(value):
    """A proxy answer that allows (docs/proxy.md: HTTP 200 with `result`)."""
    return jsonify(result=value)


def refuse(code, message):
    """A proxy answer that refuses: the client gets `refused` with this `app_code`.
    4000-4499 tell it not to retry, 4500-4999 that retrying may help."""
    return jsonify(error={"code": code, "message": message})


def grants(user):
    """What a user may do without asking the backend again. Chat rooms are left to
    /relay/subscribe (the relay asks only for a `sub` the grants do not cover) and
    to /relay/publish (which decides every publish in the namespace): an admin is
    granted every room to read."""
    return {"channels": ["chat:*"] if user in app.config["ADMINS"] else []}


def may_read(user, room):
    return room not in ADMIN_ROOMS or user in app.config["ADMINS"]


# --- login -------------------------------------------------------------------------


LOGIN_FORM = """<!doctype html><meta charset="utf-8"><title>log in</title>
<form method="post" action="/login"><input type="hidden" name="next" value="{{ next }}">
<label>user <input name="user" pattern="[a-z0-9_.\\-]{1,32}" required autofocus></label>
<button>log in</button></form>"""


@app.get("/login")
def login_form():
    # The chat page's "log in" link (static/index.html in application mode) leads
    # here; the form comes back to `next` afterwards. (Jinja escapes `next`.)
    return render_template_string(LOGIN_FORM, next=request.args.get("next", ""))


@app.post("/login")
def login():
    """Starts a session: `{"user": "alice"}` as JSON (or a form). A real application
    checks a password or a single sign-on here; the example trusts the name."""
    data = request.form if request.form else body()
    user = valid_user(data.get("user"))
    sid = secrets.token_urlsafe(32)
    conn = db()
    conn.execute(
        "INSERT INTO sessions (sid_hash, user, created_at) VALUES (?, ?, ?)",
        (sid_hash(sid), user, int(time.time())),
    )
    conn.commit()
    nxt = data.get("next") if request.form else None
    response = redirect(nxt) if nxt and same_host(nxt) else jsonify(user=user)
    # HttpOnly: page scripts cannot read it; the browser still sends it on the
    # WebSocket upgrade to the relay, a cookie being per host, not per port.
    # SameSite=Lax: not sent on other sites' requests (the relay is the same site).
    response.set_cookie(
        COOKIE, sid, max_age=SESSION_SECONDS, httponly=True, samesite="Lax",
        secure=request.is_secure,
    )
    return response


def same_host(url):
    """Whether `url` is on this backend's host (any port): `next` may not send the
    user to another site."""
    target = urllib.parse.urlsplit(url)
    return target.scheme in ("http", "https") and target.hostname == request.host.split(":")[0]


@app.post("/logout")
def logout():
    sid = request.cookies.get(COOKIE)
    if sid:
        conn = db()
        conn.execute("DELETE FROM sessions WHERE sid_hash = ?", (sid_hash(sid),))
        conn.commit()
    # The user's relay connections end at their next refresh (the session is gone).
    response = jsonify(user=None)
    response.delete_cookie(COOKIE)
    return response


@app.post("/token")
def token():
    """A JWT for the relay, for clients that connect with a token instead of the
    cookie (relay run with --jwt-secret): revocable with /admin/revoke."""
    secret = app.config["JWT_SECRET"]
    if not secret:
        abort(404, "this backend issues no tokens (no --jwt-secret)")
    user = session_user(request.cookies)
    if user is None:
        abort(401, "log in first")
    now = int(time.time())
    claims = {
        "sub": user, "iat": now, "exp": now + app.config["CONNECTION_TTL"],
        "jti": uuid.uuid4().hex, "info": {"name": user}, **grants(user),
    }
    return jsonify(token=hs256(claims, secret), expire_at=claims["exp"])


def hs256(claims, secret):
    def b64(raw):
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(secret.encode(), f"{head}.{payload}".encode(), hashlib.sha256).digest()
    return f"{head}.{payload}.{b64(signature)}"


@app.get("/healthz")
def healthz():
    return jsonify(status="ok")


# --- the relay's proxy calls (docs/proxy.md) ---------------------------------------


@app.post("/relay/connect")
def relay_connect():
    body(force=True)
    user = session_user(request.cookies)
    if user is None:
        return refuse(4401, "log in first")
    if banned(user):
        return refuse(4403, "banned")
    return result({
        "user": user,
        "info": {"name": user},
        # The connection lasts this long unless /relay/refresh extends it: how soon
        # a logout or a ban reaches connections that are already open.
        "expire_at": int(time.time()) + app.config["CONNECTION_TTL"],
        **grants(user),
        # The user's personal channel (only this user may use it): the backend can
        # reach every tab of the user with one /api/publish.
        "subscribe": [f"#{user}"],
    })


@app.post("/relay/refresh")
def relay_refresh():
    user = body(force=True).get("user")
    # The forwarded cookie must still name this user: a logout ends the session.
    if not user or session_user(request.cookies) != user or banned(user):
        return result({"expired": True})
    return result({"expire_at": int(time.time()) + app.config["CONNECTION_TTL"]})


@app.post("/relay/subscribe")
def relay_subscribe():
    data = body(force=True)
    user, room = data.get("user"), data.get("ch")
    if not user:
        return refuse(4401, "log in first")
    if not isinstance(room, str) or not ROOM.match(room):
        return refuse(4404, "no such room")
    if not may_read(user, room):
        return refuse(4403, "this room is for admins")
    return result({})


@app.post("/relay/publish")
def relay_publish():
    data = body(force=True)
    user, room, line = data.get("user"), data.get("ch"), data.get("data")
    if not user:
        return refuse(4401, "log in first")
    if not isinstance(room, str) or not ROOM.match(room) or not may_read(user, room):
        return refuse(4403, "you cannot write here")
    text = line.get("text") if isinstance(line, dict) else None
    if not isinstance(text, str) or not text.strip():
        return refuse(4400, 'a chat line is {"text": "..."}')
    text = text.strip()
    if len(text) > MAX_TEXT:
        return refuse(4400, f"a chat line has at most {MAX_TEXT} characters")
    if any(word in text.lower() for word in BANNED_WORDS):
        return refuse(4400, "that word is not welcome here")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    conn = db()
    cursor = conn.execute(
        "INSERT INTO lines (room, user, text, time) VALUES (?, ?, ?, ?)", (room, user, text, now)
    )
    conn.commit()
    # What subscribers receive instead of what the client sent: the stored line,
    # with its id (a client that reloads the history can tell what it already has).
    return result({"data": {"id": cursor.lastrowid, "user": user, "text": text, "time": now}})


@app.post("/relay/rpc")
def relay_rpc():
    data = body(force=True)
    user, method, params = data.get("user"), data.get("method"), data.get("data")
    if method != "history":
        return refuse(4404, f"no method {method!r}")
    room = params.get("room") if isinstance(params, dict) else None
    if not isinstance(room, str) or not ROOM.match(room):
        return refuse(4400, 'history takes {"room": "chat:<name>"}')
    if not user or not may_read(user, room):
        return refuse(4403, "this room is for admins")
    rows = db().execute(
        "SELECT * FROM (SELECT * FROM lines WHERE room = ? ORDER BY id DESC LIMIT ?) ORDER BY id",
        (room, HISTORY_LINES),
    ).fetchall()
    return result({"data": {"room": room, "lines": [line_json(r) for r in rows]}})


# --- acting on users through the relay's server API --------------------------------


def admin():
    """The logged-in admin making this request (401 or 403 otherwise)."""
    user = session_user(request.cookies)
    if user is None:
        abort(401, "log in first")
    if user not in app.config["ADMINS"]:
        abort(403, "admins only")
    return user


def valid_user(user):
    if not isinstance(user, str) or not USER.match(user):
        abort(400, "user: 1 to 32 characters of a-z 0-9 _ . -")
    return user


def relay_api(path, payload):
    """POSTs to the relay's server API through the first node that answers: any
    node reaches the user's connections on every node. Returns (status, body)."""
    last = None
    for base in app.config["RELAY_API"]:
        req = urllib.request.Request(
            base.rstrip("/") + path,
            data=json.dumps(payload).encode(),
            headers={
                "Authorization": f"Bearer {app.config['RELAY_API_KEY']}",
                "Content-Type": "application/json",
            },
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            # The relay answered: another node would answer the same.
            return e.code, json.loads(e.read() or b"{}")
        except (OSError, ValueError) as e:
            last = e  # that node is down: try the next one
    return 502, {"error": "unavailable", "message": f"no relay node answered: {last}"}


def relayed(status, answer, done):
    """The admin's answer: `done` once the relay acted, else 502 with its answer."""
    if 200 <= status < 300:
        return jsonify(done)
    return jsonify(error="relay", status=status, message=answer), 502


@app.post("/admin/kick")
def admin_kick():
    """Disconnects every connection of a user, on every node. `"ban": true` also
    refuses the user's next connects and refreshes."""
    admin()
    data = body()
    user = valid_user(data.get("user"))
    if data.get("ban") is True:
        conn = db()
        conn.execute("INSERT OR REPLACE INTO bans (user, at) VALUES (?, ?)", (user, int(time.time())))
        conn.commit()
    status, answer = relay_api("/api/disconnect", {"user": user, "reason": "kicked by an admin"})
    return relayed(status, answer, {"kicked": user, "banned": data.get("ban") is True})


@app.post("/admin/revoke")
def admin_revoke():
    """Revokes every token of a user issued so far (relay run with
    --token-revocation); the user's live connections with one are closed."""
    admin()
    user = valid_user(body().get("user"))
    # `iat` counts whole seconds: "before now + 1" includes a token issued this
    # very second (and one issued later in it: better than missing one).
    issued_before = int(time.time()) + 1
    status, answer = relay_api("/api/revoke", {"user": user, "issued_before": issued_before})
    return relayed(status, answer, {"revoked": user, "issued_before": issued_before})


def configure(argv):
    """Reads the configuration: flags, else environment variables, else defaults."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=env("BACKEND_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("BACKEND_PORT", "5000")))
    parser.add_argument("--db", default=env("BACKEND_DB", "chat.db"), help="the SQLite file")
    parser.add_argument(
        "--relay-api", default=env("RELAY_API_URL", "http://127.0.0.1:8080"),
        help="the relay nodes' base URLs, comma-separated (tried in turn)",
    )
    parser.add_argument("--relay-api-key", default=env("RELAY_API_KEY", ""))
    parser.add_argument(
        "--jwt-secret", default=env("RELAY_JWT_SECRET", ""),
        help="the relay's --jwt-secret, to issue tokens at POST /token",
    )
    parser.add_argument(
        "--connection-ttl", type=int, default=int(env("CONNECTION_TTL", "300")),
        help="seconds a relay connection lasts between refreshes",
    )
    parser.add_argument("--admins", default=env("BACKEND_ADMINS", "admin"), help="comma-separated")
    args = parser.parse_args(argv)
    if args.connection_ttl < 1:
        parser.error("--connection-ttl: at least 1 second")
    app.config.update(
        DB=args.db,
        RELAY_API=[u for u in args.relay_api.split(",") if u],
        RELAY_API_KEY=args.relay_api_key,
        JWT_SECRET=args.jwt_secret,
        CONNECTION_TTL=args.connection_ttl,
        ADMINS={a for a in args.admins.split(",") if a},
    )
    init_db(args.db)
    return args


if __name__ == "__main__":
    args = configure(None)
    # Flask's own server, threaded: enough for the example. In production run the
    # app under a WSGI server instead (`gunicorn -w 4 app:app`, configured by the
    # environment variables above).
    app.run(host=args.host, port=args.port, threaded=True)
else:
    configure([])
