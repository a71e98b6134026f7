"""The fleet's health in one document (FleetReport), behind `cortex status` and the gateway's /fleet page.

- `report`: the document and the rules that judge health (`build_report`);
- `bucket_values`: the KV buckets' raw values (heartbeats, pins) as the report's inputs;
- `text`: the report rendered for a terminal.

Pure: nothing here does I/O. `cortex status` reads the buckets through cortex.transport, the
gateway hands in what its fleet view and pins watch already hold.
"""
