"""The central learner: ingest, episode store, sampling, training, publishing (Ray)."""
