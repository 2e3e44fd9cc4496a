"""Independent computations the tests compare the package against (plain loops in float64),
and a local file server on 127.0.0.1 for the download tests.

Imported by the tests as `from oracles import ...` (pytest puts `tests/` on `sys.path`).
"""

import http.server
import re
import threading

import numpy as np
import pytest

from netvlad_tutorial.cli import main as cli_main


def brute_positives(db, radius, different_time=False):
    """For each query, the database indices within `radius` metres, nearest first (ties by
    index); with `different_time`, only images of another timestamp (TokyoTM)."""
    out = []
    for q in range(db.numQ):
        d = np.sqrt(((db.utmDb - db.utmQ[q]) ** 2).sum(axis=1))
        keep = d <= radius
        if different_time:
            keep &= db.dbTimeStamp != db.qTimeStamp[q]
        idx = np.flatnonzero(keep)
        out.append(idx[np.lexsort((idx, d[idx]))])
    return out


def brute_negatives(db, q):
    """The set of database indices farther than 25 m from query `q`."""
    return set(np.flatnonzero(np.linalg.norm(db.utmDb - db.utmQ[q], axis=1) > 25).tolist())


def brute_force_dist(q, db):
    """(M, N) Euclidean distances, float64, one pair at a time."""
    q, db = np.asarray(q, dtype=np.float64), np.asarray(db, dtype=np.float64)
    return np.array([[np.sqrt(np.sum((a - b) ** 2)) for b in db] for a in q])


def brute_force_recall(q, db, positives, n):
    """Recall@n by a plain loop: a hit if any of the n nearest is a positive; over all queries."""
    dist = brute_force_dist(q, db)
    hits = 0
    for i in range(len(q)):
        nearest = np.argsort(dist[i], kind="stable")[:n]
        hits += any(j in set(positives[i].tolist()) for j in nearest)
    return hits / len(q)


def brute_force_mine(q_row, db_desc, positives, candidates, n_neg_dist, n_neg, margin):
    """The reference mining procedure in float64 with plain loops: (positive, negatives).

    `margin` is on squared distances (`TrainConfig.margin`): plain distances use sqrt(margin).
    """
    dist = {j: float(np.sqrt(np.sum((db_desc[j].astype(np.float64) - q_row) ** 2)))
            for j in set(positives.tolist()) | set(candidates.tolist())}
    positive = min(positives.tolist(), key=lambda j: dist[j])
    nearest = sorted(set(candidates.tolist()), key=lambda j: dist[j])[:n_neg_dist]
    violating = [j for j in nearest if dist[j] < dist[positive] + margin ** 0.5]
    return positive, violating[:n_neg]


class FileServer:
    """`http.server` in a thread on 127.0.0.1, a free port, serving `files` {name: bytes};
    `mode` chooses what a GET returns: "good", "corrupt" (one byte flipped) or "truncate"."""

    def __init__(self, files):
        self.files, self.mode, self.requests = files, "good", []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                data = server.files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                if server.mode == "corrupt":
                    data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if server.mode == "truncate":  # the connection closes half-way
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def cli_error(capsys, argv):
    """Run the CLI, expect exit 2 with one `error: ` line, and return that message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(re.findall("^error: ", err, flags=re.M)) == 1, err
    return err[err.index("\nerror: ") + 1 if "\nerror: " in err else 0:].strip()
