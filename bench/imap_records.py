"""The plain `multiprocessing.Pool.imap` script `bench/records.py` times:
python imap_records.py IN OUT [CHUNKSIZE]."""

import json
import multiprocessing
import sys

from procqueue_bench.records import plus_one


def work(item: tuple[int, bytes]) -> str:
    line, raw = item
    record = json.loads(raw)
    return f'{{"line": {line}, "id": {json.dumps(record.get("id"))}, "ok": true, "value": {json.dumps(plus_one(record))}}}\n'


if __name__ == "__main__":
    chunksize = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    with open(sys.argv[1], "rb") as src, open(sys.argv[2], "w") as out, multiprocessing.Pool() as pool:
        for text in pool.imap(work, enumerate(src, 1), chunksize=chunksize):
            out.write(text)
