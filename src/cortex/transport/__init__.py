"""NATS transport: the only part of cortex that imports `nats` (nats-py).

One module per job: `connection` (a connection and who hears it reconnect or be refused),
`errors` (nats-py's exceptions become cortex's), `kv` (buckets and their keys), `watch`
(following a bucket), `job_client` (the gateway's half of the job protocol), `job_replies`
(the neuron's half), `control` (requests to a neuron's control service), `micro` (serving
one). `_natspy` holds every read of nats-py's private fields. Callers outside this package
hold a `Connection` or a `Bucket`, never a nats-py object.
"""
