#!/usr/bin/env python3
"""Readiness probes for scripts/services.sh, using only the Python standard library.

    service_probe.py mongo HOST PORT   # MongoDB wire protocol: OP_MSG {ping: 1} -> ok: 1
    service_probe.py cql HOST PORT     # CQL native protocol v4: STARTUP, then
                                       # SELECT release_version FROM system.local

Exit status 0 and one line on stdout (server version / ok) when the server really
answered; non-zero with the reason on stderr otherwise. A TCP connect alone is not
taken as ready.
"""

import socket
import struct
import sys

TIMEOUT = 5.0


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by server")
        buf.extend(chunk)
    return bytes(buf)


# ---------------------------------------------------------------- MongoDB / BSON

def bson_cstring(s):
    return s.encode() + b"\x00"


def bson_doc(items):
    """Encode a flat document of str/int/float values."""
    body = bytearray()
    for key, value in items:
        if isinstance(value, bool):
            body += b"\x08" + bson_cstring(key) + (b"\x01" if value else b"\x00")
        elif isinstance(value, int):
            body += b"\x10" + bson_cstring(key) + struct.pack("<i", value)
        elif isinstance(value, float):
            body += b"\x01" + bson_cstring(key) + struct.pack("<d", value)
        elif isinstance(value, str):
            raw = value.encode() + b"\x00"
            body += b"\x02" + bson_cstring(key) + struct.pack("<i", len(raw)) + raw
        else:
            raise TypeError(type(value))
    return struct.pack("<i", len(body) + 5) + bytes(body) + b"\x00"


def bson_top_level(doc):
    """Decode the top-level scalar fields of a BSON document (nested values skipped)."""
    out = {}
    (total,) = struct.unpack_from("<i", doc, 0)
    i = 4
    while i < total - 1:
        etype = doc[i]
        i += 1
        end = doc.index(b"\x00", i)
        key = doc[i:end].decode(errors="replace")
        i = end + 1
        if etype == 0x01:  # double
            out[key] = struct.unpack_from("<d", doc, i)[0]
            i += 8
        elif etype in (0x02, 0x0D, 0x0E):  # string, js code, symbol
            (n,) = struct.unpack_from("<i", doc, i)
            out[key] = doc[i + 4:i + 4 + n - 1].decode(errors="replace")
            i += 4 + n
        elif etype in (0x03, 0x04):  # document, array
            (n,) = struct.unpack_from("<i", doc, i)
            i += n
        elif etype == 0x05:  # binary
            (n,) = struct.unpack_from("<i", doc, i)
            i += 4 + 1 + n
        elif etype == 0x07:  # ObjectId
            i += 12
        elif etype == 0x08:  # bool
            out[key] = doc[i] == 1
            i += 1
        elif etype in (0x09, 0x11, 0x12):  # datetime, timestamp, int64
            out[key] = struct.unpack_from("<q", doc, i)[0]
            i += 8
        elif etype in (0x0A, 0x06, 0xFF, 0x7F):  # null, undefined, min/max key
            out[key] = None
        elif etype == 0x10:  # int32
            out[key] = struct.unpack_from("<i", doc, i)[0]
            i += 4
        elif etype == 0x13:  # decimal128
            i += 16
        else:  # something exotic: stop, we have what we need
            break
    return out


def mongo_command(sock, request_id, items):
    section = b"\x00" + bson_doc(items)
    body = struct.pack("<I", 0) + section  # flagBits + section kind 0
    header = struct.pack("<iiii", 16 + len(body), request_id, 0, 2013)  # OP_MSG
    sock.sendall(header + body)
    length, _, response_to, opcode = struct.unpack("<iiii", recv_exact(sock, 16))
    payload = recv_exact(sock, length - 16)
    if response_to != request_id or opcode != 2013:
        raise RuntimeError("unexpected reply opcode=%d responseTo=%d" % (opcode, response_to))
    if payload[4] != 0:
        raise RuntimeError("unexpected OP_MSG section kind %d" % payload[4])
    return bson_top_level(payload[5:])


def probe_mongo(host, port):
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.settimeout(TIMEOUT)
        reply = mongo_command(sock, 1, [("ping", 1), ("$db", "admin")])
        if reply.get("ok") != 1:
            raise RuntimeError("ping failed: %r" % reply)
        info = mongo_command(sock, 2, [("buildInfo", 1), ("$db", "admin")])
        if info.get("ok") != 1:
            raise RuntimeError("buildInfo failed: %r" % info)
        return "ok mongodb-compatible version %s" % info.get("version", "?")


# ---------------------------------------------------------------- CQL native protocol v4

CQL_VERSION = 0x04
OP_ERROR, OP_STARTUP, OP_READY, OP_AUTHENTICATE, OP_QUERY, OP_RESULT = 0x00, 0x01, 0x02, 0x03, 0x07, 0x08


def cql_string(s):
    raw = s.encode()
    return struct.pack(">H", len(raw)) + raw


def cql_send(sock, stream, opcode, body):
    sock.sendall(struct.pack(">BBhBi", CQL_VERSION, 0, stream, opcode, len(body)) + body)


def cql_recv(sock):
    version, _flags, stream, opcode, length = struct.unpack(">BBhBi", recv_exact(sock, 9))
    body = recv_exact(sock, length)
    if opcode == OP_ERROR:
        code = struct.unpack_from(">i", body, 0)[0]
        (n,) = struct.unpack_from(">H", body, 4)
        msg = body[6:6 + n].decode(errors="replace")
        raise RuntimeError("CQL error 0x%04x: %s" % (code, msg))
    return opcode, body


def probe_cql(host, port):
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.settimeout(TIMEOUT)
        startup = struct.pack(">H", 1) + cql_string("CQL_VERSION") + cql_string("3.0.0")
        cql_send(sock, 1, OP_STARTUP, startup)
        opcode, _ = cql_recv(sock)
        if opcode == OP_AUTHENTICATE:
            raise RuntimeError("server wants authentication")
        if opcode != OP_READY:
            raise RuntimeError("unexpected reply to STARTUP: opcode %d" % opcode)

        query = "SELECT release_version FROM system.local"
        raw = query.encode()
        body = struct.pack(">i", len(raw)) + raw + struct.pack(">HB", 0x0001, 0)  # consistency ONE, no flags
        cql_send(sock, 2, OP_QUERY, body)
        opcode, body = cql_recv(sock)
        if opcode != OP_RESULT:
            raise RuntimeError("unexpected reply to QUERY: opcode %d" % opcode)
        (kind,) = struct.unpack_from(">i", body, 0)
        if kind != 2:
            raise RuntimeError("unexpected result kind %d" % kind)
        flags, ncols = struct.unpack_from(">ii", body, 4)
        i = 12
        if flags & 0x0002:  # has_more_pages: paging state
            (n,) = struct.unpack_from(">i", body, i)
            i += 4 + max(n, 0)
        if flags & 0x0004:  # no_metadata
            raise RuntimeError("unexpected no_metadata result")

        def read_string(i):
            (n,) = struct.unpack_from(">H", body, i)
            return body[i + 2:i + 2 + n].decode(), i + 2 + n

        if flags & 0x0001:  # global_tables_spec
            _, i = read_string(i)
            _, i = read_string(i)
        for _ in range(ncols):
            if not flags & 0x0001:
                _, i = read_string(i)
                _, i = read_string(i)
            _, i = read_string(i)  # column name
            (type_id,) = struct.unpack_from(">H", body, i)
            i += 2
            if type_id not in (0x000A, 0x000D):  # ascii / varchar
                raise RuntimeError("unexpected column type 0x%04x" % type_id)
        (nrows,) = struct.unpack_from(">i", body, i)
        i += 4
        if nrows < 1:
            raise RuntimeError("system.local returned no row")
        (n,) = struct.unpack_from(">i", body, i)
        version = body[i + 4:i + 4 + n].decode() if n >= 0 else "null"
        return "ok cassandra release_version %s" % version


def main(argv):
    if len(argv) != 4 or argv[1] not in ("mongo", "cql"):
        sys.stderr.write(__doc__)
        return 2
    kind, host, port = argv[1], argv[2], int(argv[3])
    try:
        print(probe_mongo(host, port) if kind == "mongo" else probe_cql(host, port))
        return 0
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        sys.stderr.write("%s %s:%d not ready: %s: %s\n" % (kind, host, port, type(exc).__name__, exc))
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
