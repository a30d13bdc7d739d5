"""MQTT 5 wire protocol, tensor codec, the cloud worker and the edge's remote segments. Decides no placement.

    codec.py           tensors + metadata <-> safetensors bytes (+ zstd), checked before allocating
    chunking.py        payloads above the broker's packet limit: split and bounded reassembly
    topics.py          the msao/v1 topic layout
    messages.py        job / result / status records (strict wire forms)
    mqtt_options.py    connection options and inbound-message records (no paho)
    client.py          the paho-mqtt 2.x wrapper (NODELAY, guarded callbacks, watchdog, chunking)
    worker.py          `msao cloud`: intake, bounded queue, worker threads, retained status
    model_server.py    runs split / answer / probe jobs on one bundle (no MQTT)
    sessions.py        bounded KV-session and recent-result tables
    link.py            the edge's end: submit with deadline, re-dispatch once, TransferStats
    remote_runner.py   a cloud decoder range that looks like a local Runner
    stats.py           TransferStats / TransferLog for bandwidth and RTT estimates

Nothing here is imported by ``import msao.cloud_bridge``; import the module you need.
See docs/cloud_bridge.md.
"""
