"""What an edge cell and the centre both use: the unified policy and its file format,
the wire codec, ids, signing, TLS and call credentials, scenes, logging, metrics.

Nothing here imports fleet.control, Redis or Ray, so a cell installs `.[edge]` and runs it.
"""
