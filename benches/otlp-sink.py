#!/usr/bin/env python3
"""An OTLP/HTTP receiver that accepts every export and keeps nothing: the far end of
replisync's trace exporter when the benchmark measures what tracing costs.
Usage: benches/otlp-sink.py [PORT]  (default 4318, loopback only); prints the count at exit."""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

exports = 0


class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        global exports
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        exports += 1
        self.send_response(200)
        self.send_header("content-type", self.headers.get("content-type") or "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


port = int(sys.argv[1]) if len(sys.argv) > 1 else 4318
server = ThreadingHTTPServer(("127.0.0.1", port), Sink)
try:
    server.serve_forever()
except KeyboardInterrupt:
    pass
finally:
    print(f"otlp-sink: {exports} exports received", flush=True)
