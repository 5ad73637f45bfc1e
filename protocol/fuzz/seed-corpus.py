#!/usr/bin/env python3
"""Writes the fuzz seed corpus from the golden vectors (tests/vectors/*.jsonl).

corpus/envelope: every TCP data/keep-alive row as captured, prefixed with the target's 3
control bytes (chunk size, limit); corpus/avl: the data field of every TCP frame;
corpus/login: login rows (with a chunk-size byte); corpus/udp: datagrams; corpus/gt06_frame:
every GT06 row (tests/vectors/gt06/*.jsonl) with the same 3 control bytes; corpus/gt06_packet:
the protocol number, a UTC-offset byte (0) and the content of every GT06 row. The corpus
directory is generated, not committed (.gitignore).
"""
import json
import pathlib

here = pathlib.Path(__file__).resolve().parent
vectors = here.parent / "tests" / "vectors"
out = {
    t: here / "corpus" / t
    for t in ("envelope", "avl", "login", "udp", "gt06_frame", "gt06_packet")
}
for d in out.values():
    d.mkdir(parents=True, exist_ok=True)

n = 0
for path in sorted(vectors.glob("*.jsonl")):
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        raw = bytes.fromhex(row["hex"])
        kind = row["derived"]["kind"]
        name = f"{path.stem}-{i}"
        if kind == "imei":
            (out["login"] / name).write_bytes(b"\x07" + raw)
        elif kind == "udp_data":
            (out["udp"] / name).write_bytes(raw)
        else:
            # chunk 64 bytes, limit 32 KiB
            (out["envelope"] / name).write_bytes(b"\x40\x80\x00" + raw)
            if kind == "data" and len(raw) > 12:
                (out["avl"] / name).write_bytes(raw[8:-4])
        n += 1
for path in sorted((vectors / "gt06").glob("*.jsonl")):
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        raw = bytes.fromhex(json.loads(line)["hex"])
        name = f"{path.stem}-{i}"
        (out["gt06_frame"] / name).write_bytes(b"\x40\x80\x00" + raw)
        head = 4 if raw[:1] == b"\x79" else 3
        if len(raw) >= head + 7:
            (out["gt06_packet"] / name).write_bytes(raw[head : head + 1] + b"\x00" + raw[head + 1 : -6])
        n += 1
print(f"seeded {n} vectors into {here / 'corpus'}")
