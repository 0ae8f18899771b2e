"""Runs the Python atproto SDK's Jetstream v2 client (atproto_jetstream.JetstreamClient)
against a Contrail server, as a user would, for tests/third_party.rs.

Usage: v2_client.py WS_BASE_URI N COMPRESS(0|1)
Prints one JSON line per event the client delivers (seq, $type, did, collection, rkey), then a
final line {"done": true, "compressed": …, "cursor": …} once N events arrived.
"""
import json
import sys

from atproto_jetstream import JetstreamClient

base_uri, wanted, compress = sys.argv[1], int(sys.argv[2]), sys.argv[3] == '1'
seen = []
# A timestamp cursor older than the log: the whole log, after an #info OutdatedCursor.
client = JetstreamClient(params={'cursor': 1_000_000_000_000_000}, base_uri=base_uri, compress=compress, recv_timeout=30)


def on_message(message) -> None:
    seq = getattr(message, 'seq', None)
    if seq is None:
        return  # #info carries no seq
    line = {'seq': seq, 'type': message.py_type, 'did': message.did}
    for field in ('collection', 'rkey', 'operation'):
        if hasattr(message, field):
            line[field] = getattr(message, field)
    print(json.dumps(line), flush=True)
    seen.append(seq)
    if len(seen) >= wanted:
        client.stop()


client.start(on_message)
print(json.dumps({'done': True, 'compressed': client.compressed, 'cursor': client.cursor}), flush=True)
