"""What the edge and the centre share: config, the unified policy, versions, registry, CLI."""
