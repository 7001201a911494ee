"""longtune.parallel: process groups and device mesh, the backends (DDP, FSDP2, DeepSpeed ZeRO) and
`parallelize()`, which applies every parallel technique in one fixed, documented order."""
