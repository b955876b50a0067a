#!/usr/bin/env python3
"""The part of ClickHouse's HTTP interface Tally uses, in front of chDB.

chDB (the `chdb-core` wheel) is the ClickHouse engine of a current release as a
library. No current ClickHouse server can be installed on the test machines (Debian
ships 18.16, there is no Docker), so this process lets the rater's own code send its
own SQL to a current engine, and tests check what comes back. It is not a ClickHouse
server: it has no users, no per-request sessions and runs one statement at a time;
each statement goes to the engine as it was sent.

    POST /?query=Q&database=D&<setting>=<value>  body B
        Runs Q, a newline and B (an insert's rows), or B alone without Q, in database D
        with the settings: 200 and the result (TabSeparated unless the statement names
        a FORMAT), or 500 and the engine's error text, as ClickHouse answers.
    GET /  or  GET /ping
        Ok.

    chdb_http.py --listen 127.0.0.1:8124 --data DIR
"""

import argparse
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from chdb import session

SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def setting_value(value):
    """A setting's value as SQL: numbers as they are, anything else quoted."""
    if re.fullmatch(r"-?[0-9]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Engine:
    """One chDB session over DIR, used by one request at a time."""

    def __init__(self, data_dir):
        self.session = session.Session(data_dir)
        self.lock = threading.Lock()

    def run(self, statement, database, settings):
        """Runs one statement; the settings apply to it alone, as ClickHouse's do."""
        with self.lock:
            try:
                for name, value in settings:
                    self.session.query(f"SET {name} = {setting_value(value)}")
                self.session.query(f"USE `{database}`")
                return self.session.query(statement, "TabSeparated").bytes()
            finally:
                for name, _ in settings:
                    self.session.query(f"SET {name} = DEFAULT")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    engine = None

    def answer(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path in ("/", "/ping") and not url.query:
            self.answer(200, b"Ok.\n")
        else:
            self.answer(400, b"only POST runs statements; GET answers / and /ping\n")

    def do_POST(self):
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self.answer(411, b"send the body with a Content-Length\n")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode("utf-8")
        except ValueError as error:
            self.close_connection = True
            self.answer(400, f"unreadable request: {error}\n".encode())
            return
        query, database, settings = None, "default", []
        for name, value in parse_qsl(urlsplit(self.path).query, keep_blank_values=True):
            if name == "query":
                query = value
            elif name == "database":
                database = value
            elif SETTING_NAME.match(name):
                settings.append((name, value))
            else:
                self.answer(400, f"not a setting name: {name!r}\n".encode())
                return
        statement = body if query is None else f"{query}\n{body}"
        try:
            result = self.engine.run(statement, database, settings)
        except Exception as error:  # the engine's error, as ClickHouse would send it
            self.answer(500, f"{error}\n".encode())
            return
        self.answer(200, result)

    def log_message(self, format, *args):
        pass  # one line per statement would drown the log


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8124")
    parser.add_argument("--data", required=True)
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    Handler.engine = Engine(args.data)
    version = Handler.engine.run("SELECT version()", "default", []).decode().strip()
    server = ThreadingHTTPServer((host, int(port)), Handler)
    print(f"ClickHouse {version} (chDB) answering on http://{args.listen}/", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
