"""The edge actor that runs on each cell: control loop, recorder, uplink, policy watch,
heartbeat. It speaks only gRPC to the centre and never imports learner/, Ray or Redis."""
