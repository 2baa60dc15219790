"""The training engine below the roles: model I/O, micro-batched forwards, DDP/FSDP2 training, the update loop."""
